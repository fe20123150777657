"""Attention over a KV cache: `grouped_query_attention` (each kv head's query heads folded into its query rows)
vs `scaled_dot_product_attention(..., enable_gqa=True)` on the same tensors, at decode (1 query per row) and
speculative-verify (k+1 queries per row) shapes. Outputs are checked to agree first.

    python benchmarks/bench_attention.py [--batch 32] [--cache 320] [--heads 6 2] [--head-dim 32] [--threads 1]

Last line: one JSON object with every timing (us per call) and the ratios.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from _common import emit, setup, timed
from angelmed.model import grouped_query_attention


def case(B: int, T: int, S: int, Hq: int, Hk: int, d: int, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, T, d, generator=g).to(dtype)
    k, v = (torch.randn(B, Hk, S, d, generator=g).to(dtype) for _ in range(2))
    # rows at different lengths, as in a batch of requests: row b sees cache slots <= its positions
    pos_BT = torch.randint(S // 3, S - T, (B, 1), generator=g) + torch.arange(T)
    mask = (torch.arange(S)[None, None, :] <= pos_BT[:, :, None])[:, None]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    err = (grouped_query_attention(q, k, v, mask).float() - ref.float()).abs().max().item()
    assert err < (1e-5 if dtype == torch.float32 else 2e-2), f"outputs differ by {err}"
    n = 50  # calls per timing: one call is well under a millisecond

    def sdpa():
        for _ in range(n):
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def folded():
        for _ in range(n):
            grouped_query_attention(q, k, v, mask)

    t_sdpa, t_fold = timed(sdpa, repeat=5) / n, timed(folded, repeat=5) / n
    return {"batch": B, "queries": T, "cache": S, "dtype": str(dtype).removeprefix("torch."),
            "sdpa_gqa_us": round(t_sdpa * 1e6, 1), "folded_us": round(t_fold * 1e6, 1),
            "speedup": round(t_sdpa / t_fold, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--cache", type=int, default=320, help="cache positions attended (the engine's cropped view)")
    ap.add_argument("--heads", type=int, nargs=2, default=[6, 2], metavar=("Q", "KV"))
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 4, 16],
                    help="per row: 1 decode, k+1 verify, more: a prefill chunk (kept on enable_gqa)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    setup(args.threads)
    rows = []
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            for T in args.queries:
                r = case(args.batch, T, args.cache, *args.heads, args.head_dim, dtype)
                rows.append(r)
                print(f"{r['dtype']:>8} batch {r['batch']} x {T} queries over {r['cache']} positions: enable_gqa "
                      f"{r['sdpa_gqa_us']:7.1f} us, folded {r['folded_us']:7.1f} us (x{r['speedup']:.2f})", flush=True)
    emit({"threads": args.threads, "heads": args.heads, "head_dim": args.head_dim, "results": rows})


if __name__ == "__main__":
    main()
