"""Report card of a run directory: report.md + report.html with PNG plots (`angelmed report RUN_DIR`).

Reads what is there and skips the rest:
  <stage>/metrics.jsonl     training curves (one JSON object per line with "step" and numeric metrics)
  <stage>/expert_load.npy   [L_moe, E] routed-token counts or fractions -> heatmap + imbalance
  eval/*.json               results written by `angelmed eval` (healthbench, mcq, cmb_clin)
  speed.json, bench*/*.json speed figures (flat {name: number} or the last-line JSON of a benchmark script)
Speed-like metrics in metrics.jsonl (tokens_per_s, throughput, step_time...) are summarised too.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from angelmed import MEDICAL_ADVISORY

STAGE_ORDER = {"init": -1, "cpt": 0, "sft": 1, "grpo": 2}
KEY_METRICS = ["loss", "lm_loss", "mtp_loss", "heldout_loss", "reward_mean", "heldout_reward", "kl", "entropy",
               "completion_len_mean", "routing_disagree", "grad_norm", "tokens_per_s", "mfu", "expert_maxvio_mean"]
SPEED_KEY = re.compile(r"(tok(en)?s?_per_s|tok/s|throughput|samples_per_s|step_time|ms_per|per_sec)", re.I)
EXTERNAL_LEADERBOARDS = [
    ("MedBench v4", "closed test data, platform-scored", "cmmlu (knowledge QA), cmb_clin (complex reasoning)"),
    ("MedAIBench", "no public methodology or data", "cmmlu, cmb_clin"),
]


# ------------------------------------------------------------------------------------------- document model
@dataclass
class Doc:
    blocks: list[tuple[str, object]] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list[object]]) -> None:
        self.blocks.append(("table", (header, rows)))

    def image(self, relpath: str, alt: str) -> None:
        self.blocks.append(("img", (relpath, alt)))

    def markdown(self) -> str:
        out = []
        for kind, value in self.blocks:
            if kind == "h":
                out.append("#" * value[0] + " " + value[1])
            elif kind == "p":
                out.append(value)
            elif kind == "table":
                header, rows = value
                lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                lines += ["| " + " | ".join(_cell(c).replace("|", "\\|") for c in row) + " |" for row in rows]
                out.append("\n".join(lines))
            elif kind == "img":
                out.append(f"![{value[1]}]({value[0]})")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        body = []
        for kind, value in self.blocks:
            if kind == "h":
                body.append(f"<h{value[0]}>{html.escape(value[1])}</h{value[0]}>")
            elif kind == "p":
                body.append(f"<p>{html.escape(value)}</p>")
            elif kind == "table":
                header, rows = value
                head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
                cells = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in row) + "</tr>"
                                for row in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
            elif kind == "img":
                body.append(f'<img src="{html.escape(value[0])}" alt="{html.escape(value[1])}">')
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
                 "td,th{border:1px solid #ccc;padding:3px 8px}img{max-width:100%}")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def _cell(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


# -------------------------------------------------------------------------------------------------- inputs
def read_metrics_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    rows, bad = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
                    raise ValueError("no numeric 'step'")
                rows.append(row)
            except ValueError as e:
                bad.append(f"{path}:{lineno}: {e}")
    return rows, bad


def _numeric_series(rows: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    series: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                continue
            xs, ys = series.setdefault(key, ([], []))
            xs.append(row["step"])
            ys.append(float(value))
    return series


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------------------ sections
def training_section(doc: Doc, run_dir: Path, fig_dir: Path, speed_rows: list[list[object]], notes: list[str]):
    stages = sorted((p.parent for p in run_dir.glob("*/metrics.jsonl")),
                    key=lambda d: (STAGE_ORDER.get(d.name, 9), d.name))
    if not stages:
        return
    doc.h(2, "Training")
    for stage_dir in stages:
        rows, bad = read_metrics_jsonl(stage_dir / "metrics.jsonl")
        notes.extend(bad)
        series = _numeric_series(rows)
        if not series:
            continue
        shown = [k for k in KEY_METRICS if k in series] or sorted(series)[:9]  # the rest: metrics.jsonl, TensorBoard
        stage = stage_dir.name
        doc.h(3, f"{stage}: {len(rows)} logged steps")
        table = []
        for key, (xs, ys) in sorted(series.items()):
            if key in shown:
                table.append([key, len(ys), ys[0], min(ys), ys[-1]])
            if SPEED_KEY.search(key):
                speed_rows.append([f"{stage}/{key}", sum(ys) / len(ys), ys[-1], "metrics.jsonl"])
        doc.table(["metric", "points", "first", "min", "last"], table)
        plt = _plt()
        keys = shown
        ncols = min(3, len(keys))
        nrows = math.ceil(len(keys) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.0 * nrows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            xs, ys = series[key]
            ax.plot(xs, ys, lw=1.2, marker="o" if len(xs) < 30 else None, ms=3)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        fig.suptitle(f"{stage} training curves")
        fig.tight_layout()
        name = f"curves_{stage}.png"
        fig.savefig(fig_dir / name, dpi=100)
        plt.close(fig)
        doc.image(f"{fig_dir.name}/{name}", f"{stage} training curves")


def expert_load_section(doc: Doc, run_dir: Path, fig_dir: Path, notes: list[str]):
    import numpy as np

    paths = sorted(run_dir.glob("*/expert_load.npy"))
    if not paths:
        return
    doc.h(2, "Expert load")
    for path in paths:
        try:
            load_LE = np.load(path).astype(np.float64)
            if load_LE.ndim != 2:
                raise ValueError(f"expected [L_moe, E], got shape {load_LE.shape}")
        except (OSError, ValueError) as e:
            notes.append(f"{path}: {e}")
            continue
        stage = path.parent.name
        share_LE = load_LE / np.maximum(load_LE.sum(axis=1, keepdims=True), 1e-12)
        max_over_mean_L = share_LE.max(axis=1) * share_LE.shape[1]  # 1.0 = perfectly balanced
        doc.p(f"{stage}: {load_LE.shape[0]} MoE layers x {load_LE.shape[1]} experts. Max/mean expert share per "
              f"layer: mean {max_over_mean_L.mean():.2f}, worst {max_over_mean_L.max():.2f} (1.00 = balanced).")
        plt = _plt()
        fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 2 + 0.08 * load_LE.shape[1])),
                                        min(12.0, max(3.0, 1.5 + 0.25 * load_LE.shape[0]))))
        image = ax.imshow(share_LE * share_LE.shape[1], aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_title(f"{stage}: expert load relative to uniform")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        name = f"expert_load_{stage}.png"
        fig.savefig(fig_dir / name, dpi=100)
        plt.close(fig)
        doc.image(f"{fig_dir.name}/{name}", f"{stage} expert load")


def eval_section(doc: Doc, run_dir: Path, fig_dir: Path, notes: list[str]):
    results = []
    for path in sorted((run_dir / "eval").glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or "benchmark" not in data:
                raise ValueError("no 'benchmark' key")
            results.append((path, data))
        except ValueError as e:
            notes.append(f"{path}: not an eval result ({e})")
    if not results:
        return
    doc.h(2, "Evaluation")
    healthbench = [(p, d) for p, d in results if d["benchmark"] == "healthbench"]
    mcq = [(p, d) for p, d in results if d["benchmark"] == "mcq"]
    cmb = [(p, d) for p, d in results if d["benchmark"] == "cmb_clin"]
    stages = [d for _, d in results if d["benchmark"] == "stage_checks"]
    if stages:
        pipeline_section(doc, stages, fig_dir)
    for path, data in results:
        if data["benchmark"] not in ("healthbench", "mcq", "cmb_clin", "stage_checks"):
            notes.append(f"{path}: unknown benchmark {data['benchmark']!r}, not shown")

    if healthbench:
        doc.h(3, "HealthBench (rubric-graded, higher is better)")
        rows = []
        for path, d in healthbench:
            rows.append([path.name, Path(str(d.get("source", ""))).name, d.get("candidate"), d.get("judge_model"),
                         _pct(d.get("score")), _pct(d.get("score:bootstrap_std")), d.get("n_samples"),
                         d.get("n_excluded_ungraded")])
        doc.table(["file", "data", "candidate", "judge", "score %", "bootstrap std %", "n", "excluded (ungraded)"],
                  rows)
        for path, d in healthbench:
            for title, key in (("theme", "themes"), ("axis", "axes")):
                table = d.get(key) or {}
                if table:
                    doc.p(f"{path.name}: by {title}")
                    doc.table([title, "score %", "bootstrap std %", "n"],
                              [[k, _pct(v["mean"]), _pct(v["bootstrap_std"]), v["n_samples"]]
                               for k, v in table.items()])
            _bar_plot(fig_dir, f"healthbench_themes_{path.stem}.png", "HealthBench score by theme",
                      {k: (v["mean"], v["bootstrap_std"]) for k, v in (d.get("themes") or {}).items()}, doc)

    if mcq:
        doc.h(3, "Multiple choice")
        rows, bars = [], {}
        for path, d in mcq:
            proto = d.get("protocol", {})
            acc = d.get("acc", {})
            ci = acc.get("ci95") or [None, None]
            rows.append([d.get("stage", ""), d.get("task"), f"{proto.get('protocol')} {proto.get('shots', 0)}-shot", d.get("n"),
                         _pct(acc.get("value")), f"{_pct(ci[0])}–{_pct(ci[1])}",
                         _pct((d.get("acc_norm") or {}).get("value")), _pct((d.get("macro_f1") or {}).get("value")),
                         _pct(d.get("parse_failure_rate")), _pct(d.get("baselines", {}).get("chance")),
                         _pct(d.get("baselines", {}).get("majority", {}).get("acc"))])
            if acc.get("value") is not None:
                label = f"{d.get('stage')}: " if d.get("stage") else ""
                bars[f"{label}{d.get('task')} ({proto.get('protocol')})"] = (acc["value"], None)
        doc.table(["stage", "task", "protocol", "n", "acc %", "95% CI", "acc_norm %", "macro-F1 %", "unparsed %",
                   "chance %", "majority %"], rows)
        doc.p("Notes: " + "; ".join(sorted({f"{d.get('task')}: {d.get('note')}" for _, d in mcq if d.get("note")})))
        _bar_plot(fig_dir, "mcq_accuracy.png", "MCQ accuracy", bars, doc)

    if cmb:
        doc.h(3, "CMB-Clin (judge ratings, 1-5)")
        rows = []
        for path, d in cmb:
            c = d.get("criteria", {})
            rows.append([path.name, d.get("candidate"), d.get("judge_model"), d.get("score"), c.get("fluency"),
                         c.get("relevance"), c.get("completeness"), c.get("proficiency"), d.get("n_graded"),
                         d.get("n_ungraded")])
        doc.table(["file", "candidate", "judge", "overall", "fluency", "relevance", "completeness", "proficiency",
                   "graded", "ungraded"], rows)




def pipeline_section(doc: Doc, stages: list[dict], fig_dir: Path) -> None:
    """The speedrun's per-stage checks (angelmed.eval.stage_eval): what each training stage changed."""
    stages = sorted(stages, key=lambda d: STAGE_ORDER.get(d.get("stage"), 9))
    doc.h(3, "Stage by stage (held-out data)")
    ppl_sets = sorted({k for d in stages for k in (d.get("perplexity") or {})})
    mcq_sets = sorted({k for d in stages for k in (d.get("mcq") or {})})
    header = ["stage"] + [f"ppl {k}" for k in ppl_sets] + [f"{k} acc % (chance / majority)" for k in mcq_sets]
    header += ["chat format %", "held-out MCQ reward", "red flags: model % / with safety layer %"]
    rows = []
    for d in stages:
        row = [d.get("stage")]
        row += [f"{d['perplexity'][k]['ppl']:.1f}" if k in (d.get("perplexity") or {}) else "" for k in ppl_sets]
        for k in mcq_sets:
            m = (d.get("mcq") or {}).get(k)
            row.append(f"{_pct(m['acc'])} ({_pct(m['chance'])} / {_pct(m['majority'])})" if m else "")
        rf = d.get("red_flag") or {}
        row += [_pct(d.get("chat_format_rate")), _cell(d.get("heldout_mcq_reward")),
                f"{_pct(rf.get('raw_rate'))} / {_pct(rf.get('guarded_rate'))}" if rf else ""]
        rows.append(row)
    doc.table(header, rows)
    doc.p("Perplexity: exp(mean token NLL) on documents no stage trained on. MCQ: log-likelihood of the option "
          "letter (lm-eval convention). Chat format: greedy replies that ended with <|role_end|>. Red flags: "
          "replies to the in-project emergency cases that contain urgent-care guidance.")
    for d in stages:
        for s in d.get("samples") or []:
            doc.p(f"**{d.get('stage')} sample.** Q: {s['question'][:200]!r} → A: {s['reply'][:300]!r}")


def _bar_plot(fig_dir: Path, name: str, title: str, values: dict[str, tuple[float, float | None]], doc: Doc):
    if not values:
        return
    plt = _plt()
    labels = list(values)
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(labels)), 3.5))
    errors = [v[1] if v[1] is not None else 0 for v in values.values()]
    ax.bar(range(len(labels)), [v[0] for v in values.values()], yerr=errors, capsize=3, color="#4c72b0")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(fig_dir / name, dpi=100)
    plt.close(fig)
    doc.image(f"{fig_dir.name}/{name}", title)


def speed_section(doc: Doc, run_dir: Path, speed_rows: list[list[object]], notes: list[str]):
    paths = [run_dir / "speed.json"] + sorted(run_dir.glob("bench*/*.json"))
    for path in paths:
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8").strip()
            try:
                data = json.loads(text)
            except ValueError:  # a benchmark script's log whose last line is the JSON summary
                data = json.loads(text.splitlines()[-1])
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object")
        except (ValueError, IndexError) as e:
            notes.append(f"{path}: unreadable speed figures ({e})")
            continue
        for key, value in data.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                speed_rows.append([f"{path.stem}/{key}", value, None, str(path.relative_to(run_dir))])
    if speed_rows:
        doc.h(2, "Speed")
        doc.table(["figure", "mean / value", "last", "from"], speed_rows)


def write_report(run_dir: str | Path) -> Path:
    """Write run_dir/report.md (+ report.html and run_dir/figures/*.png); returns the markdown path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    doc, notes, speed_rows = Doc(), [], []
    doc.h(1, f"angelmed report: {run_dir.resolve().name}")
    doc.p(MEDICAL_ADVISORY)
    training_section(doc, run_dir, fig_dir, speed_rows, notes)
    expert_load_section(doc, run_dir, fig_dir, notes)
    eval_section(doc, run_dir, fig_dir, notes)
    speed_section(doc, run_dir, speed_rows, notes)
    doc.h(2, "External leaderboards (not reproduced)")
    doc.table(["leaderboard", "why not reproduced", "local proxies"], [list(r) for r in EXTERNAL_LEADERBOARDS])
    if notes:
        doc.h(2, "Skipped inputs")
        doc.table(["problem"], [[n] for n in notes])
    md_path = run_dir / "report.md"
    _write_atomic(md_path, doc.markdown())
    _write_atomic(run_dir / "report.html", doc.html(f"angelmed report: {run_dir.name}"))
    return md_path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="angelmed report", description="write the report card of a run directory")
    parser.add_argument("run_dir", help="run directory (stage folders with metrics.jsonl, eval/*.json, ...)")
    args = parser.parse_args(argv)
    path = write_report(args.run_dir)
    print(f"wrote {path} and {path.with_suffix('.html')}")
    return 0
