"""`angelmed speedrun`: the main job. (Foundation stage: build a preset, save, reload, generate.)"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from angelmed import MEDICAL_ADVISORY
from angelmed.checkpoint import load_model, save_model
from angelmed.config import PRESETS, get_preset
from angelmed.infer.generate import generate
from angelmed.model import Transformer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="angelmed speedrun")
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--out", default="runs/demo")
    a = ap.parse_args(argv)
    print(MEDICAL_ADVISORY)
    t0 = time.time()
    model = Transformer(get_preset(a.preset)).init_weights(0)
    out = Path(a.out) / "model"
    save_model(model, out)
    model = load_model(out)
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    new = generate(model, ids, 16)
    print(f"saved and reloaded {a.preset} ({model.config.param_counts()['total']:,} params) at {out}; "
          f"greedy continuation {new[0].tolist()} in {time.time() - t0:.1f}s")
    return 0
