"""``curriculum inspect``: a text summary and ``RUN_DIR/report/index.html`` with plots.

Reads only the manifest and the numeric columns of the shards, through polars' lazy scan, on a
systematic sample of at most ``MAX_POINTS`` rows (every k-th position), so it stays cheap on a
corpus of any size. Plots: a histogram per numeric column, rows per stage, the curriculum curve
(the order key's percentile against position), the composition over position when the order
names a group column (domain or cluster), and the rank correlations between score signals,
with a warning when the classifier score disagrees with the other signals (docs/methods.md §4).
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline.core.errors import ConfigError
from pipeline.core.files import write_text_atomic
from pipeline.engine.report_training import inspect_training, is_training_folder
from pipeline.io.runfolder import read_manifest
from stages.combine import RECIPE

MAX_POINTS = 200_000
# Signals and their direction (True: higher is better), from the combine stage's recipe, so the
# report orients correlations exactly as the composite score does.
SIGNAL_DIRECTIONS = {"quality": True, **{column: higher for column, (higher, _w, _g) in RECIPE.items()}, "nll": False}
_SKIP_HIST = {"position"}


def _shard_paths(run_dir: Path, manifest: dict[str, Any]) -> list[str]:
    return [str(run_dir / s["path"]) for s in manifest["shards"]]


def load_numeric_sample(run_dir: Path, manifest: dict[str, Any]) -> pl.DataFrame:
    """Numeric columns (and low-cardinality group columns) on an every-k-th-row sample."""
    paths = _shard_paths(run_dir, manifest)
    if not paths:
        return pl.DataFrame()
    lazy = pl.scan_parquet(paths)
    schema = lazy.collect_schema()
    group = (manifest.get("order") or {}).get("group")
    wanted = [name for name, dtype in schema.items() if dtype.is_numeric()]
    if group and group in schema and group not in wanted:
        wanted.append(group)
    rows = manifest["counts"]["output_rows"]
    step = max(1, math.ceil(rows / MAX_POINTS))
    return lazy.select(wanted).gather_every(step).collect()


def rank_correlations(df: pl.DataFrame) -> tuple[list[str], np.ndarray, list[str]]:
    """Spearman correlations between the signal columns, each oriented so higher = better.

    Returns the column names, the matrix, and warnings: a classifier score that correlates
    negatively with the other signals is likely a domain detector, not a quality score.
    """
    columns = [c for c in SIGNAL_DIRECTIONS if c in df.columns and df[c].null_count() < df.height]
    if len(columns) < 2:
        return columns, np.zeros((len(columns), len(columns))), []
    ranks = []
    for c in columns:
        values = df[c].cast(pl.Float64)
        if not SIGNAL_DIRECTIONS[c]:
            values = -values
        ranks.append(values.rank("average").fill_null(strategy="mean").to_numpy())
    matrix = np.corrcoef(np.vstack(ranks))
    matrix = np.nan_to_num(matrix)
    warnings = []
    if "quality_clf" in columns:
        i = columns.index("quality_clf")
        others = [matrix[i, j] for j, c in enumerate(columns) if c not in ("quality_clf", "quality")]
        if others and float(np.mean(others)) < 0:
            warnings.append(
                f"quality_clf correlates negatively with the other signals (mean Spearman {np.mean(others):+.2f}): "
                "the classifier may have learned the positives' domain rather than quality. Take positives "
                "from the good part of this corpus's own domain (docs/methods.md §4)."
            )
    return columns, matrix, warnings


def _summary_table(df: pl.DataFrame) -> list[tuple[str, dict[str, float]]]:
    out = []
    for name in df.columns:
        if not df[name].dtype.is_numeric():
            continue
        series = df[name].cast(pl.Float64).drop_nulls().drop_nans()
        if series.len() == 0:
            continue
        out.append((name, {
            "min": series.min(), "p25": series.quantile(0.25), "median": series.median(),
            "p75": series.quantile(0.75), "max": series.max(), "nulls": df[name].null_count(),
        }))
    return out


def text_summary(manifest: dict[str, Any], stats: list[tuple[str, dict[str, float]]], warnings: list[str]) -> str:
    counts = manifest["counts"]
    lines = [
        f"run {manifest['run_id']}  (config {manifest['config_hash'][:12]}, seed {manifest['seed']})",
        f"input rows {counts['input_rows']}, quarantined {counts['quarantined']}, output rows {counts['output_rows']} "
        f"in {len(manifest['shards'])} shard(s)",
        "",
        f"{'stage':<22}{'rows in':>10}{'rows out':>10}{'dropped':>9}{'added':>8}{'seconds':>9}",
    ]
    for s in manifest["stages"]:
        lines.append(f"{s['name']:<22}{s['rows_in']:>10}{s['rows_out']:>10}{s['dropped']:>9}{s['added']:>8}{s['seconds']:>9.1f}")
        for reason, n in sorted((s.get("dropped_by") or {}).items()):
            lines.append(f"    dropped by {reason}: {n}")
    order = manifest.get("order") or {}
    lines += ["", "order: " + ", ".join(f"{k}={v}" for k, v in order.items() if not isinstance(v, (dict, list)))]
    if stats:
        lines += ["", f"{'column':<18}{'min':>11}{'p25':>11}{'median':>11}{'p75':>11}{'max':>11}{'nulls':>7}"]
        for name, s in stats:
            lines.append(f"{name:<18}" + "".join(f"{s[k]:>11.4g}" for k in ("min", "p25", "median", "p75", "max"))
                         + f"{s['nulls']:>7}")
    for selection in kmq_selections(manifest):
        lines += ["", *kmq_text(selection)]
    lines += [f"WARNING: {w}" for w in warnings]
    return "\n".join(lines)


# --------------------------------------------------------------------------- kMQ


TEXT_CLUSTERS = 20  # clusters listed in the text summary (the largest); the HTML report lists all


def kmq_selections(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every kMQ selection of the run: the kmq stages' info, then the select section; each with ``what``."""
    found = [{"what": "kmq stage", **s["info"]} for s in manifest.get("stages", [])
             if s.get("name") == "kmq" and isinstance(s.get("info"), dict)]
    if isinstance(manifest.get("select"), dict):
        found.append({"what": "iterative kMQ (curriculum select)", **manifest["select"]})
    return found


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def kmq_text(selection: dict[str, Any]) -> list[str]:
    key = selection.get("key")
    lines = [f"{selection['what']}: {selection.get('selected')} of {selection.get('rows')} rows selected "
             f"(budget {selection.get('budget')}) from {selection.get('clusters')} clusters of {selection.get('cluster')!r}, "
             f"key {key!r} at temperature {selection.get('temperature')}",
             f"  mean {key}: all rows {_fmt(selection.get('mean_key'))}, selected {_fmt(selection.get('mean_key_selected'))}"]
    clusters = selection.get("per_cluster") or []
    if clusters:
        shown = sorted(clusters, key=lambda c: (-c["size"], c["cluster"]))[:TEXT_CLUSTERS]
        lines.append(f"  {'cluster':<14}{'size':>8}{'budget':>8}{'selected':>10}{'mean key':>11}{'mean sel.':>11}")
        for c in shown:
            lines.append(f"  {str(c['cluster'])[:13]:<14}{c['size']:>8}{c['budget']:>8}{c['selected']:>10}"
                         f"{_fmt(c['mean_key']):>11}{_fmt(c['mean_key_selected']):>11}")
        if len(clusters) > len(shown):
            lines.append(f"  … {len(clusters) - len(shown)} smaller clusters in the HTML report")
    elif selection.get("per_cluster_omitted"):
        lines.append(f"  per-cluster detail not stored: {selection['per_cluster_omitted']}")
    rounds = selection.get("round_detail") or []
    if rounds:
        lines.append(f"  {'round':<7}{'new rows':>9}{'selected':>10}{'mean score':>12}  ids hash          weights (min … max)")
        for r in rounds:
            weights = r.get("weights") or []
            spread = f"{min(weights):.3f} … {max(weights):.3f}" if weights else "-"
            lines.append(f"  {r['round']:<7}{r['rows']:>9}{r['selected']:>10}{_fmt(r.get('mean_score')):>12}  "
                         f"{r['ids']['hash']}  {spread}")
        labels = selection.get("labels") or []
        if labels and all(r.get("weights") for r in rounds):
            order = sorted(range(len(labels)), key=lambda j: -rounds[-1]["weights"][j])[:TEXT_CLUSTERS]
            lines.append("  weights per round (cluster weights, mean 1; the largest last-round weights first):")
            lines.append("    " + "  ".join(f"{'r' + str(r['round']):>5}" for r in rounds) + "  cluster")
            for j in order:
                lines.append("    " + "  ".join(f"{r['weights'][j]:.3f}" for r in rounds) + f"  {labels[j]}")
    return lines


def kmq_html(selection: dict[str, Any]) -> str:
    """An HTML table per selection: every cluster, and the weights and budgets of every round."""
    esc = html.escape
    parts = [f"<h2>{esc(selection['what'])}</h2>", "<pre>" + esc("\n".join(kmq_text(selection)[:2])) + "</pre>"]
    clusters = selection.get("per_cluster") or []
    rounds = selection.get("round_detail") or []
    labels = selection.get("labels") or [c["cluster"] for c in clusters]
    if clusters:
        head = ["cluster", "size", "share of rows", "budget", "selected", "share of selection", "mean key",
                "mean key selected"]
        head += [f"weight r{r['round']}" for r in rounds if r.get("weights")]
        head += [f"budget r{r['round']}" for r in rounds if r.get("budgets")]
        rows_total = max(1, sum(c["size"] for c in clusters))
        selected_total = max(1, sum(c["selected"] for c in clusters))
        body = []
        for j, c in enumerate(clusters):
            cells = [c["cluster"], c["size"], f"{c['size'] / rows_total:.3f}", c["budget"], c["selected"],
                     f"{c['selected'] / selected_total:.3f}", _fmt(c["mean_key"]), _fmt(c["mean_key_selected"])]
            cells += [f"{r['weights'][j]:.4f}" for r in rounds if r.get("weights")]
            cells += [r["budgets"][j] for r in rounds if r.get("budgets")]
            body.append("<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in cells) + "</tr>")
        parts.append("<table border='1' cellspacing='0' cellpadding='3'><tr>"
                     + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>" + "".join(body) + "</table>")
    if rounds and labels:
        parts.append("<p>Round ids: " + ", ".join(
            f"r{r['round']}: {r['ids']['rows']} rows, hash {esc(r['ids']['hash'])}" for r in rounds) + "</p>")
    return "\n".join(parts)


def _plots(run_dir: Path, manifest: dict[str, Any], df: pl.DataFrame,
           corr: tuple[list[str], np.ndarray]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = run_dir / "report"
    made: list[tuple[str, str]] = []

    def save(fig, name: str, title: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=90)
        plt.close(fig)
        made.append((name, title))

    stages = manifest["stages"]
    fig, ax = plt.subplots(figsize=(6, 3))
    names = ["input", "after quarantine"] + [s["name"] for s in stages]
    values = [manifest["counts"]["input_rows"], manifest["counts"]["input_rows"] - manifest["counts"]["quarantined"]]
    values += [s["rows_out"] for s in stages]
    ax.bar(range(len(values)), values, color="#4c72b0")
    ax.set_xticks(range(len(values)), names, rotation=30, ha="right")
    ax.set_ylabel("rows")
    save(fig, "rows_per_stage.png", "Rows per stage")

    order = manifest.get("order") or {}
    key = order.get("key")
    if key and key in df.columns and "position" in df.columns:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
        ordered = df.sort("position")
        percentile = ordered[key].cast(pl.Float64).rank("average") / max(1, ordered[key].drop_nulls().len())
        axes[0].plot(ordered["position"].to_numpy(), ordered[key].to_numpy(), ".", ms=1.5, alpha=0.5)
        axes[0].set_xlabel("position")
        axes[0].set_ylabel(key)
        window = max(1, ordered.height // 100)
        smooth = np.convolve(np.nan_to_num(percentile.to_numpy()), np.ones(window) / window, mode="valid")
        axes[1].plot(ordered["position"].to_numpy()[: len(smooth)], smooth)
        axes[1].set_ylim(0, 1)
        axes[1].set_xlabel("position")
        axes[1].set_ylabel(f"{key} percentile (moving mean)")
        save(fig, "curriculum_curve.png", f"Curriculum curve: {key} against position")

    group = order.get("group")
    if group and group in df.columns and "position" in df.columns:
        ordered = df.sort("position")
        bins = np.linspace(0, ordered["position"].max() + 1, 41)
        labels = [str(v) for v in ordered[group].unique().sort().to_list()][:20]
        groups = ordered[group].cast(pl.Utf8).to_numpy()
        positions = ordered["position"].to_numpy()
        fig, ax = plt.subplots(figsize=(8, 3.2))
        bottom = np.zeros(len(bins) - 1)
        totals = np.histogram(positions, bins)[0].clip(min=1)
        for label in labels:
            share = np.histogram(positions[groups == label], bins)[0] / totals
            ax.bar(bins[:-1], share, width=np.diff(bins), bottom=bottom, align="edge", label=label)
            bottom += share
        ax.set_xlabel("position")
        ax.set_ylabel(f"share of {group}")
        ax.legend(fontsize=6, ncol=4, loc="upper right")
        save(fig, "composition.png", f"Composition by {group} over position")

    columns, matrix = corr
    if len(columns) >= 2:
        fig, ax = plt.subplots(figsize=(1 + 0.6 * len(columns), 1 + 0.5 * len(columns)))
        im = ax.imshow(matrix, vmin=-1, vmax=1, cmap="coolwarm")
        ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(columns)), columns, fontsize=7)
        for i in range(len(columns)):
            for j in range(len(columns)):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6)
        fig.colorbar(im)
        save(fig, "signal_correlations.png", "Spearman correlations between signals (each oriented higher = better)")

    for index, selection in enumerate(kmq_selections(manifest)):
        clusters = selection.get("per_cluster") or []
        if clusters:
            shown = sorted(clusters, key=lambda c: (-c["size"], c["cluster"]))[:40]
            x = np.arange(len(shown))
            sizes = np.array([c["size"] for c in shown], dtype=float) / max(1, sum(c["size"] for c in clusters))
            chosen = np.array([c["selected"] for c in shown], dtype=float) / max(1, sum(c["selected"] for c in clusters))
            fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
            axes[0].bar(x - 0.2, sizes, width=0.4, label="share of rows")
            axes[0].bar(x + 0.2, chosen, width=0.4, label="share of selection")
            axes[0].set_xticks(x, [str(c["cluster"])[:8] for c in shown], rotation=60, fontsize=6)
            axes[0].legend(fontsize=7)
            axes[0].set_xlabel("cluster (largest first)")
            mean_all = [np.nan if c["mean_key"] is None else c["mean_key"] for c in shown]
            mean_sel = [np.nan if c["mean_key_selected"] is None else c["mean_key_selected"] for c in shown]
            axes[1].plot(x, mean_all, "o", label="all rows")
            axes[1].plot(x, mean_sel, "s", label="selected")
            axes[1].set_xticks(x, [str(c["cluster"])[:8] for c in shown], rotation=60, fontsize=6)
            axes[1].set_ylabel(f"mean {selection.get('key')}")
            axes[1].legend(fontsize=7)
            save(fig, f"kmq_clusters_{index}.png", f"{selection['what']}: cluster shares and mean key")
        rounds = [r for r in selection.get("round_detail") or [] if r.get("weights")]
        labels = selection.get("labels") or []
        if len(rounds) > 1 and labels:
            weights = np.array([r["weights"] for r in rounds])
            fig, ax = plt.subplots(figsize=(6, 3.2))
            for j in np.argsort(-weights[-1])[:20]:
                ax.plot([r["round"] for r in rounds], weights[:, j], marker="o", label=str(labels[j])[:10])
            ax.set_xlabel("round")
            ax.set_ylabel("cluster weight (mean 1)")
            ax.set_xticks([r["round"] for r in rounds])
            ax.legend(fontsize=6, ncol=2)
            save(fig, f"kmq_weights_{index}.png", f"{selection['what']}: cluster weights per round")

    for name in df.columns:
        if name in _SKIP_HIST or not df[name].dtype.is_numeric():
            continue
        values = df[name].cast(pl.Float64).drop_nulls().drop_nans().to_numpy()
        if values.size == 0:
            continue
        fig, ax = plt.subplots(figsize=(4, 2.6))
        ax.hist(values, bins=40, color="#55a868")
        ax.set_title(name)
        save(fig, f"hist_{name}.png", f"Distribution of {name}")
    return made


def inspect_run(run_dir: Path) -> tuple[str, Path]:
    """Print-ready summary and the path of the HTML report written into ``run_dir/report``."""
    run_dir = Path(run_dir)
    if is_training_folder(run_dir):
        return inspect_training(run_dir)
    if not (run_dir / "manifest.json").is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no manifest.json), a training folder (no train_config.json) "
                          "or a study folder")
    manifest = read_manifest(run_dir)
    df = load_numeric_sample(run_dir, manifest)
    columns, matrix, warnings = rank_correlations(df)
    stats = _summary_table(df)
    summary = text_summary(manifest, stats, warnings)
    (run_dir / "report").mkdir(exist_ok=True)
    plots = _plots(run_dir, manifest, df, (columns, matrix))
    body = [f"<h1>Run {html.escape(manifest['run_id'])}</h1>", f"<pre>{html.escape(summary)}</pre>"]
    body += [f"<p style='color:#b00'><b>Warning:</b> {html.escape(w)}</p>" for w in warnings]
    body += [kmq_html(selection) for selection in kmq_selections(manifest)]
    for name, title in plots:
        caption = html.escape(title)
        body.append(f"<figure><img src='{name}' alt='{caption}'><figcaption>{caption}</figcaption></figure>")
    page = "<!doctype html><html><head><meta charset='utf-8'><title>curriculum report</title></head><body>"
    page += "\n".join(body) + "</body></html>"
    index = run_dir / "report" / "index.html"
    write_text_atomic(index, page)
    return summary, index
