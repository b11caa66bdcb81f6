"""SIGKILL `curriculum run` inside stages and the shard writer, resume, and compare shard bytes.

One run folder is killed again and again: each rerun resumes from the stage cache and is killed
at the next seeded point, until a last rerun finishes. Its shards must be byte-identical to an
uninterrupted run's, every stage finished before a kill must be read back from the cache, and no
temporary folder of a killed write may survive. The uninterrupted run has a local Ray of its own
with 1 CPU and the killed one the session's 2-CPU cluster: where the tasks run and how they
interleave differ with the CPU count, and the bytes may not (the CI variant's 450 rows get one
scorer either way, ``pipeline.models.pool.actors_for``; layout independence of every order
strategy alone is a property test in test_order_properties.py). CI runs the seeds below on configs/tiny.yaml in
small (one kill inside the reference-LM perplexity stage, one in the writer);
``KILL_ALL_SITES=1`` runs a pipeline with every kind of stage and kills inside each of them, and
``benchmarks/kill_anywhere.py`` does that for two seed sets (benchmarks/README.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.kill_harness import PIPELINE_SITES, Kill, completed, draw_kill, file_hashes, kill_config, killed, run_cli, site_files

ALL_SITES = bool(os.environ.get("KILL_ALL_SITES"))
CI_SEEDS = {"stage:perplexity": 1002, "write": 1009}
CI_STAGES = ("read", "quality", "perplexity", "quality_classifier", "combine", "order")  # kill_config(full=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, ray_address: str) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("kill")
    config = folder / "kill.yaml"
    config.write_text(yaml.safe_dump(kill_config(docs=800 if ALL_SITES else 450, full=ALL_SITES)))
    out = folder / "reference"
    completed(["run", str(config), "--out", str(out), "--set", "ray.num_cpus=1"], "the reference on 1 CPU")
    return config, out


def _sites() -> dict[str, int]:
    if ALL_SITES:
        return {site: 1000 + i for i, site in enumerate(PIPELINE_SITES)}
    return CI_SEEDS


def test_killed_inside_stages_and_the_writer_resumes_to_the_same_bytes(reference, ray_address, cli, tmp_path):
    config, ref_out = reference
    out = tmp_path / "killed"
    args = ["run", str(config), "--out", str(out), "--ray-address", ray_address]
    kills = [draw_kill(seed, site, site_files(ref_out, site)) for site, seed in _sites().items()]
    print("kill points:", "; ".join(map(str, kills)))
    previous = None
    for kill in kills:
        result = killed(args, kill)
        assert not (out / "manifest.json").exists(), f"[{kill}] the manifest was written before the kill"
        if previous is not None:
            _check_resumed(result.stderr, previous, str(kill))
        previous = kill

    final = cli(*args)  # the last rerun is not killed: in this process (tests/conftest.py's cli)
    assert final.returncode == 0, f"[after {previous}] the resumed run failed: {final.stderr[-2000:]}"
    _check_resumed(final.stderr, previous, "the last rerun")
    columns = pq.read_schema(next(out.glob("shards/*.parquet"))).names
    assert {"ppl", "quality_clf", "quality", "position"} <= set(columns)
    assert file_hashes(out) == file_hashes(ref_out) and len(file_hashes(out)) >= 3
    assert file_hashes(out, "quarantine/*.parquet") == file_hashes(ref_out, "quarantine/*.parquet")
    leftovers = [p for p in out.rglob(".*tmp-*")] + [p for p in out.glob(".shards.*")]
    assert not leftovers, f"temporary folders of killed writes survived: {leftovers[:3]}"
    assert cli("verify", str(out)).returncode == 0


def _check_resumed(stderr: str, after: Kill, context: str) -> None:
    """What finished before the kill ``after`` is read back from the cache; the stage it hit is redone."""
    names = [site.split(":", 1)[-1] for site in PIPELINE_SITES if ALL_SITES or site == "write" or site[6:] in CI_STAGES]
    hit = after.site.split(":", 1)[-1]
    for name in names[:names.index(hit)]:
        assert f"{name}] cached" in stderr, f"[{context}] {name} was recomputed after the kill {after}"
    if hit != "write":
        assert f"{hit}] cached" not in stderr, f"[{context}] {hit} was read from the cache after the kill {after}"


def test_a_kill_point_is_reproducible_from_its_seed(reference):
    _, ref_out = reference
    files = site_files(ref_out, "write")
    assert files >= 2, "the kill config should write several shards"
    first = draw_kill(1009, "write", files)
    assert first == draw_kill(1009, "write", files)
    assert 1 <= first.count <= files - 1
    assert {draw_kill(seed, "write", files).count for seed in range(1000, 1100)} == set(range(1, files))


def test_a_malformed_kill_point_is_a_clear_error(tmp_path):
    result = run_cli(["run", "configs/tiny.yaml", "--out", str(tmp_path / "x")], Kill(0, "stage:quality", 0))
    assert result.returncode == 2
    assert "CURRICULUM_KILL_AT='stage:quality:0': expected SITE:N with N >= 1" in result.stderr
    assert not (tmp_path / "x").exists()
