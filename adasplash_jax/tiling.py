"""Tiles: padding to whole blocks, block-mask index lists and their transposition, tile counting.

Shared by the kernels (which pad their inputs and walk index lists) and the dense path
(whose sparsity statistics are counted on the same tiles). Everything is plain XLA with
static shapes: no host sync under ``jit``.
"""

from __future__ import annotations

import jax.numpy as jnp

from adasplash_jax.inputs import SparsityStats
from adasplash_jax.masking import reachable_tiles


def pad_axis(x, axis: int, size: int, value=0):
    """``x`` padded with ``value`` at the end of ``axis`` up to ``size``."""
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def active_block_lists(block_mask):
    """Count and padded list of the active entries along the last axis of a 0/1 mask.

    Active indices come first, in increasing order (a stable argsort of "inactive"); the
    padding repeats index 0 and is never visited because kernels loop only up to the count.
    """
    active = block_mask > 0
    counts = jnp.sum(active, axis=-1, dtype=jnp.int32)
    order = jnp.argsort(~active, axis=-1, stable=True).astype(jnp.int32)
    slots = jnp.arange(block_mask.shape[-1], dtype=jnp.int32)
    return counts, jnp.where(slots < counts[..., None], order, 0)


def transposed_block_mask(block_mask, width: int):
    """[..., nq, nk] → [..., nk, width]: per key block, which query blocks are active
    (query blocks padded with zeros up to ``width``, e.g. a power of two for Triton loads)."""
    return pad_axis(jnp.swapaxes(block_mask, -1, -2), block_mask.ndim - 1, width)


def block_mask_from_dense(nonzero, block_q: int, block_k: int):
    """[..., T, S] 0/1 → [..., nq, nk]: 1 where a (query block, key block) tile holds a non-zero."""
    *lead, T, S = nonzero.shape
    nq, nk = -(-T // block_q), -(-S // block_k)
    padded = pad_axis(pad_axis(nonzero, -2, nq * block_q), -1, nk * block_k)
    return padded.reshape(*lead, nq, block_q, nk, block_k).max((-3, -1))


def tile_fractions(block_mask, *, block_q: int, block_k: int, is_causal: bool, window=None):
    """Per-head active-tile fraction of a [B, N, nq, nk] 0/1 block mask, among reachable tiles."""
    nq, nk = block_mask.shape[-2:]
    reachable = reachable_tiles(nq, nk, block_q, block_k, is_causal=is_causal, window=window)
    active = jnp.where(reachable, block_mask > 0, False).astype(jnp.float32)
    return active.sum((0, 2, 3)) / (block_mask.shape[0] * jnp.sum(reachable))


def sparsity_stats(block_mask, nonzero_per_row, allowed_per_row, *, block_q: int, block_k: int,
                   is_causal: bool, window=None) -> SparsityStats:
    """``SparsityStats`` from a [B, N, nq, nk] block mask and per-row [B, N, T] counts of
    non-zero probabilities and of allowed (unmasked) keys."""
    tiles = tile_fractions(block_mask, block_q=block_q, block_k=block_k, is_causal=is_causal, window=window)
    nonzero = nonzero_per_row.sum((0, 2)) / jnp.maximum(allowed_per_row.sum((0, 2)), 1.0)
    return SparsityStats(tiles, nonzero)
