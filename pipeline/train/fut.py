"""Training-order effects without retraining: the recorder and the estimator (FUT: Yang et al.,
Estimating the Effects of Sample Training Orders for LLMs without Retraining, 2025).

``record: {fut: ...}`` stores, at a few anchor checkpoints of one reference run, every training
row's gradient preconditioned by Adam's second moment, and the held-out losses' gradients, all
compressed by one seeded random projection. ``estimate`` replays Adam's momentum and the LR
schedule in the projected space for another order of the same rows and adds the first-order
change of each held-out loss to the reference run's, and optionally a second-order term from the
curvature of the held-out loss along the run's own trajectory. The method and its simplifications are in
docs/methods.md ("Order effects without retraining").
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import ConfigError
from pipeline.core.files import write_json_atomic
from pipeline.io.runfolder import shard_files

FOLDER = "fut"
META = "meta.json"
STEPS = "steps.jsonl"


# --------------------------------------------------------------------------- the projection


@dataclass(frozen=True)
class Sketch:
    """A seeded sparse random projection R^d -> R^k (a CountSketch): coordinate i is added, with a
    random sign, to output ``bucket[i]``. E[<Sx, Sy>] = <x, y>, with a spread ~ |x||y| / sqrt(k)."""

    bucket: Any  # torch.int64, (d,)
    sign: Any  # torch.float32, (d,)
    dim: int

    def __call__(self, flat: Any) -> Any:
        import torch

        out = torch.zeros(self.dim, dtype=torch.float32)
        out.index_add_(0, self.bucket, flat.float() * self.sign)
        return out


def make_sketch(d: int, dim: int, seed: int) -> Sketch:
    import torch

    gen = torch.Generator().manual_seed(int(seed) * 2_654_435_761 % (2**63) + 17)
    bucket = torch.randint(0, dim, (d,), generator=gen, dtype=torch.int64)
    sign = torch.randint(0, 2, (d,), generator=gen, dtype=torch.int64).float() * 2 - 1
    return Sketch(bucket, sign, dim)


def anchor_steps(total_steps: int, anchors: int) -> list[int]:
    """Steps before which row gradients are stored: 0, every, 2*every, … (below ``total_steps``),
    ``every = max(1, total_steps // anchors)``."""
    every = max(1, total_steps // anchors)
    return list(range(0, total_steps, every))[:anchors]


def checkpoint_steps(total_steps: int, anchors: int) -> list[int]:
    """Where losses are estimated: every anchor after the first, and the last step."""
    return sorted({*anchor_steps(total_steps, anchors)[1:], total_steps})


def storage_bytes(rows: int, anchors: int, eval_sets: int, checkpoints: int, dim: int) -> int:
    """The array bytes a record holds: float32 vectors of ``dim``, one per row and anchor, one per eval
    set and checkpoint, and the projected weights at step 0 and every checkpoint; and one float64
    inner product per row, anchor and eval set."""
    return 4 * dim * (rows * anchors + (eval_sets + 1) * checkpoints + 1) + 8 * rows * anchors * eval_sets


# --------------------------------------------------------------------------- recording


def _params(model: Any) -> list[Any]:
    return [p for p in model.parameters() if p.requires_grad]


def read_rows(data_dir: str | Path, text_field: str) -> tuple[list[str], list[str]]:
    """(ids, texts) of a run folder's rows in training (``position``) order."""
    import pyarrow.parquet as pq

    ids: list[str] = []
    texts: list[str] = []
    for f in shard_files(data_dir):
        table = pq.read_table(f, columns=["id", text_field, "position"]).sort_by("position")
        ids.extend(str(i) for i in table.column("id").to_pylist())
        texts.extend(t or "" for t in table.column(text_field).to_pylist())
    return ids, texts


class FutRecorder:
    """Rank 0's recorder inside ``train_loop``; writes OUT/fut/ (docs/training.md, ``record: fut``)."""

    def __init__(self, worker: Any, eval_data: dict[str, Any], out_dir: Path):
        from pipeline.train.loader import Encoder

        cfg = worker.plan.train
        spec = cfg.record.fut
        self.worker, self.eval_data, self.spec = worker, eval_data, spec
        self.folder = Path(out_dir) / FOLDER
        self.folder.mkdir(parents=True, exist_ok=True)
        self.total = worker.plan.total_steps
        self.anchors = anchor_steps(self.total, spec.anchors)
        self.checkpoints = checkpoint_steps(self.total, spec.anchors)
        ids, texts = read_rows(worker.plan.data_dir, cfg.data.text_field)
        encoder = Encoder(worker.tokenizer)
        self.ids = ids
        self.tokens = [t + [encoder.eos] for t in encoder.encode(texts)]
        params = _params(worker.model)
        self.sketch = make_sketch(sum(p.numel() for p in params), spec.dim, spec.seed)

    # -- per step

    def before_step(self, step: int) -> None:
        """At an anchor: every row's projected, preconditioned gradient (anchor 0 waits for Adam's
        first step, which sets the second moment it is preconditioned by)."""
        if step == 0:
            self._theta(0)
        if step in self.anchors[1:]:
            self._rows(step)
        if step in self.checkpoints:
            self._eval(step)

    def after_step(self, step: int, lr: float, grad_norm: float | None) -> None:
        """``step`` is the count of steps done; Adam's state now has a second moment for anchor 0."""
        clip = self.worker.plan.train.optimizer.grad_clip
        scale = 1.0 if clip is None or grad_norm is None else min(1.0, clip / (grad_norm + 1e-6))
        with open(self.folder / STEPS, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "lr": lr, "clip_scale": scale}) + "\n")
        if step == 1 and self.anchors:
            self._rows(0)
        if step == self.total:
            self._eval(step)
            # The last anchor: with it, a step's row gradient is interpolated between the anchors around it.
            self._rows(step)
            self._write_meta()

    # -- the stored terms

    def _preconditioner(self) -> Any:
        """Adam's per-coordinate 1 / (sqrt(v_hat) + eps), flattened in parameter order, with sqrt(v_hat)
        floored at its mean over the tensor: the second moment is frozen at the anchor, and a
        coordinate the reference batches barely touched would otherwise give another batch's gradient
        there an unbounded step (in Adam that gradient enters v_hat too and bounds its own step)."""
        import torch

        opt = self.worker.optimizer
        beta2, eps = opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"]
        parts = []
        for p in _params(self.worker.model):
            state = opt.state.get(p) or {}
            v = state.get("exp_avg_sq")
            if v is None:
                parts.append(torch.ones(p.numel()))
                continue
            k = float(state["step"])
            root = (v.detach().float().reshape(-1).cpu() / (1 - beta2**k)).sqrt()
            parts.append(1.0 / (torch.clamp(root, min=float(root.mean())) + eps))
        return torch.cat(parts)

    def _rows(self, anchor: int) -> None:
        """Every row's summed-NLL gradient at the current weights, times D, projected."""
        import torch
        from safetensors.torch import save_file

        path = self.folder / f"rows-{anchor:06d}.safetensors"
        if path.is_file():  # written before a resume
            return
        model, params = self.worker.model, _params(self.worker.model)
        seq_len = self.worker.plan.train.seq_len
        precond = self._preconditioner()
        out = torch.empty(len(self.tokens), self.spec.dim, dtype=torch.float32)
        names = sorted(self.eval_data)
        eval_grads, _ = self._eval_grads()
        # Exact inner products with the held-out gradients here, for the anchored estimate (no projection noise).
        targets = torch.stack([eval_grads[n] * precond for n in names]) if names else None
        dots = torch.zeros(len(self.tokens), len(names), dtype=torch.float64)
        was_training = model.training
        model.eval()  # no dropout: the gradient of the weights, and no RNG drawn from the run
        try:
            for i, toks in enumerate(self.tokens):
                flat = torch.zeros(precond.numel())
                # A row longer than seq_len is cut as the packer would cut it, each piece on its own.
                for start in range(0, len(toks) - 1, seq_len):
                    piece = torch.tensor(toks[start:start + seq_len + 1], dtype=torch.long)
                    ids = piece[:-1].unsqueeze(0).to(self.worker.device)
                    logits = model(input_ids=ids).logits[0].float()
                    nll = torch.nn.functional.cross_entropy(logits, piece[1:].to(self.worker.device), reduction="sum")
                    grads = torch.autograd.grad(nll, params)
                    flat += torch.cat([g.reshape(-1).cpu() for g in grads])
                out[i] = self.sketch(flat * precond)
                if targets is not None:
                    dots[i] = (targets.double() @ flat.double())
        finally:
            model.train(was_training)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"rows": out.contiguous(), "dots": dots.contiguous()}, str(tmp),
                  metadata={"eval_sets": json.dumps(names)})
        tmp.replace(path)

    def _flat_params(self) -> Any:
        import torch

        return torch.cat([p.detach().reshape(-1).float().cpu() for p in _params(self.worker.model)])

    def _theta(self, step: int) -> None:
        """The projected weights, to check how well the replay reproduces the reference trajectory."""
        from safetensors.torch import save_file

        path = self.folder / f"theta-{step:06d}.safetensors"
        if not path.is_file():
            tmp = path.with_name(path.name + ".tmp")
            save_file({"theta": self.sketch(self._flat_params()).contiguous()}, str(tmp))
            tmp.replace(path)

    def _eval_grads(self) -> tuple[dict[str, Any], dict[str, float]]:
        """Each held-out set's mean-NLL gradient (flat, full size) and loss at the current weights."""
        import torch

        model, params = self.worker.model, _params(self.worker.model)
        batch = self.worker.plan.train.eval.batch_size
        grads_out, losses = {}, {}
        was_training = model.training
        model.eval()
        try:
            for name, (ids, mask) in self.eval_data.items():
                count = int((mask[:, 1:] != 0).sum())
                grad = torch.zeros(self.sketch.bucket.numel())
                total = 0.0
                for start in range(0, len(ids), batch):
                    x = ids[start:start + batch].to(self.worker.device)
                    m = mask[start:start + batch].to(self.worker.device)
                    logits = model(input_ids=x, attention_mask=m).logits
                    targets = x[:, 1:].masked_fill(m[:, 1:] == 0, -100)
                    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                                                            targets.reshape(-1), ignore_index=-100, reduction="sum")
                    grads = torch.autograd.grad(nll / max(count, 1), params)
                    grad += torch.cat([g.reshape(-1).cpu() for g in grads])
                    total += float(nll.detach())
                grads_out[name] = grad
                losses[name] = total / max(count, 1)
        finally:
            model.train(was_training)
        return grads_out, losses

    def _eval(self, step: int) -> None:
        """Each held-out set's loss and projected gradient at a checkpoint."""
        from safetensors.torch import save_file

        self._theta(step)
        path = self.folder / f"eval-{step:06d}.safetensors"
        if path.is_file() or not self.eval_data:
            return
        grads, losses = self._eval_grads()
        tmp = path.with_name(path.name + ".tmp")
        save_file({n: self.sketch(g).contiguous() for n, g in grads.items()}, str(tmp),
                  metadata={"losses": json.dumps(losses)})
        tmp.replace(path)

    def _write_meta(self) -> None:
        cfg = self.worker.plan.train
        files = sorted(self.folder.glob("*.safetensors"))
        meta = {
            "method": "fut-first-order", "dim": self.spec.dim, "seed": self.spec.seed,
            "anchors": [*self.anchors, self.total],
            "checkpoints": self.checkpoints, "total_steps": self.total,
            "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "betas": list(cfg.optimizer.betas),
            "ids": self.ids, "lengths": [len(t) for t in self.tokens], "eval_sets": sorted(self.eval_data),
            "storage_bytes": sum(f.stat().st_size for f in files),
            "array_bytes": storage_bytes(len(self.ids), len(self.anchors) + 1, len(self.eval_data),
                                         len(self.checkpoints), self.spec.dim),
        }
        write_json_atomic(self.folder / META, meta)


def record_summary(out_dir: Path) -> dict[str, Any] | None:
    """The training summary's ``record.fut`` entry: what was stored and its size on disk."""
    meta_path = Path(out_dir) / FOLDER / META
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    return {"folder": FOLDER, "dim": meta["dim"], "seed": meta["seed"], "anchors": meta["anchors"],
            "checkpoints": meta["checkpoints"], "rows": len(meta["ids"]), "storage_bytes": meta["storage_bytes"],
            "array_bytes": meta["array_bytes"]}


# --------------------------------------------------------------------------- estimating


@dataclass
class Record:
    """A training folder's FUT record, loaded."""

    meta: dict[str, Any]
    lrs: np.ndarray  # (T,)
    clip: np.ndarray  # (T,)
    rows: dict[int, np.ndarray]  # anchor step -> (N, k)
    dots: dict[int, np.ndarray]  # anchor step -> (N, eval sets): <held-out gradient, D g_row> at the anchor
    eval_grads: dict[int, dict[str, np.ndarray]]  # checkpoint -> set -> (k,)
    eval_losses: dict[int, dict[str, float]]  # checkpoint -> set -> reference loss
    theta: dict[int, np.ndarray]  # step -> projected weights (0 and every checkpoint)

    @property
    def ids(self) -> list[str]:
        return self.meta["ids"]


def load_record(train_dir: str | Path) -> Record:
    from safetensors import safe_open

    folder = Path(train_dir) / FOLDER
    if not (folder / META).is_file():
        raise ConfigError(f"{train_dir}: no complete FUT record ({FOLDER}/{META}); train with "
                          "train.record.fut set (e.g. --set train.record.fut.dim=256) and let the run finish")
    meta = json.loads((folder / META).read_text())
    steps = {}
    for line in (folder / STEPS).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            steps[rec["step"]] = rec
    total = meta["total_steps"]
    lrs = np.array([steps[s + 1]["lr"] for s in range(total)], dtype=np.float64)
    clip = np.array([steps[s + 1]["clip_scale"] for s in range(total)], dtype=np.float64)
    rows, dots, grads, losses = {}, {}, {}, {}
    for a in meta["anchors"]:
        with safe_open(str(folder / f"rows-{a:06d}.safetensors"), "np") as f:
            rows[a] = f.get_tensor("rows").astype(np.float64)
            dots[a] = f.get_tensor("dots")
    for c in meta["checkpoints"] if meta["eval_sets"] else []:
        with safe_open(str(folder / f"eval-{c:06d}.safetensors"), "np") as f:
            grads[c] = {k: f.get_tensor(k).astype(np.float64) for k in f.keys()}
            losses[c] = json.loads(f.metadata()["losses"])
    theta = {}
    for c in [0, *meta["checkpoints"]]:
        with safe_open(str(folder / f"theta-{c:06d}.safetensors"), "np") as f:
            theta[c] = f.get_tensor("theta").astype(np.float64)
    return Record(meta, lrs, clip, rows, dots, grads, losses, theta)


def check_permutation(record: Record, order: Sequence[str]) -> np.ndarray:
    """Row indices (into the record) of ``order``; ConfigError unless it is a permutation of the
    rows the run trained on."""
    index = {i: n for n, i in enumerate(record.ids)}
    unknown = [i for i in order if i not in index]
    if unknown:
        raise ConfigError(f"the order has {len(unknown)} row(s) the run did not train on (e.g. {unknown[:3]}); "
                          "whatif estimates other orders of the same rows only")
    rows = np.fromiter((index[i] for i in order), dtype=np.int64, count=len(order))
    if len(set(rows.tolist())) != len(rows):
        raise ConfigError(f"the order repeats {len(rows) - len(set(rows.tolist()))} row(s); give each row once")
    if len(rows) != len(index):
        raise ConfigError(f"the order leaves out {len(index) - len(rows)} of the run's {len(index)} rows; "
                          "give every row once")
    return rows


def step_shares(rows: np.ndarray, lengths: np.ndarray, tokens_per_step: int, total_steps: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, step, share of the row's tokens) for the packed stream of ``rows`` (repeated over
    epochs) cut into ``total_steps`` steps of ``tokens_per_step`` tokens."""
    need = tokens_per_step * total_steps
    epoch_tokens = int(lengths[rows].sum())
    epochs = max(1, math.ceil(need / max(epoch_tokens, 1)))
    seq = np.tile(rows, epochs)
    lens = lengths[seq]
    ends = np.cumsum(lens)
    starts = ends - lens
    keep = starts < need
    seq, lens, starts, ends = seq[keep], lens[keep], starts[keep], np.minimum(ends[keep], need)
    first, last = starts // tokens_per_step, (ends - 1) // tokens_per_step
    out_r, out_s, out_w = [], [], []
    for span in range(int((last - first).max(initial=0)) + 1):
        step = first + span
        on = step <= last
        lo = np.maximum(starts[on], step[on] * tokens_per_step)
        hi = np.minimum(ends[on], (step[on] + 1) * tokens_per_step)
        out_r.append(seq[on])
        out_s.append(step[on])
        out_w.append((hi - lo) / lens[on])
    return np.concatenate(out_r), np.concatenate(out_s), np.concatenate(out_w)


ESTIMATORS = ("projected", "anchored")


def replay(record: Record, rows: np.ndarray, vectors: dict[int, np.ndarray],
           interpolate: bool = True) -> dict[int, np.ndarray]:
    """Adam's momentum replayed for training on ``rows`` in this order, with the anchors' frozen
    preconditioners and the recorded LRs and clip scales, on per-row vectors that are linear in the
    row's preconditioned gradient (``vectors[anchor]``: (N, m)); the summed change at each checkpoint.

    A row's vector at step s is the one at the last anchor at or before s, or (``interpolate``)
    linearly interpolated between that anchor and the next: a row's gradient shrinks as the run
    learns, and an anchor's gradient held for a whole segment overshoots."""
    meta = record.meta
    total, tps = meta["total_steps"], meta["batch_size"] * meta["seq_len"]
    lengths = np.asarray(meta["lengths"], dtype=np.int64)
    r, s, w = step_shares(rows, lengths, tps, total)
    anchors = np.asarray(meta["anchors"])
    j = np.searchsorted(anchors, s, side="right") - 1
    width = next(iter(vectors.values())).shape[1]
    updates = np.zeros((total, width))
    if interpolate and len(anchors) > 1:
        nxt = np.minimum(j + 1, len(anchors) - 1)
        span = np.maximum(anchors[nxt] - anchors[j], 1)
        tau = np.where(nxt > j, (s - anchors[j]) / span, 0.0)
    else:
        nxt, tau = j, np.zeros(len(s))
    for k, anchor in enumerate(anchors):
        for index, weight in ((j, 1.0 - tau), (nxt, tau)):
            on = (index == k) & (weight > 0)
            np.add.at(updates, s[on], (w[on] * weight[on])[:, None] * vectors[int(anchor)][r[on]])
    labels = meta["batch_size"] * (meta["seq_len"] - 1)  # the loss is a mean over this many targets
    updates *= (record.clip / labels)[:, None]
    beta1 = meta["betas"][0]
    m = np.zeros(width)
    theta = np.zeros(width)
    out = {}
    checkpoints = set(meta["checkpoints"])
    for t in range(total):
        m = beta1 * m + (1 - beta1) * updates[t]
        theta -= record.lrs[t] * m / (1 - beta1 ** (t + 1))
        if t + 1 in checkpoints:
            out[t + 1] = theta.copy()
    return out


SECOND_ORDER = ("trajectory", "bfgs")


@dataclass(frozen=True)
class Secant:
    """One secant pair of a held-out loss along the run: s = P(θ_b − θ_a), y = P(∇L(θ_b) − ∇L(θ_a))."""

    s: np.ndarray
    y: np.ndarray
    status: str  # ok | negative | unresolved

    @property
    def curvature(self) -> float:
        """κ = ⟨y, s⟩ / ⟨s, s⟩: the mean Hessian over the segment, in the direction s (0 unless ``ok``)."""
        return float(self.y @ self.s) / float(self.s @ self.s) if self.status == "ok" else 0.0

    def term(self, delta: np.ndarray, model: str) -> float:
        """½ Δᵀ B Δ for a rank-one B built from this pair: ``trajectory``, B = κ ŝŝᵀ (the curvature
        where the run measured it, applied to Δ's component along ŝ); ``bfgs``, B = y yᵀ / ⟨y, s⟩ (the
        first BFGS update from zero, which meets the secant condition B s = y in every direction)."""
        if self.status != "ok":
            return 0.0
        if model == "trajectory":
            return 0.5 * float(self.y @ self.s) * float(delta @ self.s) ** 2 / float(self.s @ self.s) ** 2
        return 0.5 * float(self.y @ delta) ** 2 / float(self.y @ self.s)


def secant(record: Record, checkpoint: int, name: str) -> Secant:
    """The secant pair of held-out set ``name``'s loss over the checkpoint pair ending at
    ``checkpoint`` (the first checkpoint borrows the pair after it: no held-out gradient is recorded at
    step 0), from the projected weights and held-out gradients the run recorded there. It is used
    (status ``ok``) only where ⟨y, s⟩ is positive by more than twice the spread a sketched inner
    product has (|y||s|/√dim); otherwise the term is dropped (status ``negative`` or ``unresolved``)
    rather than given a sign the data do not support: with negative curvature a quadratic model
    would reward moving ever further from the reference."""
    points = record.meta["checkpoints"]
    if len(points) < 2:
        raise ConfigError("the second-order term needs held-out gradients at two checkpoints or more; "
                          "record with train.record.fut.anchors of 2 or more")
    k = points.index(checkpoint)
    a, b = (points[k - 1], points[k]) if k else (points[0], points[1])
    s = record.theta[b] - record.theta[a]
    y = record.eval_grads[b][name] - record.eval_grads[a][name]
    ys = float(y @ s)
    noise = 2.0 * float(np.linalg.norm(y) * np.linalg.norm(s)) / math.sqrt(record.meta["dim"])
    status = "unresolved" if not s.any() or abs(ys) <= noise else "ok" if ys > 0 else "negative"
    return Secant(s, y, status)


def estimate(record: Record, order: Sequence[str], reference: Sequence[str] | None = None,
             estimator: str = "projected", interpolate: bool = True, second_order: str | None = None
             ) -> dict[str, Any]:
    """Estimated held-out losses (per set, per checkpoint) for training on ``order``, with diagnostics.

    ``projected`` (FUT's, the default): the projected weight change at a checkpoint dotted with the
    projected held-out gradient there. ``anchored``: each step's change dotted, exactly, with the held-out
    gradient at that step's anchor (no projection noise; the held-out gradient is the anchor's, not
    the checkpoint's). Both are returned; ``final`` and ``curves`` are ``estimator``'s. The change is
    taken between two replays through the same code, so the reference order gives the recorded losses.

    ``second_order`` (``trajectory`` or ``bfgs``) adds ½ PΔθ_cᵀ B PΔθ_c to both estimators, B a
    rank-one curvature of the held-out loss from the secant of the run's own trajectory over the
    checkpoints around c (``Secant.term``). ``final`` and ``curves`` are then second order; the
    first-order ones stay in ``by_estimator`` and ``first_order_final``, and each diagnostic row gives
    the term, κ, the secant's status and the term's size against the first-order change."""
    if estimator not in ESTIMATORS:
        raise ConfigError(f"estimator {estimator!r}: use one of {ESTIMATORS}")
    if second_order is not None and second_order not in SECOND_ORDER:
        raise ConfigError(f"second_order {second_order!r}: use one of {SECOND_ORDER} (or none: first order)")
    rows = check_permutation(record, order)
    ref_rows = np.arange(len(record.ids)) if reference is None else check_permutation(record, reference)
    new, ref = replay(record, rows, record.rows, interpolate), replay(record, ref_rows, record.rows, interpolate)
    names = record.meta["eval_sets"]
    if names:
        new_dots = replay(record, rows, record.dots, interpolate)
        ref_dots = replay(record, ref_rows, record.dots, interpolate)
    k = record.meta["dim"]
    curves: dict[str, dict[str, dict[str, float]]] = {e: {} for e in ESTIMATORS}
    curves2: dict[str, dict[str, dict[str, float]]] = {e: {} for e in ESTIMATORS}
    diagnostics = []
    for c in record.meta["checkpoints"]:
        delta = new[c] - ref[c]
        moved = float(np.linalg.norm(ref[c]))
        real = record.theta[c] - record.theta[0]
        # How well the frozen-preconditioner replay of the reference order matches the weights the
        # reference run really reached (weight decay is not replayed).
        cosine = float(ref[c] @ real / (moved * np.linalg.norm(real))) if moved > 0 and real.any() else 0.0
        row = {"step": c, "delta_norm": float(np.linalg.norm(delta)),
               "relative_shift": float(np.linalg.norm(delta) / moved) if moved > 0 else 0.0,
               "replay_cosine": cosine, "replay_norm_ratio": moved / float(np.linalg.norm(real)) if real.any() else 0.0}
        for j, name in enumerate(names):
            base = record.eval_losses[c][name]
            grad = record.eval_grads[c][name]
            projected, anchored = float(grad @ delta), float(new_dots[c][j] - ref_dots[c][j])
            curves["projected"].setdefault(name, {})[str(c)] = base + projected
            curves["anchored"].setdefault(name, {})[str(c)] = base + anchored
            row[f"change_{name}"] = {"projected": projected, "anchored": anchored}
            # The spread of a sketched dot product: about |g||delta| / sqrt(k).
            row[f"projection_sd_{name}"] = float(np.linalg.norm(grad) * np.linalg.norm(delta) / math.sqrt(k))
            if second_order:
                pair = secant(record, c, name)
                term = pair.term(delta, second_order)
                along = float(delta @ pair.s) / float(np.linalg.norm(pair.s)) if pair.s.any() else 0.0
                for e, first in (("projected", projected), ("anchored", anchored)):
                    curves2[e].setdefault(name, {})[str(c)] = base + first + term
                row[f"second_order_{name}"] = {
                    "term": term, "curvature": pair.curvature, "status": pair.status, "along_trajectory": along,
                    # The share of the weight change along the trajectory, where the curvature was measured.
                    "along_share": abs(along) / row["delta_norm"] if row["delta_norm"] else 0.0,
                    # The term against the first-order change: near or above 1, the expansion is not converging.
                    "ratio": {"projected": abs(term) / abs(projected) if projected else 0.0,
                              "anchored": abs(term) / abs(anchored) if anchored else 0.0}}
        diagnostics.append(row)
    final = str(record.meta["total_steps"])
    finals = {e: {n: v[final] for n, v in curves[e].items()} for e in ESTIMATORS}
    by_estimator: dict[str, dict[str, Any]] = {e: {"final": finals[e], "curves": curves[e]} for e in ESTIMATORS}
    chosen = by_estimator[estimator]
    if second_order:
        for e in ESTIMATORS:
            by_estimator[e]["second_order"] = {"final": {n: v[final] for n, v in curves2[e].items()},
                                               "curves": curves2[e]}
        chosen = by_estimator[estimator]["second_order"]
    return {"estimator": estimator, "second_order": second_order, "final": chosen["final"],
            "curves": chosen["curves"], "first_order_final": finals[estimator], "by_estimator": by_estimator,
            "reference_final": dict(record.eval_losses.get(int(final), {})),
            "diagnostics": diagnostics, "rows_moved": int((rows != ref_rows).sum())}
