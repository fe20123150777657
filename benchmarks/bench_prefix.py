"""Multi-turn chat with and without prefix reuse: each turn resends the whole conversation.

C conversations run side by side for N turns. Every conversation shares a system prompt; each turn appends
the previous reply and a new user message, so the prompt grows while only its tail is new. The engine with
prefix reuse (the default) prefills only what the slot's cache does not hold; the baseline (`prefix_reuse=False`)
prefills the whole history every turn. Both run the same turns on the same weights, alternately, best of
`--reps`. Greedy outputs are checked to be identical.

    python benchmarks/bench_prefix.py [--preset small] [--conversations 4] [--turns 6] [--mtp-draft]

--mtp-draft: both engines decode speculatively with the model's MTP layer (k=3); with reuse the drafter's own
cached entries are carried over too.

Reports the wall time of the whole session, the mean time to first token (submit -> first delta) and the
share of prompt tokens served from cache. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from _common import setup
from angelmed.config import get_preset
from angelmed.infer.engine import Engine, GenerationRequest
from angelmed.infer.speculative import MTPDrafter
from angelmed.model import Transformer


def session(engine: Engine, system: list[int], users: list[list[list[int]]], reply_tokens: int):
    """Run every turn of every conversation; returns (seconds, mean TTFT seconds, replies per conversation)."""
    C = len(users)
    history = [list(system) for _ in range(C)]
    replies: list[list[list[int]]] = [[] for _ in range(C)]
    ttfts: list[float] = []
    t_start = time.perf_counter()
    for turn in range(len(users[0])):
        first: dict[str, float] = {}
        handles = []
        t_submit = time.perf_counter()
        for c in range(C):
            history[c] += users[c][turn]
            req = GenerationRequest(list(history[c]), max_tokens=reply_tokens, stop_ids=[])
            handles.append(engine.submit(req, lambda d, rid=req.request_id: first.setdefault(rid, time.perf_counter())))
        while engine.has_work():
            engine.step()
        for c, h in enumerate(handles):
            out = h.result().token_ids
            replies[c].append(out)
            history[c] += out
            ttfts.append(first[h.request_id] - t_submit)
    return time.perf_counter() - t_start, sum(ttfts) / len(ttfts), replies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--system-tokens", type=int, default=256)
    ap.add_argument("--user-tokens", type=int, default=64)
    ap.add_argument("--reply-tokens", type=int, default=48)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mtp-draft", action="store_true", help="speculative decoding with the MTP layer, both sides")
    args = ap.parse_args()
    setup(args.threads)
    cfg = get_preset(args.preset)
    model = Transformer(cfg).init_weights(0).eval()
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    system = rand(args.system_tokens)
    users = [[rand(args.user_tokens) for _ in range(args.turns)] for _ in range(args.conversations)]
    max_len = args.system_tokens + args.turns * (args.user_tokens + args.reply_tokens) + 8
    modes = {"reuse": True, "full_prefill": False}
    best = {name: (float("inf"), 0.0) for name in modes}
    replies, metrics = {}, {}
    for rep in range(args.reps + 1):  # the first pass warms up
        for name, reuse in modes.items():  # a new engine per session: every session starts with empty slots
            draft = MTPDrafter(model) if args.mtp_draft else None
            eng = Engine(model, max_batch=args.conversations, max_seq_len=max_len, prefix_reuse=reuse, draft=draft)
            wall, ttft, replies[name] = session(eng, system, users, args.reply_tokens)
            metrics[name] = eng.metrics
            if rep and wall < best[name][0]:
                best[name] = (wall, ttft)
    assert replies["reuse"] == replies["full_prefill"], "greedy replies differ with prefix reuse"
    m = metrics["reuse"]
    cached_share = m.prompt_tokens_cached / m.prompt_tokens
    (w_r, t_r), (w_f, t_f) = best["reuse"], best["full_prefill"]
    print(f"[{args.preset}{', MTP draft' if args.mtp_draft else ''}] {args.conversations} conversations x "
          f"{args.turns} turns, system {args.system_tokens}, "
          f"user {args.user_tokens}, reply {args.reply_tokens} tokens; {m.prompt_tokens} prompt tokens, "
          f"{cached_share:.1%} served from cache")
    print(f"  session wall: reuse {w_r:.2f} s vs full prefill {w_f:.2f} s (x{w_f / w_r:.2f})")
    print(f"  mean time to first token: reuse {t_r * 1e3:.0f} ms vs full prefill {t_f * 1e3:.0f} ms "
          f"(x{t_f / t_r:.2f})")
    print(json.dumps({"preset": args.preset, "mtp_draft": args.mtp_draft, "conversations": args.conversations,
                      "turns": args.turns,
                      "prompt_tokens": m.prompt_tokens, "cached_share": round(cached_share, 3),
                      "wall_s_reuse": round(w_r, 3), "wall_s_full_prefill": round(w_f, 3),
                      "speedup_wall": round(w_f / w_r, 2), "ttft_ms_reuse": round(t_r * 1e3, 1),
                      "ttft_ms_full_prefill": round(t_f * 1e3, 1), "speedup_ttft": round(t_f / t_r, 2),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
