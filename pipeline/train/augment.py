"""Masked Thought (Chen et al., 2024, "Masked Thought: Simply Masking Partial Reasoning Steps Can
Improve Mathematical Reasoning Learning of Language Models"): at load time a seeded random share of
each response's input tokens is replaced by a mask token, while the labels keep the original tokens.

Whether a token is masked is a function of (seed, global row, index in the document) alone — the
global row is ``epoch * rows + position`` — so the masks do not depend on batching, ranks, loader
workers or where a run was resumed, and each epoch masks other tokens. docs/methods.md §13.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DEFAULT_MASK_TOKEN = "<|mask|>"
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise on uint64 (wrapping arithmetic is the point)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def token_uniform(seed: int, grow: np.ndarray, tpos: np.ndarray) -> np.ndarray:
    """A number in [0, 1) per token, a function of (seed, global row, index in its document) only."""
    with np.errstate(over="ignore"):
        key = _mix64(np.full(len(grow), seed, dtype=np.uint64) + _GOLDEN)
        h = _mix64(key ^ (np.asarray(grow, dtype=np.int64).astype(np.uint64) * _GOLDEN))
        h = _mix64(h ^ np.asarray(tpos, dtype=np.int64).astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) / float(2**53)


def masked_positions(maskable: np.ndarray, grow: np.ndarray, tpos: np.ndarray, seed: int, ratio: float) -> np.ndarray:
    """Which tokens to mask: each ``maskable`` token independently with probability ``ratio``."""
    if ratio <= 0 or not len(grow):
        return np.zeros(len(grow), dtype=bool)
    return maskable & (token_uniform(seed, grow, tpos) < ratio)


def mask_token(tokenizer: Any, configured: str | None) -> str:
    """The mask token's string: the configured one, else the tokenizer's own mask token, else the default."""
    if configured:
        return configured
    own = getattr(tokenizer, "mask_token", None)
    return own if isinstance(own, str) and own else DEFAULT_MASK_TOKEN


def add_mask_token(tokenizer: Any, configured: str | None) -> int:
    """Add the mask token to ``tokenizer`` (in place) when its vocabulary lacks it; return its id."""
    token = mask_token(tokenizer, configured)
    if token not in tokenizer.get_vocab():
        # Special, so the tokenizer never splits it and no text token is merged into it.
        tokenizer.add_tokens([token], special_tokens=True)
    return int(tokenizer.convert_tokens_to_ids(token))


def mask_token_id(tokenizer: Any, configured: str | None) -> int:
    """The id of the mask token in a tokenizer that already holds it (the one saved in OUT/tokenizer)."""
    token = mask_token(tokenizer, configured)
    if token not in tokenizer.get_vocab():
        raise ValueError(f"the tokenizer has no mask token {token!r}")
    return int(tokenizer.convert_tokens_to_ids(token))
