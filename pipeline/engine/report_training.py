"""``curriculum inspect TRAIN_DIR``: a training folder's text summary and ``TRAIN_DIR/report/index.html``.

Reads ``metrics.jsonl``, ``train_config.json`` and, once training has finished, ``summary.json``
(docs/run-folder.md, the training folder). Plots the train and eval losses and the learning rate
against the step; the table sets the final and the averaged model side by side on each eval set.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from pipeline.core.files import write_text_atomic

METRICS = "metrics.jsonl"
TRAIN_CONFIG = "train_config.json"


def is_training_folder(path: Path) -> bool:
    """A folder ``curriculum train`` wrote (its config record and metrics), not a run folder."""
    path = Path(path)
    return (path / TRAIN_CONFIG).is_file() and (path / METRICS).is_file()


def read_metrics(train_dir: Path) -> list[dict[str, Any]]:
    lines = (Path(train_dir) / METRICS).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def eval_table(summary: dict[str, Any] | None) -> list[tuple[str, float | None, float | None]]:
    """(eval set, final loss, averaged loss) for every set either model was evaluated on."""
    if not summary:
        return []
    final = summary.get("final") or {}
    averaged = summary.get("averaged") or {}
    names = sorted({*final, *averaged})
    return [(name.removeprefix("eval_"), final.get(name), averaged.get(name)) for name in names]


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def training_text(train_dir: Path, config: dict[str, Any], metrics: list[dict[str, Any]],
                  summary: dict[str, Any] | None) -> str:
    train = config.get("train") or {}
    schedule = train.get("schedule") or {}
    averaging = train.get("averaging") or {}
    lines = [f"training {Path(train_dir).resolve()}",
             f"data {config.get('data')}; seed {config.get('seed')}; tokenizer {config.get('tokenizer')}",
             f"{config.get('total_steps')} steps of {train.get('batch_size')} x {train.get('seq_len')} tokens; "
             f"schedule {schedule.get('kind')} (peak lr {(train.get('optimizer') or {}).get('lr')}); "
             f"averaging {averaging.get('method')}"]
    if metrics:
        last = metrics[-1]
        lines.append(f"logged {len(metrics)} lines up to step {last['step']} ({last['tokens']} tokens); "
                     f"last train loss {_fmt(last.get('train_loss'))}, lr {last.get('lr', 0):.3g}")
    if summary is None:
        lines.append("not finished: no summary.json yet (rerun `curriculum train` with the same --out to resume)")
        return "\n".join(lines)
    lines.append(f"finished: {summary['steps']} steps, {summary['tokens']} tokens, {summary.get('epochs')} epochs")
    table = eval_table(summary)
    if table:
        lines += ["", f"{'eval set':<20}{'final':>10}{'averaged':>10}{'difference':>12}"]
        for name, final, averaged in table:
            diff = averaged - final if final is not None and averaged is not None else None
            lines.append(f"{name:<20}{_fmt(final):>10}{_fmt(averaged):>10}{_fmt(diff):>12}")
    return "\n".join(lines)


def _plots(report_dir: Path, metrics: list[dict[str, Any]]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[tuple[str, str]] = []
    if not metrics:
        return made
    steps = [m["step"] for m in metrics]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(steps, [m.get("train_loss") for m in metrics], label="train")
    for key in sorted({k for m in metrics for k in m if k.startswith("eval_")}):
        points = [(m["step"], m[key]) for m in metrics if key in m]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=key.removeprefix("eval_"))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean token NLL)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(report_dir / "loss.png", dpi=90)
    plt.close(fig)
    made.append(("loss.png", "Train loss (mean over each logging window) and eval losses against the step"))
    fig, ax = plt.subplots(figsize=(7, 2.6))
    ax.plot(steps, [m.get("lr") for m in metrics], color="#c44e52")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    fig.tight_layout()
    fig.savefig(report_dir / "lr.png", dpi=90)
    plt.close(fig)
    made.append(("lr.png", "Learning rate against the step"))
    return made


def inspect_training(train_dir: Path) -> tuple[str, Path]:
    """Print-ready summary and the path of ``train_dir/report/index.html``."""
    train_dir = Path(train_dir)
    config = json.loads((train_dir / TRAIN_CONFIG).read_text())
    metrics = read_metrics(train_dir)
    summary_path = train_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    text = training_text(train_dir, config, metrics, summary)
    report_dir = train_dir / "report"
    report_dir.mkdir(exist_ok=True)
    plots = _plots(report_dir, metrics)
    esc = html.escape
    body = [f"<h1>Training {esc(train_dir.name)}</h1>", f"<pre>{esc(text)}</pre>"]
    table = eval_table(summary)
    if table:
        body.append("<h2>Eval losses: final and averaged model</h2><table border='1' cellspacing='0' cellpadding='3'>"
                    "<tr><th>eval set</th><th>final</th><th>averaged</th></tr>"
                    + "".join(f"<tr><td>{esc(n)}</td><td>{_fmt(f)}</td><td>{_fmt(a)}</td></tr>" for n, f, a in table)
                    + "</table>")
    for name, title in plots:
        caption = esc(title)
        body.append(f"<figure><img src='{name}' alt='{caption}'><figcaption>{caption}</figcaption></figure>")
    page = "<!doctype html><html><head><meta charset='utf-8'><title>curriculum training report</title></head><body>"
    page += "\n".join(body) + "</body></html>"
    index = report_dir / "index.html"
    write_text_atomic(index, page)
    return text, index
