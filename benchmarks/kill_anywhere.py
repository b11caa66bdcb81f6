"""Kill anywhere, more seeds than CI: SIGKILL inside every stage and the shard writer, inside a
checkpoint write of ``curriculum train`` and inside a study arm; resume; compare with an
uninterrupted run. Every kill point is printed with its seed and recorded.

- **Pipeline**: the kill config of ``tests/kill_harness.py`` (every kind of stage). For each seed
  set, one run folder is killed inside each stage and then the writer, in pipeline order (each
  rerun resumes and is killed at the next point); the last rerun finishes, and its shards must be
  byte-identical to an uninterrupted run's.
- **Train**: ``curriculum train`` on that run's shards, killed inside the N-th checkpoint write;
  the rerun's metrics and final and averaged weights must be identical to an uninterrupted run's.
- **Study**: a 4-arm study killed while arms train; every arm's losses and curve must be the
  uninterrupted study's.

``python benchmarks/kill_anywhere.py [--seed-sets 1000,1100] [--train-seeds 1500,1501]
[--study-seeds 1700,1701]``; writes ``benchmarks/out/kill_anywhere.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from common import OUT_DIR, ROOT  # noqa: E402  (first: puts the checkout on sys.path)

from tests.kill_harness import PIPELINE_SITES, checkpoint_kill, completed, draw_kill, file_hashes, kill_config, killed, site_files

WORK = OUT_DIR / "kill_anywhere"
TRAIN = {
    "model": {"config": {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64}},
    "tokenizer_vocab_size": 400, "tokenizer_sample_docs": 120, "seq_len": 32, "batch_size": 8,
    "max_tokens": 40 * 8 * 32,  # 40 steps
    "optimizer": {"lr": 0.003},
    "schedule": {"kind": "wsd", "warmup": 4, "decay_fraction": 0.3, "decay_shape": "1-sqrt", "final_lr_ratio": 0.333},
    "averaging": {"method": "ema", "last_k": 3, "alpha": 0.2, "window": 0.25},  # checkpoints at 1, 4, …, 40
    "eval": {"every": 10, "max_tokens": 512, "sets": {"clean": {"synthetic": {"docs": 20, "min_quality": 0.7}}}},
    "log_every": 1, "threads": 1,
}
CHECKPOINT_WRITES = 14


def pipeline_chain(address: str, config: Path, reference: Path, seed0: int) -> list[dict]:
    out = WORK / f"pipeline-{seed0}"
    shutil.rmtree(out, ignore_errors=True)
    args = ["run", str(config), "--out", str(out), "--ray-address", address]
    records = []
    for offset, site in enumerate(PIPELINE_SITES):
        kill = draw_kill(seed0 + offset, site, site_files(reference, site))
        started = time.perf_counter()
        killed(args, kill)
        records.append({"seed": kill.seed, "site": site, "kill_point": kill.point, "killed": True,
                        "seconds": round(time.perf_counter() - started, 1)})
        print(f"  killed at {kill}", flush=True)
    completed(args, f"pipeline chain {seed0}")
    identical = file_hashes(out) == file_hashes(reference)
    for record in records:
        record["identical_after_resume"] = identical
    print(f"  seeds {seed0}..{seed0 + len(PIPELINE_SITES) - 1}: shards identical = {identical}", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return records


def _train_args(config: Path, data: Path, out: Path) -> list[str]:
    return ["train", str(config), "--data", str(data), "--out", str(out)]


def train_kill(config: Path, data: Path, reference: Path, seed: int) -> dict:
    out = WORK / f"train-{seed}"
    shutil.rmtree(out, ignore_errors=True)
    kill = checkpoint_kill(seed, CHECKPOINT_WRITES)
    killed(_train_args(config, data, out), kill)
    resumed = completed(_train_args(config, data, out), str(kill))
    same = [(out / name / "model.safetensors").read_bytes() == (reference / name / "model.safetensors").read_bytes()
            for name in ("final", "averaged")]
    identical = all(same) and (out / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    print(f"  killed at {kill}: resumed = {'resuming from step-' in resumed.stderr}, identical = {identical}",
          flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return {"seed": seed, "site": "checkpoint", "kill_point": kill.point, "killed": True,
            "resumed_from_checkpoint": "resuming from step-" in resumed.stderr, "identical_after_resume": identical}


def study_config(folder: Path) -> Path:
    from tests.test_study import TINY

    raw = copy.deepcopy(TINY)
    raw["study"]["schedules"] = {"constant": {"kind": "constant"}}
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _arm_results(folder: Path) -> dict[str, tuple]:
    results = {}
    for path in sorted(folder.glob("arms/*/result.json")):
        result = json.loads(path.read_text())
        results[path.parent.name] = (result["losses"], result["curve"])
    return results


def study_kill(address: str, config: Path, reference: Path, seed: int) -> dict:
    out = WORK / f"study-{seed}"
    shutil.rmtree(out, ignore_errors=True)
    args = ["study", str(config), "--out", str(out), "--ray-address", address]
    kill = draw_kill(seed, "arm", 3)
    killed(args, kill)
    completed(args, str(kill))
    resumed = any("resuming from step-" in p.read_text() for p in out.glob("arms/*/train.log"))
    identical = _arm_results(out) == _arm_results(reference)
    print(f"  killed at {kill}: an arm resumed from a checkpoint = {resumed}, identical = {identical}", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return {"seed": seed, "site": "arm", "kill_point": kill.point, "killed": True,
            "resumed_from_checkpoint": resumed, "identical_after_resume": identical}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed-sets", default="1000,1100", help="first seed of each pipeline chain")
    parser.add_argument("--train-seeds", default="1500,1501")
    parser.add_argument("--study-seeds", default="1700,1701")
    args = parser.parse_args()

    import ray

    os.environ["CURRICULUM_PROGRESS_SECONDS"] = "0"
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    started = time.perf_counter()

    config = WORK / "kill.yaml"
    config.write_text(yaml.safe_dump(kill_config()))
    reference = WORK / "reference"
    completed(["run", str(config), "--out", str(reference), "--ray-address", address], "reference run")
    files = {site: site_files(reference, site) for site in PIPELINE_SITES}
    print(f"reference run: output files per site {files}", flush=True)
    records = []
    for seed0 in (int(s) for s in args.seed_sets.split(",")):
        records += pipeline_chain(address, config, reference, seed0)

    train_config = WORK / "train.yaml"
    train_config.write_text(yaml.safe_dump({"run": {"name": "kill-train", "seed": 0}, "train": TRAIN}))
    train_reference = WORK / "train-reference"
    completed(_train_args(train_config, reference, train_reference), "train reference")
    records += [train_kill(train_config, reference, train_reference, int(s)) for s in args.train_seeds.split(",")]

    study_reference = WORK / "study-reference"
    study_yaml = study_config(WORK)
    completed(["study", str(study_yaml), "--out", str(study_reference), "--ray-address", address], "study reference")
    records += [study_kill(address, study_yaml, study_reference, int(s)) for s in args.study_seeds.split(",")]
    ray.shutdown()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    summary = {"commit": commit, "machine": f"{platform.machine()}, {os.cpu_count()} CPU, python "
               f"{platform.python_version()}", "seconds": round(time.perf_counter() - started, 1),
               "files_per_site": files, "kill_points": records,
               "all_identical": all(r["identical_after_resume"] for r in records)}
    (OUT_DIR / "kill_anywhere.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{len(records)} kill points, all identical after resume: {summary['all_identical']}")
    shutil.rmtree(WORK, ignore_errors=True)
    return 0 if summary["all_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
