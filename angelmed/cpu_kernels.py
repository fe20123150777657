"""A C++ kernel for the routed experts in fp32 on CPU while each expert gets few rows (decode).

At decode an expert multiplies the few rows routed to it, and one core of an AVX2 EPYC runs such GEMMs far below
its memory bandwidth: MKL streams a 1536x512 fp32 weight at 6.7 GB/s for 2 rows and 4.6 GB/s for 16, oneDNN with
the weight packed ahead at 10.8 and 5.5, where a plain read streams 14-16 GB/s. `routed_experts`
(csrc/expert_rows.cpp) groups a layer's (token, expert) pairs by expert, reads each expert weight row once, straight
from memory, dots it with all of the expert's inputs, 1-4 at a time, and sums each token's experts back: base-100m's
MoE layers at 16 tokens (64 pairs on 24 experts) run 2.3x faster than grouped_mm's per-expert GEMMs, and the gain
fades towards 20 rows an expert (benchmarks/bench_expert_rows.py). A token's result depends on its own routing only.

`enable()` builds it and hands it to the model (model.CPU_ROWS_KERNEL; the engine calls it for fp32 CPU models).
Built with torch.utils.cpp_extension on first use (a C++ compiler and ninja; about 16 s on 2 cores, once per CPU
model, as it targets this CPU's vector instructions) and cached under ~/.cache/angelmed/extensions. Where it cannot
be built, one warning says why and the experts run the GEMM path.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import threading
from pathlib import Path

import torch
from torch import Tensor

from angelmed.paths import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "expert_rows.cpp"
_lock = threading.Lock()
_state: dict[str, bool] = {}


def _cpu_tag() -> str:
    """Names the build after this CPU's model and instruction sets: it is compiled with -march=native."""
    ident = platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        ident += "".join(sorted({ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags")}))
    except OSError:
        ident += platform.processor()
    return hashlib.sha256(ident.encode()).hexdigest()[:10]


def enable() -> bool:
    """Builds the kernel on the first call (about 16 s once, then cached) and hands it to the model's fp32 CPU
    expert path; whether it is on."""
    if "ok" not in _state:
        with _lock:
            if "ok" not in _state:
                _state["ok"] = _build()
                if _state["ok"]:
                    import angelmed.model

                    angelmed.model.CPU_ROWS_KERNEL = routed_experts
    return _state["ok"]


def _build() -> bool:
    from torch.utils import cpp_extension

    name = f"angelmed_expert_rows_{_cpu_tag()}"
    if shutil.which("ninja") is None:  # the pip wheel's binary, outside PATH when the venv is not activated
        with contextlib.suppress(ImportError):
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    build_dir = cache_root() / "extensions" / name
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(name, [str(SOURCE)], extra_cflags=["-O3", "-march=native"],
                           build_directory=str(build_dir), is_python_module=False)
    except Exception as e:  # no compiler, no ninja, an unwritable cache: the GEMM path still runs
        log.warning("fp32 expert kernel unavailable (%s: %s); few-row experts on CPU use GEMMs, slower at decode",
                    type(e).__name__, str(e).strip().splitlines()[-1] if str(e).strip() else "")
        return False
    # its shape for torch.compile: a compiled graph calls the kernel directly, no Python between
    torch.library.register_fake("angelmed_cpu::routed_experts")(lambda x_TD, *rest: torch.empty_like(x_TD))
    return True


def routed_experts(x_TD: Tensor, idx_Tk: Tensor, w_Tk: Tensor, gate_EID: Tensor, up_EID: Tensor,
                   down_EDI: Tensor) -> Tensor:
    """The routed experts' output (fp32, like `model.grouped_experts`): sum_j w[t, j] * expert idx[t, j] (x[t]),
    summed in j order, so a token's result depends on its own routing only. fp32 contiguous CPU tensors; call
    `enable()` first."""
    return torch.ops.angelmed_cpu.routed_experts(x_TD.contiguous(), idx_Tk.contiguous(), w_Tk.float().contiguous(),
                                                 gate_EID, up_EID, down_EDI)
