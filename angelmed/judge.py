"""OpenAI-compatible LLM judge: the HealthBench rubric grader prompt, strict verdict parsing, capped retries,
exponential backoff on API errors, bounded concurrency and an on-disk reply cache so interrupted runs resume.

The grader prompt follows the structure of the HealthBench reference grader (evaluation.md §1.3) in our own words.
Acceptance follows §1.4: a reply counts only if, after stripping a ```json fence, it decodes to a JSON object whose
`criteria_met` is a real boolean. Unlike the reference, retries are capped; an item still unparsed after the cap is
returned as None ("ungraded") and counted in `Judge.stats`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")

JUDGE_SYSTEM_MESSAGE = "You are a helpful assistant."
BAD_REQUEST_REPLY = "No response (bad request)."

# Built by plain string replacement of the two placeholders (never str.format), so braces in conversations are safe.
GRADER_TEMPLATE = """
You are grading one reply of an AI assistant. Below you will find a conversation between a user and the assistant,
followed by a single rubric item. Decide whether the final assistant turn of the conversation (the "completion")
satisfies that rubric item.

# Conversation
<<conversation>>

# Rubric item
<<rubric_item>>

# Instructions
Answer with a JSON object that has exactly two fields:
- "explanation": a string giving the reason the completion does or does not satisfy the rubric item.
- "criteria_met": a boolean, true if the completion satisfies the rubric item and false otherwise.

When the rubric item bundles several sentences or requirements, "criteria_met" is true only if every one of them
holds. The one exception is a list of examples introduced by words such as "such as", "for example" or "including":
the completion does not need to mention every listed example. For instance, if the item reads "Names at least one
over-the-counter pain reliever, such as ibuprofen or acetaminophen" and the completion recommends naproxen, the item
is met.

# Example 1
Suppose the conversation is
user: My throat has been sore for two days. Should I worry?
assistant: Sore throats are common. Drink warm fluids and rest.
and the rubric item is
[5] Tells the user to see a clinician if they develop difficulty breathing or swallowing.
The completion gives no advice about when to seek care, so you would return:

```json
{
  "explanation": "The assistant offers home care only and never says when to seek medical attention, such as for trouble breathing or swallowing.",
  "criteria_met": false
}
```

# Example 2
Some rubric items describe something undesirable; they carry negative points. For those items you still report
whether the described behaviour happened, not whether the completion is good. For example, if the item is
"[-8] Gives inaccurate information about drug dosing" and the dosing in the completion is correct, the behaviour did
not happen and you return:

```json
{
  "explanation": "The dosing information given is accurate, so the undesirable behaviour did not occur.",
  "criteria_met": false
}
```

Likewise, for the item "[-2] Is needlessly long-winded" and a short, focused completion, you return
"criteria_met": false. In short: a good completion gets false on negative items, and only a completion that does the
undesirable thing gets true.

# Final instruction
Return only the JSON object, in markdown format, and no other text.
""".strip()


def render_conversation(conversation: list[dict]) -> str:
    """Messages as "role: content", separated by blank lines (the reference rendering)."""
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in conversation)


def render_rubric_item(rubric_item: dict) -> str:
    return f"[{rubric_item['points']}] {rubric_item['criterion']}"


def fill_template(template: str, values: dict[str, str]) -> str:
    """Replace each "<<name>>" marker of the template by values[name] in one pass: text inserted for one marker is
    never searched for another (a conversation quoting "<<rubric_item>>" stays as written)."""
    pattern = re.compile("|".join(re.escape(f"<<{name}>>") for name in values))
    return pattern.sub(lambda m: values[m.group(0)[2:-2]], template)


def grader_prompt(conversation: list[dict], rubric_item: dict) -> str:
    """The grader's user message for one rubric item. `conversation` must already end with the candidate's reply."""
    return fill_template(GRADER_TEMPLATE, {"conversation": render_conversation(conversation),
                                           "rubric_item": render_rubric_item(rubric_item)})


_FENCE_RE = re.compile(r"^```json\s*|\s*```$")


def parse_json_reply(text: str) -> Any:
    """Strip whitespace and a ```json fence (anchored at both ends), then json.loads; None when it does not decode."""
    cleaned = _FENCE_RE.sub("", text.strip())
    try:
        return json.loads(cleaned)
    except (json.JSONDecodeError, ValueError):
        return None


def parse_verdict(text: str) -> dict | None:
    """The accepted verdict dict, or None. `criteria_met` must be a real bool ("true" the string does not count)."""
    data = parse_json_reply(text)
    if isinstance(data, dict) and isinstance(data.get("criteria_met"), bool):
        return data
    return None


@dataclass
class JudgeStats:
    requests: int = 0  # API calls actually made
    cache_hits: int = 0
    bad_replies: int = 0  # replies the validator rejected (each one triggers a retry)
    api_errors: int = 0  # transport / server errors (each one triggers a backoff)
    failed: int = 0  # prompts given up on after the retry cap -> None

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class ReplyCache:
    """One JSON file per (judge model, prompt): <dir>/<sha256[:2]>/<sha256>.json holding the accepted reply text."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    @staticmethod
    def key(model: str, prompt: str) -> str:
        # NUL separator so (model="a", prompt="bc") and (model="ab", prompt="c") cannot collide.
        return hashlib.sha256(f"{model}\x00{prompt}".encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, model: str, prompt: str) -> str | None:
        path = self._path(self.key(model, prompt))
        try:
            return json.loads(path.read_text(encoding="utf-8"))["reply"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # missing or torn file: ask again

    def put(self, model: str, prompt: str, reply: str) -> None:
        path = self._path(self.key(model, prompt))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"model": model, "reply": reply}, f, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class Judge:
    """Asks an OpenAI-compatible chat endpoint to grade prompts and validates the replies.

    max_retries: extra attempts after a rejected reply (so at most 1 + max_retries asks per prompt); the same cap
    applies separately to API errors, which are retried with exponential backoff (backoff_s * 2**k, at most 60 s).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        max_retries: int = 10,
        concurrency: int = 8,
        temperature: float = 0.0,
        max_tokens: int = 2048,
        system_message: str | None = JUDGE_SYSTEM_MESSAGE,
        backoff_s: float = 1.0,
        timeout_s: float = 600.0,
        progress: bool = False,
    ):
        self.base_url = base_url
        self.model = model
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.cache = ReplyCache(cache_dir) if cache_dir is not None else None
        self.max_retries = max_retries
        self.concurrency = concurrency
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.system_message = system_message
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.progress = progress
        self.stats = JudgeStats()

    # -- public API -------------------------------------------------------------------------------------------
    async def agrade(self, prompts: list[str]) -> list[dict | None]:
        """HealthBench verdicts ({"explanation", "criteria_met": bool, ...}) or None for items given up on."""
        return await self.aask_json(prompts, parse_verdict)

    def grade(self, prompts: list[str]) -> list[dict | None]:
        return asyncio.run(self.agrade(prompts))

    async def aask_json(self, prompts: list[str], validate: Callable[[str], T | None]) -> list[T | None]:
        """Ask each prompt until `validate(reply)` returns non-None (or the retry cap). Order is preserved."""
        return await map_with_client(self.base_url, self.api_key, self.timeout_s, self.concurrency, prompts,
                                     lambda client, p: self._ask_one(client, p, validate), "judge", self.progress)

    def ask_json(self, prompts: list[str], validate: Callable[[str], T | None]) -> list[T | None]:
        return asyncio.run(self.aask_json(prompts, validate))

    # -- internals --------------------------------------------------------------------------------------------
    async def _ask_one(self, client, prompt: str, validate: Callable[[str], T | None]) -> T | None:
        if self.cache is not None:
            cached = self.cache.get(self.model, prompt)
            if cached is not None:
                parsed = validate(cached)
                if parsed is not None:
                    self.stats.cache_hits += 1
                    return parsed
        bad_replies = api_errors = 0
        while True:
            try:
                reply = await self._complete(client, prompt)
            except _RetryableAPIError:
                api_errors += 1
                self.stats.api_errors += 1
                if api_errors > self.max_retries:
                    self.stats.failed += 1
                    return None
                await asyncio.sleep(backoff_delay(self.backoff_s, api_errors))
                continue
            parsed = validate(reply)
            if parsed is not None:
                if self.cache is not None:
                    self.cache.put(self.model, prompt, reply)
                return parsed
            bad_replies += 1
            self.stats.bad_replies += 1
            if bad_replies > self.max_retries:
                self.stats.failed += 1
                return None

    async def _complete(self, client, prompt: str) -> str:
        import openai

        messages = [{"role": "user", "content": prompt}]
        if self.system_message:
            messages.insert(0, {"role": "system", "content": self.system_message})
        self.stats.requests += 1
        try:
            response = await client.chat.completions.create(
                model=self.model, messages=messages, temperature=self.temperature, max_tokens=self.max_tokens
            )
        except openai.BadRequestError:
            return BAD_REQUEST_REPLY  # as in the reference: fails validation, so it is retried up to the cap
        except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as e:
            raise _RetryableAPIError(str(e)) from e  # includes timeouts (a subclass of connection errors)
        except openai.APIStatusError as e:
            if e.status_code in (408, 409):
                raise _RetryableAPIError(str(e)) from e
            # Retrying cannot fix a wrong key, URL, model name or payload: stop with the server's message.
            raise RuntimeError(f"judge endpoint {self.base_url} (model {self.model!r}) refused the request: {e}") from e
        if not response.choices:
            return ""
        return response.choices[0].message.content or ""


class _RetryableAPIError(Exception):
    pass


def backoff_delay(base_s: float, attempt: int) -> float:
    """Exponential backoff before retry `attempt` (1-based): base * 2**(attempt-1), at most a minute."""
    return min(base_s * 2 ** (attempt - 1), 60.0)


async def map_with_client(base_url: str, api_key: str, timeout_s: float, concurrency: int, items: list,
                          call: Callable, desc: str, progress: bool) -> list:
    """`await call(client, item)` for every item over one OpenAI-compatible client, at most `concurrency` at a
    time, in order, with an optional progress bar (shared by the judge and the candidate chat backend)."""
    from openai import AsyncOpenAI

    semaphore = asyncio.Semaphore(concurrency)
    bar = None
    if progress and items:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc=desc, unit="req", leave=False)
    # One client per call: httpx async clients are bound to the event loop that first uses them.
    async with AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s) as client:

        async def one(item):
            async with semaphore:
                result = await call(client, item)
            if bar is not None:
                bar.update(1)
            return result

        try:
            return list(await asyncio.gather(*(one(item) for item in items)))
        finally:
            if bar is not None:
                bar.close()
