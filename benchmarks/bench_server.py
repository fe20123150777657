"""Server throughput and latency: 16 concurrent streaming clients vs the same requests one at a time.

Starts the angelmed server (random-init preset, or `--model DIR` with its tokenizer) in a child process on
127.0.0.1, then drives /v1/chat/completions with SSE streaming from an asyncio client. Reports completion
tokens/s, request latency p50/p99 and time-to-first-token p50 for both modes.

    python benchmarks/bench_server.py [--preset small] [--clients 16] [--max-tokens 64]

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import socket
import statistics
import time

from _common import setup  # noqa: E402  (tcmalloc re-exec, threads)

if __name__ == "__main__":
    setup(1)

MODEL_NAME = "bench"


class ByteTokenizer:
    """Stand-in when no tokenizer files are available: bytes for ids < 256, Ling role markers as text."""
    stop_ids: list[int] = []

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(t for t in ids if t < 256).decode(errors="replace")

    def render_chat(self, messages, tools=None, add_generation_prompt=False) -> str:
        roles = {"system": "SYSTEM", "user": "HUMAN", "assistant": "ASSISTANT", "tool": "OBSERVATION"}
        out = "".join(f"<role>{roles[m['role']]}</role>{m['content']}<|role_end|>" for m in messages)
        return out + ("<role>ASSISTANT</role>" if add_generation_prompt else "")


def serve(port: int, preset: str, model_dir: str | None, max_batch: int, threads: int) -> None:
    import torch
    import uvicorn

    from angelmed.infer.engine import Engine
    from angelmed.serve.app import ServerConfig, create_app

    torch.set_num_threads(threads)
    if model_dir:
        from angelmed.checkpoint import load_model
        from angelmed.infer.backends import load_tokenizer
        model, tok = load_model(model_dir, dtype="float32"), load_tokenizer(model_dir)
    else:
        from angelmed.config import get_preset
        from angelmed.model import Transformer
        model, tok = Transformer(get_preset(preset)).init_weights(0).eval(), ByteTokenizer()
    engine = Engine(model, tokenizer=tok, max_batch=max_batch, max_seq_len=1024, stop_ids=[])
    app = create_app(engine, tok, ServerConfig(served_model_name=MODEL_NAME, safety=False, sampling_defaults={}))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


async def one_request(client, url: str, i: int, max_tokens: int) -> dict:
    body = {"model": MODEL_NAME, "stream": True, "max_tokens": max_tokens, "temperature": 0.7, "seed": i,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"Patient {i}: persistent cough for three weeks, no fever."}]}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("choices") and ttft is None:
                ttft = time.perf_counter() - t0
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
    return {"latency": time.perf_counter() - t0, "ttft": ttft or 0.0, "tokens": tokens}


async def drive(url: str, n: int, max_tokens: int, concurrent: bool) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        if concurrent:
            rows = await asyncio.gather(*[one_request(client, url, i, max_tokens) for i in range(n)])
        else:
            rows = [await one_request(client, url, i, max_tokens) for i in range(n)]
        wall = time.perf_counter() - t0
    lat = sorted(r["latency"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    return {"requests": n, "completion_tokens": tokens, "wall_s": round(wall, 3), "tok_s": round(tokens / wall, 1),
            "latency_p50_s": round(statistics.median(lat), 3),
            "latency_p99_s": round(lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))], 3),
            "ttft_p50_s": round(statistics.median(r["ttft"] for r in rows), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--model", default=None)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = mp.get_context("spawn").Process(
        target=serve, args=(port, args.preset, args.model, args.clients, args.threads), daemon=True)
    proc.start()
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or not proc.is_alive():
                raise SystemExit("server did not come up")
            time.sleep(0.2)
        asyncio.run(drive(url, 2, 4, concurrent=False))  # warm-up
        seq = asyncio.run(drive(url, args.clients, args.max_tokens, concurrent=False))
        con = asyncio.run(drive(url, args.clients, args.max_tokens, concurrent=True))
    finally:
        proc.terminate()
        proc.join(10)
    print(f"model {args.model or args.preset + ' (random init)'}, {args.clients} requests x {args.max_tokens} tokens")
    for name, r in (("one at a time", seq), (f"{args.clients} concurrent", con)):
        print(f"{name:>14}: {r['tok_s']:8.1f} tok/s | latency p50 {r['latency_p50_s']:.3f}s p99 "
              f"{r['latency_p99_s']:.3f}s | TTFT p50 {r['ttft_p50_s']:.3f}s")
    print(f"throughput gain from continuous batching: x{con['tok_s'] / seq['tok_s']:.2f}")
    print(json.dumps({"model": args.model or args.preset, "sequential": seq, "concurrent": con,
                      "throughput_gain": round(con["tok_s"] / seq["tok_s"], 2)}))


if __name__ == "__main__":
    main()
