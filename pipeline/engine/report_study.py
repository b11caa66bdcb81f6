"""The tables, plots and HTML report of a study folder (``curriculum study``, ``curriculum inspect``).

Per seed (``runs.csv``), per arm as mean ± sd over seeds (``results.csv``), and the curriculum
effect per schedule and averaging (``effects.csv``): the curriculum order's loss minus the
baseline order's, paired by seed (the same seed initializes both), so negative means the
curriculum helped. The verdict sentence tests the direction Luo et al. (ICLR 2026) report: the
curriculum helps most under a constant LR or a moderate decay with checkpoint averaging, and a
decay toward zero washes the benefit out.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.core.files import write_text_atomic

TO_ZERO_BELOW = 0.05  # a schedule whose last LR is below this share of the peak decays "toward zero"
METRICS = ("high_quality", "mixed")
PLOTS = (("loss_curves.png", "Held-out loss against tokens (mean ± sd over seeds)"),
         ("lr_curves.png", "Learning rate against step, per schedule"),
         ("bars.png", "Held-out loss per arm (mean ± sd over seeds)"),
         ("effects.png", "Curriculum effect per schedule (curriculum − baseline loss, mean ± sd of the "
          "per-seed differences; below 0: the curriculum is better)"))


def _sd(values: list[float]) -> float | None:
    """Sample standard deviation (n − 1); None below two values."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def schedule_class(params: dict[str, Any]) -> str:
    """``to_zero`` when the LR ends below ``TO_ZERO_BELOW`` of the peak, else ``moderate`` (constant included)."""
    if params.get("kind") == "constant":
        return "moderate"
    return "to_zero" if params.get("final_lr_ratio", 0.333) < TO_ZERO_BELOW else "moderate"


def per_seed_rows(results: list[dict[str, Any]], averaging: list[str]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        if r.get("status") != "ok":
            continue
        for method in averaging:
            losses = r["losses"].get(method) or {}
            rows.append({"order": r["order"], "schedule": r["schedule"], "averaging": method, "seed": r["seed"],
                         **{m: losses.get(m) for m in METRICS}, "epochs": r.get("epochs"), "steps": r.get("steps"),
                         "tokens": r.get("tokens"), "seconds": r.get("seconds")})
    return rows


def arm_table(rows: list[dict[str, Any]], orders: list[str], schedules: list[str], averaging: list[str]):
    """One row per (order, schedule, averaging): seeds, then mean and sd of each metric over seeds."""
    table = []
    for order in orders:
        for schedule in schedules:
            for method in averaging:
                mine = [r for r in rows if (r["order"], r["schedule"], r["averaging"]) == (order, schedule, method)]
                if not mine:
                    continue
                row: dict[str, Any] = {"order": order, "schedule": schedule, "averaging": method,
                                       "seeds": len(mine)}
                for m in METRICS:
                    values = [r[m] for r in mine if r[m] is not None]
                    row[f"{m}_mean"], row[f"{m}_sd"] = _mean(values), _sd(values)
                table.append(row)
    return table


def effect_table(rows: list[dict[str, Any]], baseline: str, curriculum: str, schedules: list[str],
                 averaging: list[str], classes: dict[str, str]) -> list[dict[str, Any]]:
    """Per (schedule, averaging): curriculum − baseline loss, paired by seed; mean and sd of the differences."""
    table = []
    index = {(r["order"], r["schedule"], r["averaging"], r["seed"]): r for r in rows}
    for schedule in schedules:
        for method in averaging:
            seeds = sorted({r["seed"] for r in rows if (r["schedule"], r["averaging"]) == (schedule, method)})
            pairs = [(index.get((curriculum, schedule, method, s)), index.get((baseline, schedule, method, s)))
                     for s in seeds]
            pairs = [(c, b) for c, b in pairs if c is not None and b is not None]
            if not pairs:
                continue
            row: dict[str, Any] = {"schedule": schedule, "class": classes.get(schedule, "moderate"),
                                   "averaging": method, "pairs": len(pairs)}
            for m in METRICS:
                diffs = [c[m] - b[m] for c, b in pairs if c[m] is not None and b[m] is not None]
                row[f"{m}_effect_mean"], row[f"{m}_effect_sd"] = _mean(diffs), _sd(diffs)
            table.append(row)
    return table


def _pm(mean: float | None, sd: float | None, signed: bool = False) -> str:
    if mean is None:
        return "-"
    text = f"{mean:+.4f}" if signed else f"{mean:.4f}"
    return text + (f" ± {sd:.4f}" if sd is not None else "")


def verdict(effects: list[dict[str, Any]], baseline: str, curriculum: str) -> tuple[str, dict[str, Any]]:
    """One sentence on whether the paper's direction held, and the numbers it rests on."""
    averaged = [e for e in effects if e["class"] == "moderate" and e["averaging"] != "none"]
    moderate = averaged or [e for e in effects if e["class"] == "moderate"]
    to_zero = [e for e in effects if e["class"] == "to_zero" and e["averaging"] == "none"]
    key = "high_quality_effect_mean"
    moderate = [e for e in moderate if e[key] is not None]
    to_zero = [e for e in to_zero if e[key] is not None]
    if not moderate or not to_zero:
        return ("The paper's direction cannot be judged on this grid: it needs a schedule that decays toward "
                "zero and one with a constant LR or a moderate decay.", {"held": None})
    best_mod = min(moderate, key=lambda e: e[key])
    best_zero = min(to_zero, key=lambda e: e[key])
    held = best_mod[key] < 0 and best_mod[key] < best_zero[key]
    sentence = (
        f"The paper's direction {'held' if held else 'did not hold'}: on the high-quality held-out loss, "
        f"{curriculum} − {baseline} (negative = the curriculum is better) was at best "
        f"{_pm(best_mod[key], best_mod['high_quality_effect_sd'], True)} with a constant LR or a moderate decay"
        f"{' + averaging' if averaged else ''} ({best_mod['schedule']}, {best_mod['averaging']}), against at best "
        f"{_pm(best_zero[key], best_zero['high_quality_effect_sd'], True)} with a decay toward zero "
        f"({best_zero['schedule']}, final weights).")
    return sentence, {"held": held, "best_moderate": best_mod, "best_to_zero": best_zero}


def comparisons(arms: list[dict[str, Any]], baseline: str, curriculum: str, classes: dict[str, str]) -> list[str]:
    """The curriculum's best arm with a constant/moderate LR and averaging against the baseline order's
    arms that decay toward zero (final weights), on the high-quality loss."""
    key = "high_quality_mean"
    mine = [a for a in arms if a["order"] == curriculum and classes.get(a["schedule"]) == "moderate"
            and a["averaging"] != "none" and a[key] is not None]
    theirs = [a for a in arms if a["order"] == baseline and classes.get(a["schedule"]) == "to_zero"
              and a["averaging"] == "none" and a[key] is not None]
    if not mine or not theirs:
        return []
    best = min(mine, key=lambda a: a[key])
    lines = []
    for other in theirs:
        verb = "beat" if best[key] < other[key] else "did not beat"
        lines.append(f"{curriculum} + {best['schedule']} + {best['averaging']} ({_pm(best[key], best['high_quality_sd'])}) "
                     f"{verb} {baseline} + {other['schedule']} ({_pm(other[key], other['high_quality_sd'])}).")
    overall = min((a for a in arms if a[key] is not None), key=lambda a: a[key])
    lines.append(f"Best arm: {overall['order']} + {overall['schedule']} + {overall['averaging']} "
                 f"({_pm(overall[key], overall['high_quality_sd'])}).")
    return lines


def _markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if i < 3 else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def arm_markdown(arms: list[dict[str, Any]]) -> str:
    return _markdown(["order", "schedule", "averaging", "seeds", "high-quality loss", "mixed loss"],
                     [[a["order"], a["schedule"], a["averaging"], str(a["seeds"]),
                       _pm(a["high_quality_mean"], a["high_quality_sd"]), _pm(a["mixed_mean"], a["mixed_sd"])]
                      for a in arms])


def effect_markdown(effects: list[dict[str, Any]]) -> str:
    return _markdown(["schedule", "LR at the end", "averaging", "pairs", "effect, high-quality", "effect, mixed"],
                     [[e["schedule"], "toward zero" if e["class"] == "to_zero" else "constant/moderate",
                       e["averaging"], str(e["pairs"]),
                       _pm(e["high_quality_effect_mean"], e["high_quality_effect_sd"], True),
                       _pm(e["mixed_effect_mean"], e["mixed_effect_sd"], True)] for e in effects])


def curve_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"order": r["order"], "schedule": r["schedule"], "seed": r["seed"], **point}
            for r in results if r.get("status") == "ok" for point in r.get("curve", [])]


def write_study_outputs(out: Path, study: Any, results: list[dict[str, Any]], train: dict[str, Any]) -> dict[str, Any]:
    """runs.csv, results.csv, effects.csv, curves.csv, results.md and plots/*.png; returns the numbers."""
    orders, schedules, averaging = list(study.orders), list(study.schedules), list(study.averaging)
    base_schedule = train.get("schedule", {})
    classes = {name: schedule_class({**base_schedule, **params}) for name, params in study.schedules.items()}
    rows = per_seed_rows(results, averaging)
    arms = arm_table(rows, orders, schedules, averaging)
    effects = effect_table(rows, study.baseline, study.curriculum, schedules, averaging, classes)
    sentence, basis = verdict(effects, study.baseline, study.curriculum)
    lines = comparisons(arms, study.baseline, study.curriculum, classes)
    failed = [{k: r.get(k) for k in ("order", "schedule", "seed", "error")} for r in results if r.get("status") != "ok"]
    curves = curve_rows(results)

    pl.DataFrame(rows, schema=_schema(rows, ["order", "schedule", "averaging", "seed", *METRICS])).write_csv(out / "runs.csv")
    pl.DataFrame(arms, schema=_schema(arms, ["order", "schedule", "averaging", "seeds"])).write_csv(out / "results.csv")
    pl.DataFrame(effects, schema=_schema(effects, ["schedule", "class", "averaging", "pairs"])).write_csv(out / "effects.csv")
    pl.DataFrame(curves, schema=_schema(curves, ["order", "schedule", "seed", "step"])).write_csv(out / "curves.csv")

    epochs = sorted({r["epochs"] for r in rows if r.get("epochs") is not None})
    md = ["# Ordering-effects study", "",
          f"Orders {', '.join(orders)} × schedules {', '.join(schedules)} × averaging {', '.join(averaging)}; "
          f"seeds {', '.join(map(str, study.seeds))}. Losses are mean token NLL on held-out text, mean ± sd over seeds "
          f"(high-quality set `{study.eval.high_quality}`, mixed set `{study.eval.mixed}`)."
          + (f" Epochs per run (share of the curated documents read): {epochs[0]:.3g}"
             + (f" to {epochs[-1]:.3g}." if epochs[-1] != epochs[0] else ".") if epochs else ""),
          "", "## Arms", "", arm_markdown(arms), "",
          f"## Curriculum effect per schedule: {study.curriculum} − {study.baseline}", "",
          "Loss of the curriculum order minus loss of the baseline order, paired by seed; negative = the curriculum "
          "is better. Mean ± sd of the per-seed differences.", "", effect_markdown(effects), "",
          "## Verdict", "", sentence, ""]
    md += [f"- {line}" for line in lines]
    if failed:
        md += ["", "## Failed runs", ""] + [f"- {f['order']} + {f['schedule']}, seed {f['seed']}: {f['error']}"
                                           for f in failed]
    write_text_atomic(out / "results.md", "\n".join(md) + "\n")
    plots_dir = out / "plots"
    plots_dir.mkdir(exist_ok=True)
    make_plots(plots_dir, arms, effects, curves, orders, schedules)
    return {"arms": arms, "effects": effects, "verdict": sentence, "held": basis["held"], "comparisons": lines,
            "failed": failed, "runs": rows, "baseline": study.baseline, "curriculum": study.curriculum,
            "classes": classes}


def _schema(rows: list[dict[str, Any]], first: list[str]) -> dict[str, Any] | None:
    """An explicit schema only for an empty table (polars cannot infer one); column order otherwise as built."""
    return None if rows else {name: pl.Utf8 for name in first}


def make_plots(out_dir: Path, arms: list[dict[str, Any]], effects: list[dict[str, Any]], curves: list[dict[str, Any]],
               orders: list[str], schedules: list[str]) -> list[tuple[str, str]]:
    """The study's four figures (matplotlib, Agg backend, png) into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    made: list[tuple[str, str]] = []
    titles = dict(PLOTS)

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=90)
        plt.close(fig)
        made.append((name, titles[name]))

    df = pl.DataFrame(curves) if curves else pl.DataFrame()
    if df.height:
        fig, axes = plt.subplots(2, len(schedules), figsize=(3.2 * len(schedules), 5.5), squeeze=False, sharey="row")
        for j, schedule in enumerate(schedules):
            for i, metric in enumerate(METRICS):
                ax = axes[i][j]
                for order in orders:
                    part = df.filter((pl.col("order") == order) & (pl.col("schedule") == schedule)
                                     & pl.col(metric).is_not_null())
                    if not part.height:
                        continue
                    agg = part.group_by("tokens").agg(pl.col(metric).mean().alias("m"),
                                                      pl.col(metric).std().fill_null(0).alias("s")).sort("tokens")
                    x, m, s = agg["tokens"].to_numpy(), agg["m"].to_numpy(), agg["s"].to_numpy()
                    ax.plot(x, m, marker=".", label=order)
                    ax.fill_between(x, m - s, m + s, alpha=0.2)
                ax.set_title(f"{schedule}: {metric}", fontsize=8)
                ax.set_xlabel("tokens", fontsize=7)
                ax.tick_params(labelsize=6)
            axes[0][j].legend(fontsize=6)
        save(fig, "loss_curves.png")

        fig, ax = plt.subplots(figsize=(6, 3))
        for schedule in schedules:
            part = df.filter(pl.col("schedule") == schedule)
            if part.height:
                first = part.filter((pl.col("order") == part["order"][0]) & (pl.col("seed") == part["seed"][0]))
                ax.plot(first["step"].to_numpy(), first["lr"].to_numpy(), label=schedule)
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
        ax.legend(fontsize=7)
        save(fig, "lr_curves.png")

    if arms:
        fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.35 * len(arms)), 6), squeeze=False)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        x = np.arange(len(arms))
        for i, metric in enumerate(METRICS):
            ax = axes[i][0]
            means = np.array([a[f"{metric}_mean"] if a[f"{metric}_mean"] is not None else np.nan for a in arms])
            sds = np.array([a[f"{metric}_sd"] or 0.0 for a in arms])
            ax.bar(x, means, yerr=sds, capsize=2, color=[colors[orders.index(a["order"]) % len(colors)] for a in arms])
            low, high = np.nanmin(means - sds), np.nanmax(means + sds)
            pad = 0.1 * (high - low) + 1e-3
            ax.set_ylim(low - pad, high + pad)
            ax.set_ylabel(f"{metric} loss", fontsize=7)
            ax.set_xticks(x, [f"{a['order']}/{a['schedule']}/{a['averaging']}" for a in arms], rotation=70,
                          ha="right", fontsize=6)
        save(fig, "bars.png")

    if effects:
        methods = list(dict.fromkeys(e["averaging"] for e in effects))
        fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(schedules)), 3.2))
        width = 0.8 / len(methods)
        for k, method in enumerate(methods):
            xs, ys, es = [], [], []
            for j, schedule in enumerate(schedules):
                e = next((e for e in effects if (e["schedule"], e["averaging"]) == (schedule, method)), None)
                if e is not None and e["high_quality_effect_mean"] is not None:
                    xs.append(j - 0.4 + width * (k + 0.5))
                    ys.append(e["high_quality_effect_mean"])
                    es.append(e["high_quality_effect_sd"] or 0.0)
            ax.bar(xs, ys, width=width, yerr=es, capsize=3, label=method)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(schedules)), schedules, fontsize=7)
        ax.set_ylabel("Δ high-quality loss", fontsize=7)
        ax.legend(fontsize=7, title="averaging", title_fontsize=7)
        save(fig, "effects.png")
    return made


# --------------------------------------------------------------------------- curriculum inspect STUDY_DIR


def is_study_folder(path: Path) -> bool:
    return (Path(path) / "study.json").is_file()


def inspect_study(study_dir: Path) -> tuple[str, Path]:
    """Print-ready summary and STUDY_DIR/report/index.html (tables, verdict, plots) of a study folder."""
    study_dir = Path(study_dir)
    results = study_dir / "results.json"
    if not results.is_file():
        from pipeline.core.errors import CurriculumError

        raise CurriculumError(f"{study_dir}: no results.json yet; run `curriculum study CONFIG --out {study_dir}` "
                              "to finish (or resume) it")
    data = json.loads(results.read_text())
    report = study_dir / "report"
    report.mkdir(exist_ok=True)
    spec = json.loads((study_dir / "study.json").read_text())["study"]
    curves = pl.read_csv(study_dir / "curves.csv").to_dicts() if (study_dir / "curves.csv").is_file() else []
    plots = make_plots(report, data["arms"], data["effects"], curves, list(spec["orders"]), list(spec["schedules"]))
    summary = "\n".join([f"study {study_dir}", "", arm_markdown(data["arms"]), "",
                         f"effect ({data['curriculum']} − {data['baseline']}, negative = the curriculum is better):",
                         effect_markdown(data["effects"]), "", data["verdict"], *data["comparisons"]]
                        + [f"FAILED {f['order']} + {f['schedule']}, seed {f['seed']}: {f['error']}" for f in data["failed"]])
    esc = html.escape
    body = [f"<h1>Study {esc(study_dir.name)}</h1>", f"<p><b>{esc(data['verdict'])}</b></p>",
            "<ul>" + "".join(f"<li>{esc(line)}</li>" for line in data["comparisons"]) + "</ul>",
            "<h2>Arms (mean ± sd over seeds)</h2>", _html_table(data["arms"]),
            f"<h2>Curriculum effect: {esc(data['curriculum'])} − {esc(data['baseline'])}</h2>",
            "<p>Paired by seed; negative = the curriculum is better.</p>", _html_table(data["effects"])]
    if data["failed"]:
        body += ["<h2 style='color:#b00'>Failed runs</h2>", _html_table(data["failed"])]
    for name, title in plots:
        body.append(f"<figure><img src='{name}' alt='{esc(title)}'><figcaption>{esc(title)}</figcaption></figure>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>curriculum study</title></head><body>"
            + "\n".join(body) + "</body></html>")
    index = report / "index.html"
    write_text_atomic(index, page)
    return summary, index


def _html_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>(none)</p>"
    head = list(rows[0])

    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    return ("<table border='1' cellspacing='0' cellpadding='3'><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head)
            + "</tr>" + "".join("<tr>" + "".join(f"<td>{html.escape(cell(r.get(h)))}</td>" for h in head) + "</tr>"
                                for r in rows) + "</table>")
