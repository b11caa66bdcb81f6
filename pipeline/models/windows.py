"""Windows over long documents and the padding rule every scoring kernel shares.

A document longer than the model context is scored over windows; each token is scored exactly
once. Every window (or row) is padded to a length that depends on its own length only, so a
document's score never depends on which documents share its forward batch: the shard bytes
must not depend on Ray's block layout.
"""

from __future__ import annotations

from typing import Any


def plan_windows(n: int, max_length: int, stride: int | None) -> list[tuple[int, int, int]]:
    """Windows over a sequence of ``n`` tokens (BOS included) as (start, first_target, end).

    Targets are positions 1..n-1, each scored exactly once, by the window whose
    [first_target, end) holds it, with the tokens from ``start`` as context.
    """
    step = stride or (max_length - 1)
    windows: list[tuple[int, int, int]] = []
    target = 1
    while target < n:
        end = min(n, target + (max_length - 1 if not windows else step))
        windows.append((max(0, end - max_length), target, end))
        target = end
    return windows


def padded_length(length: int, multiple: int, cap: int) -> int:
    """The padded length of a window: a function of its own length only (see the determinism note)."""
    return min(cap, -(-length // multiple) * multiple)


def context_size(config: Any) -> int | None:
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
