"""The Stage contract.

A stage is a small class with a ``name``, a pydantic ``Params`` model, the ``columns`` it adds,
the ``resources`` one of its workers needs, and a single ``apply(ds, ctx) -> ds``. It receives a
``ray.data.Dataset`` and returns one; the runner places the stage's workers from its declared
resources (``ctx.placement``), materializes the result into the stage cache, counts rows and
records the stage in the manifest. Stages never exit the process and never pull the corpus
into the driver: per-row work uses ``map_batches``; global steps fit on a bounded, seeded sample
or use Ray's distributed operations.

Stages must be order-insensitive: the same set of input rows gives the same output rows
whatever their block layout, so shard bytes do not depend on Ray's parallelism. Samples are
therefore drawn by hashing ids (``pipeline.core.sampling``), never by position.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import ray.data
from pydantic import BaseModel, ConfigDict

from pipeline.models.pool import Placement, Resources, cluster_size, place


class StageParams(BaseModel):
    """Base of every stage's params model; ``name`` selects the stage in the config."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
    name: str


@dataclass
class StageContext:
    """What the runner hands a stage: where it may keep artifacts, the seed, and a place to report.

    ``artifact_dir`` is keyed like the stage's cached output, so an artifact (a fitted model,
    a tokenizer) written there is reused by a rerun with the same params and upstream data.
    ``info`` is copied into the manifest's entry for the stage; ``order`` (set by the order
    stage) becomes the manifest's ``order`` section; ``artifacts`` (name -> path relative to
    the run folder, e.g. ``reference_lm``) is merged into the manifest's ``artifacts`` section,
    where later consumers such as the trainer find them. ``placement`` is where the stage's
    actor pool runs, resolved by the runner from ``Stage.resources()`` and the cluster; a context
    built by hand (a notebook, a test) leaves it None and ``Stage.placement`` resolves it the same way.

    ``upstream_artifacts`` holds the artifacts of the stages before this one (name -> path relative
    to the run folder, e.g. ``reference_lm``), for a step that reuses one of them.

    ``row_tally``, when the runner is logging progress, is a ``pipeline.models.pool.RowTally`` that
    a model stage hands to ``map_with_actor_pool``, so its progress shows while it materializes.

    ``added`` and ``dropped`` (reason -> rows) declare row-count changes that the ``_drop_reason``
    column does not carry (e.g. the repeats of a paced curriculum). The runner checks that
    rows out = rows in - dropped + added, reason by reason summed, and fails the run otherwise:
    a stage cannot lose or gain a row without saying why.
    """

    run_dir: Path
    artifact_dir: Path
    seed: int
    input_columns: list[str]
    info: dict[str, Any] = field(default_factory=dict)
    order: dict[str, Any] | None = None
    artifacts: dict[str, str] = field(default_factory=dict)
    placement: Placement | None = None
    added: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    row_tally: Any = None
    upstream_artifacts: dict[str, str] = field(default_factory=dict)


class Stage:
    """One pipeline step. Subclasses set the class variables and implement ``apply``."""

    name: ClassVar[str]
    Params: ClassVar[type[StageParams]]
    columns: ClassVar[tuple[str, ...]] = ()
    # Columns kept in the stage cache but left out of the shards unless ``output.keep_embeddings``
    # (embedding vectors: large, and only needed by later stages such as clustering).
    cache_only_columns: ClassVar[tuple[str, ...]] = ()
    # True for a stage whose actor pool adds its rows to ``ctx.row_tally`` (the runner's progress lines).
    tallies_rows: ClassVar[bool] = False
    version: ClassVar[int] = 1  # bump when the stage's output changes for the same params

    def __init__(self, params: StageParams) -> None:
        self.params = params

    def resources(self) -> Resources:
        """What one worker needs; a model stage returns its device, threads, GPUs and actor count."""
        return Resources()

    def placement(self, ctx: StageContext) -> Placement:
        """Where this stage's actors run: ``ctx.placement`` (set by the runner), else its declared
        resources placed on the connected cluster, never a silent single actor."""
        return ctx.placement or place(self.resources(), *cluster_size())

    def cache_inputs(self) -> object:
        """What else the stage's output depends on, beyond its params (e.g. the size and mtime of
        files the params name). It goes into the stage's cache key, so editing them reruns it."""
        return None

    def requires(self) -> list[str]:
        """Columns that must exist upstream; checked before any stage runs."""
        return []

    def may_drop(self) -> bool:
        """True when ``apply`` marks rows to drop in a ``_drop_reason`` column (null = keep).

        The runner then keeps those rows out of the output but stores them, with every score
        column and their reason, under the stage's ``dropped/`` cache folder, and counts them by
        reason in the manifest: nothing is lost, and a re-selection needs no rescoring.
        """
        return False

    def apply(self, ds: ray.data.Dataset, ctx: StageContext) -> ray.data.Dataset:
        raise NotImplementedError


def variant_params(data: dict[str, Any], fields: Iterable[str], allowed: Iterable[str],
                   defaults: dict[str, Any], always: Iterable[str] = ()) -> tuple[list[str], dict[str, Any]]:
    """For a params model whose keys depend on a variant (a method, a function): the keys set (not
    null) that belong to the model but not to this variant, and ``data`` with the variant's
    defaults filled in where unset. The caller raises its own message when the first is not empty."""
    skip = {*allowed, *always}
    known = set(fields)
    wrong = [k for k, v in data.items() if k in known and k not in skip and v is not None]
    filled = dict(data)
    for key, value in defaults.items():
        if filled.get(key) is None:
            filled[key] = value
    return wrong, filled
