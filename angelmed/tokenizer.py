"""The Ling tokenizer and chat template (spec: model.md §10, training.md §6).

- `render_chat` is a pure-Python reproduction of the official Ling SFT Jinja template
  (assets/ling_chat_template.jinja), byte for byte; `render_base` is the pre-train ("base") template.
- `Tokenizer` wraps a HF `tokenizers` byte-level BPE: train a small one with the Ling pipeline
  (NFC -> Ling Split regex -> ByteLevel) and the Ling special tokens, or load a real Ling tokenizer.json.
- `Tokenizer.encode_chat` returns ids plus the SFT loss mask (assistant replies incl. their <|role_end|>).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer

log = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
CHAT_TEMPLATE_PATH = ASSETS_DIR / "ling_chat_template.jinja"

BOS_TOKEN = "<|startoftext|>"
EOD_TOKEN = "<|endoftext|>"  # pad; end of document in pre-training
ROLE_END_TOKEN = "<|role_end|>"  # end of a chat turn; chat eos
ROLE_OPEN_TOKEN = "<role>"
ROLE_CLOSE_TOKEN = "</role>"

# Official order (ids 156891.. in the real vocabulary); the reserved block sits between </tool_response> and <role>.
_SPECIAL_HEAD = [BOS_TOKEN, EOD_TOKEN, "[CLS]", "[gMASK]", ROLE_END_TOKEN,
                 "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
_SPECIAL_TAIL = [ROLE_OPEN_TOKEN, ROLE_CLOSE_TOKEN,
                 "<|arithmetic_end|>", "<|number_end|>", "<|arithmetic_start|>", "<|number_start|>"]
RESERVED_TOKENS: list[str] = [f"<|reserved_token_{i}|>" for i in range(5, 256)]
SPECIAL_TOKENS: list[str] = _SPECIAL_HEAD + _SPECIAL_TAIL  # without the 251 reserved tokens (small vocabs)

SPECIAL_TOKENS_MAP = {"bos_token": BOS_TOKEN, "cls_token": "[CLS]", "eos_token": ROLE_END_TOKEN,
                      "gmask_token": "[gMASK]", "pad_token": EOD_TOKEN}

# The Split regex of the real Ling tokenizer.json (Ming @ 480df09). model.md §10.1 prints it without the
# leading apostrophe, which would isolate every s/d/m/t letter; the real file has it.
LING_SPLIT_REGEX = (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}"
                    r"| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+")

DEFAULT_SYSTEM_PROMPT = "You are AntAngelMed, a helpful medical assistant."
CHAT_ROLES = ("system", "user", "assistant", "tool")
_TOOLS_INTRO = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_TOOLS_OUTRO = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>\n")


def special_tokens(include_reserved: bool = False) -> list[str]:
    """Ling special tokens in official order; with the reserved block when `include_reserved`."""
    return _SPECIAL_HEAD + (RESERVED_TOKENS if include_reserved else []) + _SPECIAL_TAIL


def official_chat_template() -> str:
    """The official Ling SFT chat template text (Jinja), as shipped in tokenizer_config.json."""
    return CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------
# Chat rendering
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatSegment:
    """A piece of a rendered conversation. `is_assistant_reply`: an assistant turn's text after
    <role>ASSISTANT</role> up to and including its <|role_end|> (the SFT loss tokens)."""

    text: str
    is_assistant_reply: bool = False
    message_index: int | None = None


def _to_json(obj: Any, where: str) -> str:
    # transformers overrides Jinja's tojson with json.dumps(ensure_ascii=False): no key sorting, no HTML escaping.
    try:
        return json.dumps(obj, ensure_ascii=False)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{where}: not JSON-serialisable ({err})") from err


def _validate_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}]: unknown role {role!r}; expected one of {list(CHAT_ROLES)}")
        content = message.get("content")
        # The template concatenates user/system content as strings; assistant/tool content may be absent.
        if role in ("user", "system"):
            if not isinstance(content, str):
                raise TypeError(f"messages[{i}] (role {role!r}): content must be a string, "
                                f"got {type(content).__name__}")
        elif content is not None and not isinstance(content, str):
            raise TypeError(f"messages[{i}] (role {role!r}): content must be a string or None, "
                            f"got {type(content).__name__}")
        reasoning = message.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise TypeError(f"messages[{i}]: reasoning_content must be a string or None, "
                            f"got {type(reasoning).__name__}")
        tool_calls = message.get("tool_calls")
        if tool_calls and (isinstance(tool_calls, (str, bytes, Mapping)) or not isinstance(tool_calls, Sequence)):
            raise TypeError(f"messages[{i}]: tool_calls must be a list, got {type(tool_calls).__name__}")


def _last_query_index(messages: Sequence[Mapping[str, Any]]) -> int:
    """Index of the last real user query; a user message wrapped in <tool_response> tags does not count."""
    for i in range(len(messages) - 1, -1, -1):
        message = messages[i]
        content = message.get("content")
        if message["role"] == "user" and isinstance(content, str) and not (
                content.startswith("<tool_response>") and content.endswith("</tool_response>")):
            return i
    return len(messages) - 1


def _render_tool_call(call: Any, where: str) -> str:
    if not isinstance(call, Mapping):
        raise TypeError(f"{where} must be a dict, got {type(call).__name__}")
    function = call.get("function") or call
    if not isinstance(function, Mapping):
        raise TypeError(f"{where}.function must be a dict, got {type(function).__name__}")
    name = function.get("name")
    if not isinstance(name, str):
        raise TypeError(f"{where}: function name must be a string, got {type(name).__name__}")
    if "arguments" not in function:
        raise ValueError(f"{where}: missing 'arguments'")
    arguments = function["arguments"]
    arguments_text = arguments if isinstance(arguments, str) else _to_json(arguments, f"{where}.arguments")
    return '<tool_call>\n{"name": "' + name + '", "arguments": ' + arguments_text + "}\n</tool_call>"


def _render_assistant_reply(message: Mapping[str, Any], index: int, keep_reasoning: bool) -> str:
    """Text after <role>ASSISTANT</role>, up to and including <|role_end|>."""
    content = message.get("content")
    content = content if isinstance(content, str) else ""
    reasoning = message.get("reasoning_content")
    if not isinstance(reasoning, str):
        reasoning = ""
        if "</think>" in content:  # inline reasoning: <think>...</think> at the start of the content
            reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
            content = content.split("</think>")[-1].lstrip("\n")
    if keep_reasoning and reasoning:
        text = "\n<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
    else:
        text = content
    for k, call in enumerate(message.get("tool_calls") or []):
        if k > 0 or content:
            text += "\n"
        text += _render_tool_call(call, f"messages[{index}].tool_calls[{k}]")
    return text + ROLE_END_TOKEN


def render_chat_segments(messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None,
                         add_generation_prompt: bool = False) -> list[ChatSegment]:
    """The official Ling chat template, rendered as segments; "".join(texts) == render_chat(...)."""
    _validate_messages(messages)
    if tools is not None and (isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence)):
        raise TypeError(f"tools must be a list of tool definitions or None, got {type(tools).__name__}")
    header = "<role>SYSTEM</role>"
    if messages and messages[0]["role"] == "system":
        header += messages[0]["content"] + "\n"
    if tools:
        header += _TOOLS_INTRO + "".join("\n" + _to_json(tool, f"tools[{k}]") for k, tool in enumerate(tools))
        header += _TOOLS_OUTRO
    header += "detailed thinking off" + ROLE_END_TOKEN  # thinking_option is hard-coded 'off' in the template
    segments = [ChatSegment(header)]

    last_query = _last_query_index(messages)
    n = len(messages)
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "user":
            segments.append(ChatSegment(f"<role>HUMAN</role>{message['content']}{ROLE_END_TOKEN}", False, i))
        elif role == "system" and i > 0:  # a first system message went into the header
            segments.append(ChatSegment(f"<role>SYSTEM</role>{message['content']}{ROLE_END_TOKEN}", False, i))
        elif role == "assistant":
            segments.append(ChatSegment("<role>ASSISTANT</role>", False, i))
            reply = _render_assistant_reply(message, i, keep_reasoning=i > last_query)
            segments.append(ChatSegment(reply, True, i))
        elif role == "tool":  # consecutive tool results share one OBSERVATION turn
            content = message.get("content")
            text = "<role>OBSERVATION</role>" if i == 0 or messages[i - 1]["role"] != "tool" else ""
            text += "\n<tool_response>\n" + (content if isinstance(content, str) else "") + "\n</tool_response>"
            if i == n - 1 or messages[i + 1]["role"] != "tool":
                text += ROLE_END_TOKEN
            segments.append(ChatSegment(text, False, i))
    if add_generation_prompt:
        segments.append(ChatSegment("<role>ASSISTANT</role>"))
    return segments


def render_chat(messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None,
                add_generation_prompt: bool = False) -> str:
    """Render like the official Ling SFT template. Like the template, no default system prompt is inserted
    (see `with_default_system_prompt`). Unknown roles and non-string content raise instead of being dropped."""
    return "".join(s.text for s in render_chat_segments(messages, tools, add_generation_prompt))


def render_base(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
    """The Ling pre-train template: <role>{ROLE}</role>{content} per message (user -> HUMAN, other roles
    upper-cased), no <|role_end|>; the generation prompt is <role>ASSISTANT</role>."""
    _validate_messages(messages)
    parts = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, str):
            raise TypeError(f"messages[{i}] (role {message['role']!r}): content must be a string, "
                            f"got {type(content).__name__}")
        role = "HUMAN" if message["role"] == "user" else message["role"].upper()
        parts.append(f"<role>{role}</role>{content}")
    if add_generation_prompt:
        parts.append("<role>ASSISTANT</role>")
    return "".join(parts)


def with_default_system_prompt(messages: Sequence[Mapping[str, Any]],
                               system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> list[Mapping[str, Any]]:
    """`messages` with a leading system message added when there is none (the template itself adds none)."""
    messages = list(messages)
    if messages and isinstance(messages[0], Mapping) and messages[0].get("role") == "system":
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


# ----------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _ling_pipeline(backend: BackendTokenizer) -> None:
    """Normaliser, pre-tokenizer, post-processor and decoder as in the real Ling tokenizer.json."""
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LING_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()


class Tokenizer:
    """Byte-level BPE with the Ling special tokens and the Ling chat template."""

    REQUIRED_TOKENS = (BOS_TOKEN, EOD_TOKEN, ROLE_END_TOKEN, ROLE_OPEN_TOKEN, ROLE_CLOSE_TOKEN)

    def __init__(self, backend: BackendTokenizer, chat_template: str | None = None, source: str = "<memory>"):
        self.backend = backend
        # Never truncate or pad silently, whatever the tokenizer.json says.
        backend.no_truncation()
        backend.no_padding()
        self.chat_template = chat_template if chat_template is not None else official_chat_template()
        ids = {t: backend.token_to_id(t) for t in self.REQUIRED_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"{source}: tokenizer lacks the Ling special token(s) {missing}")
        split = [t for t, i in ids.items() if self.encode(t) != [i]]
        if split:
            raise ValueError(f"{source}: special token(s) {split} are not matched as single tokens "
                             f"(they must be added tokens)")
        self.bos_id: int = ids[BOS_TOKEN]
        self.eod_id: int = ids[EOD_TOKEN]
        self.role_end_id: int = ids[ROLE_END_TOKEN]
        self.pad_id: int = self.eod_id
        self.stop_ids: list[int] = [self.role_end_id, self.eod_id]
        # Largest id + 1, so an embedding of this size covers every id even if the id space has gaps.
        self.vocab_size: int = max(backend.get_vocab(with_added_tokens=True).values()) + 1

    # ---- construction ----

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
              include_reserved: bool = False) -> "Tokenizer":
        """Train a byte-level BPE on `texts`. `vocab_size` counts the 256 byte tokens, the merges and the
        special tokens, which get the last ids (as in the real vocabulary). Non-string items are skipped and
        counted. A small corpus may stop short of `vocab_size` (see `.vocab_size`)."""
        specials = special_tokens(include_reserved)
        smallest = 256 + len(specials)
        if vocab_size < smallest:
            raise ValueError(f"vocab_size {vocab_size} is too small: need at least {smallest} "
                             f"(256 bytes + {len(specials)} special tokens)")
        skipped = {"count": 0, "first": None}

        def strings() -> Iterator[str]:
            for k, text in enumerate(texts):
                if isinstance(text, str):
                    yield text
                else:
                    skipped["count"] += 1
                    skipped["first"] = k if skipped["first"] is None else skipped["first"]

        backend = BackendTokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
        _ling_pipeline(backend)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), min_frequency=min_frequency,
                                      show_progress=False, special_tokens=[],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        backend.train_from_iterator(strings(), trainer=trainer)
        if skipped["count"]:
            log.warning("tokenizer training skipped %d non-string text(s) (first at item %d)",
                        skipped["count"], skipped["first"])
        backend.add_special_tokens([AddedToken(t, single_word=False, lstrip=False, rstrip=False,
                                               normalized=False, special=True) for t in specials])
        return cls(backend, source="trained tokenizer")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a directory holding tokenizer.json (+ optional tokenizer_config.json), or a tokenizer.json."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json" if path.is_dir() else path
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no tokenizer file at {str(tokenizer_file)!r}: expected a directory "
                                    f"containing tokenizer.json, or the path of a tokenizer.json")
        try:
            backend = BackendTokenizer.from_file(str(tokenizer_file))
        except Exception as err:  # the Rust loader raises a bare Exception
            raise ValueError(f"{tokenizer_file}: not a valid `tokenizers` JSON file: {err}") from err
        template = None
        config_file = tokenizer_file.parent / "tokenizer_config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ValueError(f"{config_file}: invalid JSON at line {err.lineno}: {err.msg}") from err
            template = config.get("chat_template") if isinstance(config, dict) else None
            if template is not None and not isinstance(template, str):
                log.warning("%s: chat_template is not a single string; saving the official Ling template instead",
                            config_file)
                template = None
            if template is not None and template != official_chat_template():
                log.warning("%s: chat_template differs from the official Ling template; render_chat/encode_chat "
                            "still render the official one", config_file)
        return cls(backend, chat_template=template, source=str(tokenizer_file))

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (loadable by
        transformers' AutoTokenizer, whose apply_chat_template then renders the Ling template)."""
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(directory / "tokenizer.json", self.backend.to_str(pretty=True))
        config = {
            "add_bos_token": False,
            "add_eos_token": False,
            "bos_token": BOS_TOKEN,
            "chat_template": self.chat_template,
            "clean_up_tokenization_spaces": False,
            "eos_token": ROLE_END_TOKEN,
            "pad_token": EOD_TOKEN,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        special_map = {k: v for k, v in SPECIAL_TOKENS_MAP.items() if self.backend.token_to_id(v) is not None}
        config.update({k: v for k, v in special_map.items() if k in ("cls_token", "gmask_token")})
        _atomic_write_text(directory / "tokenizer_config.json",
                           json.dumps(dict(sorted(config.items())), indent=2, ensure_ascii=False) + "\n")
        _atomic_write_text(directory / "special_tokens_map.json", json.dumps(special_map, indent=2) + "\n")

    # ---- vocabulary ----

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # ---- text ----

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS added; special-token strings in the text become their ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a string, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---- chat ----

    def render_chat(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None,
                    add_generation_prompt: bool = False) -> str:
        return render_chat(messages, tools, add_generation_prompt)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None,
                    add_generation_prompt: bool = False,
                    only_last_assistant: bool = False) -> tuple[list[int], list[bool]]:
        """Ids of render_chat(...) and the SFT loss mask: True on every assistant reply's tokens after
        <role>ASSISTANT</role> up to and including its <|role_end|> (only the last one with
        `only_last_assistant`); False on system/human/observation turns and on the role header."""
        segments = render_chat_segments(messages, tools, add_generation_prompt)
        if only_last_assistant:
            last = max((k for k, s in enumerate(segments) if s.is_assistant_reply), default=-1)
            segments = [ChatSegment(s.text, k == last, s.message_index) for k, s in enumerate(segments)]
        # Merge neighbours with the same mask value, so every cut sits next to a special token.
        runs: list[tuple[str, bool]] = []
        for s in segments:
            if runs and runs[-1][1] == s.is_assistant_reply:
                runs[-1] = (runs[-1][0] + s.text, s.is_assistant_reply)
            else:
                runs.append((s.text, s.is_assistant_reply))
        ids: list[int] = []
        mask: list[bool] = []
        for text, is_reply in runs:
            run_ids = self.encode(text)
            ids += run_ids
            mask += [is_reply] * len(run_ids)
        whole = self.encode("".join(text for text, _ in runs))
        if whole != ids:
            at = next((k for k, (a, b) in enumerate(zip(whole, ids)) if a != b), min(len(whole), len(ids)))
            raise ValueError(f"chat segment token boundaries are inconsistent: encoding the segments differs from "
                             f"encoding the whole conversation at token {at} ({len(ids)} vs {len(whole)} tokens); "
                             f"<role>, </role> and <|role_end|> must be special tokens")
        return ids, mask
