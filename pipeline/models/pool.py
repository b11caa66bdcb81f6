"""One actor-pool helper for every model stage: placement from declared resources, then ``map_batches``.

A model stage declares what one worker needs (:class:`Resources`: device, threads, GPUs per
actor, how many actors); :func:`place` turns that into a :class:`Placement` for the cluster at
hand, and :func:`map_with_actor_pool` runs a callable class over the dataset as a Ray actor
pool with exactly that placement. The stage never builds its own pool, so the perplexity
scorer, the hub classifier and the embedder are placed the same way on a laptop and on a
multi-node GPU cluster (NeMo Curator's "resources drive execution").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage asks for; ``None`` means "decide from the cluster".

    ``device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when the cluster has GPUs).
    ``threads``: torch threads per CPU actor (default 1). ``num_gpus``: GPUs per CUDA actor
    (default 1). ``concurrency``: actors (default: as many as the cluster holds).
    """

    device: str = "cpu"
    threads: int | None = None
    num_gpus: float | None = None
    concurrency: int | None = None


@dataclass(frozen=True)
class Placement:
    """The resolved actor pool: where the actors run and how many there are."""

    device: str
    concurrency: int
    num_gpus: float
    threads: int

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def info(self) -> dict[str, Any]:
        """The manifest's view of the placement."""
        data = asdict(self)
        return {"device": data["device"], "concurrency": data["concurrency"],
                "threads_per_actor": data["threads"], "num_gpus_per_actor": data["num_gpus"]}


def cluster_size() -> tuple[int, int]:
    """(CPUs, GPUs) of the connected Ray cluster."""
    resources = ray.cluster_resources()
    return max(1, int(resources.get("CPU", 1))), int(resources.get("GPU", 0))


def largest_node_cpus() -> int:
    """CPUs of the connected cluster's largest live node: the most one task can ask for."""
    return max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=0)


def place(resources: Resources, cpus: int, gpus: int) -> Placement:
    """The placement of ``resources`` on a cluster of ``cpus`` and ``gpus``.

    On CUDA: ``num_gpus`` per actor (default 1) and, by default, as many actors as the GPUs
    hold. On CPU: ``threads`` per actor (default 1) and, by default, one actor per ``threads``
    CPUs, so the pool fills the cluster without oversubscribing a node.
    """
    device = resources.device if resources.device != "auto" else ("cuda" if gpus else "cpu")
    threads = resources.threads or 1
    if device.startswith("cuda"):
        per_actor = resources.num_gpus if resources.num_gpus else 1.0
        return Placement(device, resources.concurrency or max(1, int(gpus / per_actor)), per_actor, threads)
    return Placement(device, resources.concurrency or max(1, cpus // threads), 0.0, threads)


@ray.remote(num_cpus=0, max_restarts=0)
class RowTally:
    """Rows the actors of a running model stage have finished, for the runner's progress lines.

    A model stage materializes its output before the runner writes it to the stage cache, so the
    cache folder shows no rows until the stage is done; the actors add each batch's rows here
    instead (one fire-and-forget call per batch). The runner starts it on its own node only while
    it logs progress.
    """

    def __init__(self) -> None:
        self.rows = 0

    def add(self, rows: int) -> None:
        self.rows += rows

    def total(self) -> int:
        return self.rows


def start_row_tally() -> Any:
    """A :class:`RowTally` on the driver's node (a worker node may die; the driver's cannot without the run)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return RowTally.options(scheduling_strategy=here).remote()


class _Tallied:
    """A model actor whose every batch is also added to a :class:`RowTally`."""

    wrapped: type

    def __init__(self, tally: Any, **kwargs: Any) -> None:
        self._actor = self.wrapped(**kwargs)
        self._tally = tally

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = self._actor(batch)
        self._tally.add.remote(batch.num_rows)
        return out


def _tallied(actor: type) -> type:
    # Keeps the actor's name: Ray titles the worker process after it (ray::MapWorker(MapBatches(NAME))).
    return type(actor.__name__, (_Tallied,), {"wrapped": actor, "__module__": _Tallied.__module__})


# Starting an actor (a process, torch, the model) costs about as much as a few batches of work.
MIN_BATCHES_PER_ACTOR = 4


def actors_for(rows: int, batch_size: int, concurrency: int) -> int:
    """How many actors a pool of at most ``concurrency`` starts for ``rows`` in batches of
    ``batch_size``: at least :data:`MIN_BATCHES_PER_ACTOR` batches each, so a small input gets a
    small pool (450 rows in batches of 256: one actor, not one per CPU)."""
    return max(1, min(concurrency, -(-rows // (MIN_BATCHES_PER_ACTOR * batch_size))))


def map_with_actor_pool(ds: ray.data.Dataset, actor: type, placement: Placement, batch_size: int,
                        constructor_kwargs: dict[str, Any], tally: Any = None,
                        info: dict[str, Any] | None = None) -> ray.data.Dataset:
    """``ds.map_batches(actor)`` as a pool of ``placement.concurrency`` actors on pyarrow batches.

    The actor class is built with ``constructor_kwargs`` plus ``device`` and ``threads`` from the
    placement, so what Ray reserves and what the model uses cannot disagree. The input is
    materialized first: an actor pool that holds every CPU would otherwise starve the upstream
    read tasks (Ray Data then waits forever; seen on 2 cores). Ray hands each actor whole blocks,
    and a small input read from a few files is one or two blocks, which would keep every actor
    but one idle, so it is split until each actor gets several. The actors are not restarted
    when they die (``pipeline.engine.node_loss`` says why and what happens instead). With a
    ``tally`` (:func:`start_row_tally`) each actor adds the rows of every batch it finished to it.
    The pool has ``placement.concurrency`` actors, or fewer for a small input (:func:`actors_for`);
    ``info``, when given, gets the number started as ``actors``.
    """
    ds = ds.materialize()
    rows = ds.count()
    actors = actors_for(rows, batch_size, placement.concurrency)
    if info is not None:
        info["actors"] = actors
    wanted = max(2 * actors, min(-(-rows // batch_size), 16 * actors))
    if ds.num_blocks() < wanted:  # materialized here too: its split tasks need a free CPU
        ds = ds.repartition(wanted).materialize()
    kwargs = {**constructor_kwargs, "device": placement.device, "threads": placement.threads}
    if tally is not None:
        actor, kwargs = _tallied(actor), {**kwargs, "tally": tally}
    return ds.map_batches(
        actor,
        fn_constructor_kwargs=kwargs,
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=placement.threads,
        num_gpus=placement.num_gpus or None,
        # An actor lost with its node is not restarted: the restart would wait for a slot the
        # surviving actors hold. The error fails the stage at once and the runner retries it.
        max_restarts=0,
    )


def _summarize_block(table: pa.Table, reason_column: str, tokens_column: str) -> dict[str, tuple[int, int]]:
    """{reason ('' for scored rows): (tokens, rows)} of one output block."""
    reasons = pc.fill_null(table[reason_column], "")
    grouped = pa.table({"reason": reasons, "n": table[tokens_column]}).group_by(
        "reason", use_threads=False).aggregate([("n", "sum"), ("n", "count")])
    return {reason: (int(tokens or 0), int(rows)) for reason, tokens, rows in
            zip(grouped["reason"].to_pylist(), grouped["n_sum"].to_pylist(), grouped["n_count"].to_pylist())}


_summarize_task = ray.remote(num_cpus=1, max_retries=3)(_summarize_block)


def count_tokens_and_null_reasons(ds: ray.data.Dataset, reason_column: str, tokens_column: str) -> tuple[int, dict[str, int]]:
    """(tokens of the rows without a reason, rows per null reason) of a model stage's output.

    One plain Ray task per block of the materialized output; each sends back one entry per reason,
    never the rows. Plain tasks, not a second Ray Data pass: the blocks already sit in the object
    store, and a Data pass's planning and operator start-up cost seconds on every run.
    """
    refs = ds.to_arrow_refs()
    tokens = 0
    counts: dict[str, int] = {}
    for summary in ray.get([_summarize_task.remote(ref, reason_column, tokens_column) for ref in refs]):
        for reason, (block_tokens, rows) in summary.items():
            if reason == "":
                tokens += block_tokens
            else:
                counts[reason] = counts.get(reason, 0) + rows
    return tokens, dict(sorted(counts.items()))
