"""The OpenAI-compatible server, driven by the real `openai` client against uvicorn on 127.0.0.1."""

import contextlib
import json
import re
import socket
import sys
import threading
import time
import types

import httpx
import openai
import pytest
import torch
import uvicorn

from angelmed import MEDICAL_ADVISORY
from angelmed.checkpoint import load_model, save_model
from angelmed.infer.engine import Engine, GenerationRequest
from angelmed.infer.generate import generate
from angelmed.serve.app import ServerConfig, create_app
from test_engine import ByteTokenizer, tiny_model

MODEL = "tiny-med"



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def make_tokenizer():
    tok = ByteTokenizer()
    tok.stop_ids = []  # a random model could emit a stop id anywhere; these tests want predictable lengths
    return tok


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_model(tiny_model(0), d)
    return d


@pytest.fixture(scope="module")
def server(tiny_dir):
    model = load_model(tiny_dir, dtype="float32")
    tok = make_tokenizer()
    engine = Engine(model, tokenizer=tok, max_batch=4, max_seq_len=4096)
    app = create_app(engine, tok, ServerConfig(served_model_name=MODEL, safety=False, sampling_defaults={}))
    with running_server(app) as url:
        yield url, model, tok, engine


def client(url, **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, timeout=30, **kw)


def expected_reply(model, tok, messages, n):
    ids = tok.encode(tok.render_chat(messages, add_generation_prompt=True))
    out = generate(model, torch.tensor([ids]), n)[0].tolist()
    return tok.decode(out, skip_special_tokens=True)


MSGS = [{"role": "system", "content": "You are a careful assistant."}, {"role": "user", "content": "Fever of 39C?"}]


def test_models_health_page(server):
    url, *_ = server
    models = client(url).models.list()
    assert [m.id for m in models.data] == [MODEL]
    raw = httpx.get(url + "/v1/models").json()
    assert raw["data"][0]["metadata"]["medical_advisory"] == MEDICAL_ADVISORY
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "Medical advisory" in page.text and "/v1/chat/completions" in page.text
    assert "cache_salt: cacheSalt" in page.text  # each page keeps its conversation cache to itself


def test_chat_non_stream_and_stream(server):
    url, model, tok, _ = server
    c = client(url)
    want = expected_reply(model, tok, MSGS, 12)
    r = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == len(
        tok.encode(tok.render_chat(MSGS, add_generation_prompt=True)))

    chunks = list(c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == want
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    # the same prompt again: its K/V were still in the first request's slot (all but positions 0 and the last)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 2
    # another user's salt: nothing of the cached conversation is reused (nor revealed by cached_tokens)
    salted = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2, temperature=0,
                                       extra_body={"cache_salt": "another-user"})
    assert salted.usage.prompt_tokens_details.cached_tokens == 0

    with httpx.stream("POST", url + "/v1/chat/completions", json={
            "model": MODEL, "messages": MSGS, "max_tokens": 4, "temperature": 0, "stream": True}) as resp:
        lines = [ln for ln in resp.iter_lines() if ln]
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_n_choices_equal_separate_seeded_requests(server):
    """n=3 samples: choice i is the request with seed + i (seeded sampling does not depend on the batch), in the
    non-streaming and streaming chat API and in completions; usage counts every choice's tokens."""
    url, _, tok, _ = server
    c = client(url)
    kw = dict(model=MODEL, messages=MSGS, max_tokens=8, temperature=1.0, top_p=0.9)
    alone = [c.chat.completions.create(seed=5 + i, **kw).choices[0].message.content for i in range(3)]
    assert len(set(alone)) > 1
    r = c.chat.completions.create(seed=5, n=3, **kw)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert [ch.message.content for ch in r.choices] == alone
    assert r.usage.completion_tokens == 24 and all(ch.finish_reason == "length" for ch in r.choices)

    texts, finishes = ["", "", ""], [None, None, None]
    chunks = list(c.chat.completions.create(seed=5, n=3, stream=True, stream_options={"include_usage": True}, **kw))
    for ch in chunks:
        for x in ch.choices:
            texts[x.index] += x.delta.content or ""
            if x.finish_reason:
                assert finishes[x.index] is None
                finishes[x.index] = x.finish_reason
    assert texts == alone and finishes == ["length"] * 3 and chunks[-1].usage.completion_tokens == 24

    prompt = "Fever of 39C and a stiff neck:"
    one = [c.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=1.0, seed=11 + i)
           .choices[0].text for i in range(2)]
    both = c.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=1.0, seed=11, n=2)
    assert [ch.text for ch in both.choices] == one and [ch.index for ch in both.choices] == [0, 1]
    bad = httpx.post(url + "/v1/chat/completions", json={**kw, "n": 17})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "n"


def test_logprobs_and_top_logprobs(server):
    """Greedy: each token is its step's most likely one, so it heads its own top_logprobs with the same log-prob;
    the log-probs equal a full forward's; the legacy completions API gives {token: log-prob} maps."""
    url, model, tok, _ = server
    c = client(url)
    r = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=5, temperature=0, logprobs=True,
                                  top_logprobs=3)
    items = r.choices[0].logprobs.content
    assert len(items) == 5 and all(len(it.top_logprobs) == 3 for it in items)
    for it in items:
        assert it.top_logprobs[0].token == it.token and abs(it.top_logprobs[0].logprob - it.logprob) < 1e-6
        assert it.top_logprobs[0].logprob >= it.top_logprobs[1].logprob >= it.top_logprobs[2].logprob
    ids = tok.encode(tok.render_chat(MSGS, add_generation_prompt=True))
    out = generate(model, torch.tensor([ids]), 5)[0].tolist()
    with torch.no_grad():
        lsm = model(torch.tensor([ids + out])).logits[0].log_softmax(-1)
    assert all(abs(it.logprob - lsm[len(ids) - 1 + j, t].item()) < 1e-4 for j, (it, t) in enumerate(zip(items, out)))
    chunks = list(c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=5, temperature=0, logprobs=True,
                                            top_logprobs=2, stream=True))
    streamed = [it for ch in chunks if ch.choices and ch.choices[0].logprobs for it in ch.choices[0].logprobs.content]
    assert [it.token for it in streamed] == [it.token for it in items]
    assert all(len(it.top_logprobs) == 2 for it in streamed)
    r = c.completions.create(model=MODEL, prompt="Aspirin dose", max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.top_logprobs) == 3 and all(len(m) <= 2 for m in lp.top_logprobs)
    assert all(abs(max(m.values()) - v) < 1e-6 for m, v in zip(lp.top_logprobs, lp.token_logprobs))


def test_stop_and_max_tokens(server):
    url, model, tok, _ = server
    c = client(url)
    full = expected_reply(model, tok, MSGS, 40)
    stop = full[10:13]
    r = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].message.content == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    r = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    r = c.completions.create(model=MODEL, prompt="Aspirin dose", max_tokens=5, temperature=0)
    want = tok.decode(generate(model, torch.tensor([tok.encode("Aspirin dose")]), 5)[0].tolist(),
                      skip_special_tokens=True)
    assert r.choices[0].text == want and r.usage.completion_tokens == 5


def test_errors_are_4xx_with_message_and_server_survives(server):
    url, *_ = server
    c = client(url)
    r = httpx.post(url + "/v1/chat/completions", content=b'{"model": "tiny-med", "messages": [',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": MSGS, "temperature": "hot"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    assert "temperature" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "doctor",
                                                                                    "content": "x"}]})
    assert r.status_code == 400 and "messages.0.role" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": MSGS, "top_logprobs": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": MSGS, "logprobs": True,
                                                       "top_logprobs": 21})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=10**9)
    with pytest.raises(openai.BadRequestError, match="context"):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 5000}], max_tokens=4)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.chat.completions.create(model="gpt-4", messages=MSGS, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="messages"):
        c.chat.completions.create(model=MODEL, messages=[], max_tokens=4)
    r = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


@pytest.mark.parametrize("n", [1, 2])
def test_disconnect_mid_stream_frees_the_slot(server, n):
    url, *_ = server
    cancelled0 = metric(url, "angelmed_requests_cancelled_total")
    with httpx.stream("POST", url + "/v1/chat/completions", json={
            "model": MODEL, "messages": MSGS, "max_tokens": 4000, "temperature": 0, "stream": True, "n": n}) as resp:
        it = resp.iter_lines()
        got = [next(it) for _ in range(6)]
        assert any(g.startswith("data: ") for g in got)
        assert metric(url, "angelmed_active_slots") == n
    deadline = time.monotonic() + 10
    while (metric(url, "angelmed_active_slots") != 0
           or metric(url, "angelmed_requests_cancelled_total") < cancelled0 + n):
        assert time.monotonic() < deadline, httpx.get(url + "/metrics").text
        time.sleep(0.05)
    text = httpx.get(url + "/metrics").text
    assert "angelmed_generated_tokens_total" in text and "angelmed_queue_depth 0" in text


def test_api_key_queue_full_and_safety_layer(tiny_dir, monkeypatch):
    # a stand-in SafetyGuard with the agreed interface (the real one is angelmed.safety)
    class FakeGuard:
        def __init__(self, enabled=True):
            self.enabled = enabled

        def guidance_suffix(self, user_text, reply_so_far):
            return "\n\n[see a doctor]" if "[see a doctor]" not in reply_so_far else ""

        def ensure_guidance(self, user_text, reply):
            return reply + self.guidance_suffix(user_text, reply)

    monkeypatch.setitem(sys.modules, "angelmed.safety", types.SimpleNamespace(SafetyGuard=FakeGuard))
    model = load_model(tiny_dir, dtype="float32")
    tok = make_tokenizer()
    engine = Engine(model, tokenizer=tok, max_batch=1, max_seq_len=4096, max_queue=1)
    app = create_app(engine, tok, ServerConfig(served_model_name=MODEL, api_key="sekrit", sampling_defaults={}))
    with running_server(app) as url:
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").models.list()
        c = client(url, api_key="sekrit")
        want = expected_reply(model, tok, MSGS, 6)
        r = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=6, temperature=0)
        assert r.choices[0].message.content == want + "\n\n[see a doctor]"
        chunks = list(c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=6, temperature=0,
                                                stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want + "\n\n[see a doctor]"
        # one slot busy + one request queued = full: the next request is refused with 429
        h1 = engine.submit(GenerationRequest([1, 2, 3], max_tokens=3000, stop_ids=[]))
        while not (engine.slots[0] is not None and not engine._pending):
            time.sleep(0.01)
        h2 = engine.submit(GenerationRequest([1, 2, 3], max_tokens=3000, stop_ids=[]))
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2)
        engine.cancel(h1.request_id)
        engine.cancel(h2.request_id)
        assert h1.result(10).finish_reason == h2.result(10).finish_reason == "cancelled"
        r = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2, temperature=0)
        assert r.usage.completion_tokens == 2


def test_shutdown_drains_running_streams(tiny_dir):
    model = load_model(tiny_dir, dtype="float32")
    tok = make_tokenizer()
    engine = Engine(model, tokenizer=tok, max_batch=2, max_seq_len=4096)
    app = create_app(engine, tok, ServerConfig(served_model_name=MODEL, safety=False, sampling_defaults={}))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    with httpx.stream("POST", url + "/v1/chat/completions", json={
            "model": MODEL, "messages": MSGS, "max_tokens": 300, "temperature": 0, "stream": True}) as resp:
        it = resp.iter_lines()
        next(it)
        server.should_exit = True  # what SIGTERM does: stop accepting, let open responses finish
        lines = [ln for ln in it if ln]
    assert lines[-1] == "data: [DONE]"
    finish = [json.loads(ln[6:])["choices"][0]["finish_reason"] for ln in lines[:-1]]
    assert finish[-1] == "length"
    thread.join(timeout=20)
    assert not thread.is_alive() and not engine.running
    assert engine.metrics.requests_finished == 1 and engine.metrics.requests_cancelled == 0


def test_cli_prints_vllm_and_sglang_commands(tiny_dir, capsys):
    from angelmed.serve.cli import main

    assert main([str(tiny_dir), "--backend", "vllm", "--served-model-name", "AntAngelMed", "--port", "9000",
                 "--max-seq-len", "4096", "--api-key", "s3cret", "--max-prefill-tokens", "2048"]) == 0
    out = capsys.readouterr()
    cmd = out.out.strip().split()
    assert cmd[cmd.index("--max-num-batched-tokens") + 1] == "2048"
    assert cmd[:3] == ["vllm", "serve", str(tiny_dir.resolve())] and "--trust-remote-code" in cmd
    assert cmd[cmd.index("--served-model-name") + 1] == "AntAngelMed" and cmd[cmd.index("--port") + 1] == "9000"
    assert cmd[cmd.index("--max-model-len") + 1] == "4096" and "s3cret" not in out.out
    assert "trust-remote-code needs them" in out.err  # the tiny dir has no remote-code modules
    assert main([str(tiny_dir), "--backend", "sglang", "--draft", "mtp", "--spec-tokens", "2",
                 "--max-prefill-tokens", "2048"]) == 0
    cmd = capsys.readouterr().out.split()
    assert cmd[cmd.index("--chunked-prefill-size") + 1] == "2048"
    assert cmd[:3] == ["python", "-m", "sglang.launch_server"] and "--trust-remote-code" in cmd
    assert cmd[cmd.index("--model-path") + 1] == str(tiny_dir.resolve())
    assert cmd[cmd.index("--speculative-algorithm") + 1] == "NEXTN"
    assert cmd[cmd.index("--speculative-num-draft-tokens") + 1] == "3"
    assert main([str(tiny_dir), "--backend", "vllm", "--quantize", "int8"]) == 0
    out = capsys.readouterr()
    assert "int8" not in out.out and "load-time mode" in out.err  # not passed on; said why
    assert main([str(tiny_dir), "--print-only"]) == 0 and "native server" in capsys.readouterr().out


def test_terminal_chat_streams_with_advisory(tmp_path, monkeypatch, capsys):
    import builtins

    model = tiny_model(0)
    with torch.no_grad():  # speak lowercase letters, so the streamed reply is visible text
        keep = model.lm_head.weight[97:123] * 20
        model.lm_head.weight.zero_()
        model.lm_head.weight[97:123] = keep
    tiny_dir = save_model(model, tmp_path / "letters")

    import angelmed.infer.backends as backends
    from angelmed.serve.cli import chat

    monkeypatch.setattr(backends, "load_tokenizer", lambda d: make_tokenizer())
    answers = iter(["Is 39C a fever?", "And 40C?", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda *a: next(answers))
    assert chat([str(tiny_dir), "--max-tokens", "5", "--temperature", "0", "--no-safety",
                 "--max-seq-len", "256"]) == 0
    out = capsys.readouterr().out
    tok = make_tokenizer()
    ids = tok.encode(tok.render_chat([{"role": "user", "content": "Is 39C a fever?"}], add_generation_prompt=True))
    # chat uses the recommended defaults (spec §11) for what it is not told: repetition_penalty 1.05
    eng = Engine(load_model(tiny_dir, dtype="float32"), tokenizer=tok, max_batch=1, max_seq_len=256)
    reply = eng.generate([GenerationRequest(ids, max_tokens=5, repetition_penalty=1.05)])[0].text
    assert "Medical advisory" in out and "angelmed>" in out
    shown = "".join(ch for ch in reply if ch.isprintable() and ch != "\ufffd")
    assert shown and shown in out
    # after each reply: its speed, and the second turn reuses the first turn's K/V
    stats = re.findall(r"5 tokens, [\d.]+ tok/s; prompt (\d+) tokens, (\d+) from the previous turn's cache", out)
    assert len(stats) == 2 and stats[0][1] == "0" and 0 < int(stats[1][1]) < int(stats[1][0])


def test_serve_without_tokenizer_exits_with_one_line(tmp_path, capsys):
    from angelmed.serve.cli import main

    save_model(tiny_model(), tmp_path / "m")  # weights and config, no tokenizer.json
    assert main([str(tmp_path / "m"), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.json" in err and "Traceback" not in err
