"""An offline, deterministic OpenAI-compatible STUB for tests and CPU smoke runs. IT IS NOT A REAL JUDGE.

It answers /v1/chat/completions with crude fixed rules so the evaluation plumbing (generation, grading, parsing,
retries, caching, scoring) can run end to end without a network or a model:
  - HealthBench grader prompts ("# Rubric item"): criteria_met = some word of 5+ letters in the criterion also
    occurs in the graded assistant reply (case-insensitive). Replies in a ```json fence.
  - CMB-Clin judge prompts ("[待评回答]"): each rating = 1 + round(4 * share of the reference's distinct characters
    that occur in the answer).
  - Anything else is a candidate request: the reply is `candidate_reply` (a fixed text).
Model names switch on failure modes for tests: "stub-garbage" (never JSON), "stub-flaky" (garbage on the first ask of
each prompt), "stub-error-once" (HTTP 500 on the first ask of each prompt).
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import Counter

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

STUB_CANDIDATE_REPLY = ("This is a stub reply, not medical advice. Please see a doctor if your symptoms get worse, "
                        "and seek emergency care for severe pain or trouble breathing.")
_WORD = re.compile(r"[A-Za-z]{5,}")


def stub_verdict(criterion: str, reply: str) -> bool:
    """The stub's HealthBench rule (exposed so tests can state expectations without the server)."""
    reply_lower = reply.lower()
    return any(word.lower() in reply_lower for word in _WORD.findall(criterion))


def stub_cmb_ratings(reference: str, answer: str) -> dict[str, int]:
    ref_chars = set(reference) - set(" \n\t")
    share = len(ref_chars & set(answer)) / len(ref_chars) if ref_chars else 0.0
    value = 1 + round(4 * share)
    return {"fluency": value, "relevance": value, "completeness": value, "proficiency": value}


def _grade_healthbench(prompt: str) -> str:
    item = re.search(r"# Rubric item\n\[(-?[\d.]+)\] (.*?)\n\n# Instructions", prompt, re.S)
    conversation = prompt.split("# Conversation\n", 1)[1].split("\n\n# Rubric item", 1)[0]
    reply = conversation.rsplit("\n\nassistant: ", 1)[-1]
    met = stub_verdict(item.group(2), reply) if item else False
    body = json.dumps({"explanation": "stub rule: keyword overlap (not a real judge)", "criteria_met": met})
    return f"```json\n{body}\n```"


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0].strip()


def _grade_cmb(prompt: str) -> str:
    ratings = stub_cmb_ratings(_between(prompt, "[参考答案]", "[/参考答案]"), _between(prompt, "[待评回答]", "[/待评回答]"))
    return json.dumps(ratings, ensure_ascii=False)


def make_stub_app(candidate_reply: str = STUB_CANDIDATE_REPLY):
    app = FastAPI(title="angelmed OpenAI-compatible stub (not a real model or judge)")
    app.state.calls = Counter()  # "judge" / "cmb_judge" / "candidate" / "<model>" -> count
    seen: Counter = Counter()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "stub-candidate", "object": "model", "owned_by": "stub"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        model = body.get("model", "")
        prompt = body["messages"][-1]["content"]
        seen[(model, prompt)] += 1
        first_ask = seen[(model, prompt)] == 1
        app.state.calls[model] += 1
        if model == "stub-error-once" and first_ask:
            return JSONResponse({"error": {"message": "stub transient failure"}}, status_code=500)
        if "# Rubric item" in prompt:
            app.state.calls["judge"] += 1
            content = _grade_healthbench(prompt)
        elif "[待评回答]" in prompt:
            app.state.calls["cmb_judge"] += 1
            content = _grade_cmb(prompt)
        else:
            app.state.calls["candidate"] += 1
            content = candidate_reply
        if model == "stub-garbage" or (model == "stub-flaky" and first_ask):
            content = "I think it is met."  # not JSON
        return {
            "id": "stub", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }

    return app


class StubServer:
    """Runs an ASGI app with uvicorn on 127.0.0.1 (free port) in a daemon thread: `with StubServer(app) as s:`."""

    def __init__(self, app):
        self.app = app
        self.base_url = ""

    def __enter__(self) -> "StubServer":
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("stub server did not start")
            time.sleep(0.02)
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
