"""fp32 on CPU: the C++ few-rows kernels (angelmed/cpu_kernels.py) vs the GEMMs they replace.

Times one MoE layer's routed experts (group the (token, expert) pairs by expert, run every expert's SwiGLU, weight
and sum back per token): `cpu_kernels.routed_experts` against `model.grouped_experts` (the same with grouped_mm's
per-expert GEMMs), same weights and routing, at several token counts. `--linears`: each distinct linear shape of
the preset (attention, dense MLP, shared expert, output head): `cpu_kernels.rows_linear` against F.linear (MKL);
with `--weights bfloat16`, the kernel reading bf16 weights against what the model does past its bf16 limit
(`model.CPU_ROWS_BF16_ROWS`): F.linear on a widened fp32 copy.
Each timing cycles through enough weights (distinct copies, 80 MB or more) that they stream from memory, as in
decode. Also reads the same weights with `sum()` for a bandwidth reference.

    python benchmarks/bench_expert_rows.py [--presets small base-100m] [--tokens 1 4 16 64 128] [--threads 1]
                                           [--linears [--weights bfloat16]]

Last line: one JSON object with every number.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from _common import emit, setup
import angelmed.model as M
from angelmed import cpu_kernels
from angelmed.config import get_preset


def median_ms(fn, reps: int = 15) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[reps // 2] * 1e3


def time_linears(preset: str, cfg, tokens: list[int], g: torch.Generator, dtype: torch.dtype) -> list[dict]:
    D, H = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    shapes = {(qkv, D), (D, H), (cfg.intermediate_size, D), (D, cfg.intermediate_size),
              (cfg.shared_expert_intermediate_size, D), (D, cfg.shared_expert_intermediate_size),
              (cfg.vocab_size, D)}
    rows = []
    for N, K in sorted(shapes):
        ws = [torch.randn(N, K, generator=g).to(dtype)
              for _ in range(max(2, -(-80_000_000 // (N * K * dtype.itemsize))))]
        for T in tokens:
            x = torch.randn(T, K, generator=g)
            with torch.no_grad():
                gemm = median_ms(lambda: [F.linear(x, M.widened(w, x)) for w in ws]) / len(ws)
                kern = median_ms(lambda: [cpu_kernels.rows_linear(x, w) for w in ws]) / len(ws)
                diff = (cpu_kernels.rows_linear(x, ws[0]) - F.linear(x, M.widened(ws[0], x))).abs().max().item()
            rows.append({"preset": preset, "linear": f"{K}->{N}", "weights": str(dtype).removeprefix("torch."),
                         "tokens": T, "gemm_ms": round(gemm, 3),
                         "kernel_ms": round(kern, 3), "speedup": round(gemm / kern, 2), "max_abs_diff": diff})
            base = "F.linear" if dtype == torch.float32 else "widened F.linear"
            print(f"[{preset}] linear {K:5d} -> {N:5d}, {T:4d} rows: {base} {gemm:7.3f} ms, kernel {kern:7.3f} ms: "
                  f"x{gemm / kern:.2f} (max |diff| {diff:.1e})")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["small", "base-100m"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 16, 64, 128])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--linears", action="store_true", help="time the linear layers' shapes instead of the experts")
    ap.add_argument("--weights", default="float32", choices=["float32", "bfloat16"],
                    help="--linears: the weights' dtype (activations stay fp32)")
    args = ap.parse_args()
    setup(args.threads)
    t = time.perf_counter()
    if not cpu_kernels.enable():
        raise SystemExit("the expert kernel did not build (see the warning above)")
    print(f"kernel ready in {time.perf_counter() - t:.1f} s (a first build compiles it; later runs load it)")
    results = {"threads": torch.get_num_threads(), "runs": []}
    g = torch.Generator().manual_seed(0)
    for preset in args.presets:
        cfg = get_preset(preset)
        if args.linears:
            results["runs"] += time_linears(preset, cfg, args.tokens, g, getattr(torch, args.weights))
            continue
        E, D, I, k = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
        layer_bytes = 3 * E * I * D * 4
        layers = [[torch.randn(*s, generator=g) * 0.05 for s in ((E, I, D), (E, I, D), (E, D, I))]
                  for _ in range(max(2, -(-80_000_000 // layer_bytes)))]
        read = median_ms(lambda: [w.sum() for ws in layers for w in ws]) / len(layers)
        print(f"[{preset}] {E} experts of {D}x{I}, top-{k}: a layer's experts ({layer_bytes / 1e6:.1f} MB) read "
              f"in {read:.3f} ms ({layer_bytes / read / 1e6:.1f} GB/s)")
        for T in args.tokens:
            x = torch.randn(T, D, generator=g)
            idx = torch.rand(T, E, generator=g).argsort(1)[:, :k]
            w = torch.rand(T, k, generator=g)
            timed = {}
            with torch.no_grad():
                for name, fn in (("gemm", M.grouped_experts), ("kernel", cpu_kernels.routed_experts)):
                    timed[name] = median_ms(lambda: [fn(x, idx, w, *ws) for ws in layers]) / len(layers)
                    timed[name + "_out"] = fn(x, idx, w, *layers[0])
            diff = (timed["kernel_out"] - timed["gemm_out"]).abs().max().item()
            row = {"preset": preset, "tokens": T, "rows_per_expert": round(T * k / E, 2),
                   "gemm_ms": round(timed["gemm"], 3), "kernel_ms": round(timed["kernel"], 3),
                   "speedup": round(timed["gemm"] / timed["kernel"], 2), "max_abs_diff": diff,
                   "read_ms": round(read, 3)}
            results["runs"].append(row)
            print(f"[{preset}] {T:4d} tokens ({row['rows_per_expert']:5.1f} rows an expert): GEMMs "
                  f"{row['gemm_ms']:7.3f} ms, kernel {row['kernel_ms']:7.3f} ms a layer: x{row['speedup']:.2f} "
                  f"(max |diff| {diff:.1e})")
    emit(results)


if __name__ == "__main__":
    main()
