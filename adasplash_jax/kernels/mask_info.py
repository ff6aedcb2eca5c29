"""Dense per-entry inputs (a boolean ``mask``, an additive ``bias``) reduced, once and on
device, to what the kernels read tile by tile.

Like the mask info of JAX's splash attention, but built from a traced array under jit
(splash builds it from a static mask on the host): each (query block, key block) tile of
the mask is EMPTY (nothing kept: no kernel visits it), FULL (everything kept: no mask
load) or PARTIAL (the kernel loads the mask tile). Both arrays keep their size-1 batch and
head dims (a mask shared by every head is stored once); their query and key dims are
broadcast and padded to whole blocks.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from adasplash_jax.masking import reachable_tiles
from adasplash_jax.tiling import active_block_lists, pad_axis

EMPTY, PARTIAL, FULL = 0, 1, 2


def tile_kinds(mask, block_q: int, block_k: int):
    """int32 [..., nq, nk] of EMPTY / PARTIAL / FULL for a bool mask [..., T, S].

    Positions past T or S (the padding of the last blocks) count as dropped, so a
    partially padded tile is PARTIAL unless it keeps nothing.
    """
    *lead, T, S = mask.shape
    nq, nk = -(-T // block_q), -(-S // block_k)
    padded = pad_axis(pad_axis(mask.astype(jnp.int32), -2, nq * block_q), -1, nk * block_k)
    kept = padded.reshape(*lead, nq, block_q, nk, block_k).sum((-3, -1))
    return jnp.where(kept == 0, EMPTY, jnp.where(kept == block_q * block_k, FULL, PARTIAL)).astype(jnp.int32)


def layout(x) -> tuple[bool, bool] | None:
    """(batched, per_head) of a rank-4 [b, n, t, s] input: whether its batch and head dims are
    full (else size 1, shared); None when the input is absent."""
    return None if x is None else (x.shape[0] != 1, x.shape[1] != 1)


class DenseTileInputs(NamedTuple):
    """The dense inputs as the kernels take them (each None when absent).

    mask: int8 [b, n, T_pad, S_pad] (1 = keep); kinds: int32 [b, n, nq, nk_pad] (EMPTY /
    PARTIAL / FULL; padding columns EMPTY); bias: [b, n, T_pad, S_pad] in the input dtype.
    """

    mask: jax.Array | None
    kinds: jax.Array | None
    bias: jax.Array | None


def dense_tile_inputs(mask, bias, *, q_len: int, kv_len: int, block_q: int, block_k: int,
                      kv_blocks_padded: int) -> DenseTileInputs:
    """Broadcasts ``mask`` and ``bias`` ([b, n, t|1, s|1]) over queries and keys, pads them to
    whole blocks and classifies the mask's tiles."""
    kinds = None
    if mask is not None:
        b, n = mask.shape[:2]
        mask = jnp.broadcast_to(mask, (b, n, q_len, kv_len))
        kinds = pad_axis(tile_kinds(mask, block_q, block_k), -1, kv_blocks_padded, EMPTY)
        mask = _pad_tiles(mask.astype(jnp.int8), block_q, block_k)
    if bias is not None:
        b, n = bias.shape[:2]
        bias = _pad_tiles(jnp.broadcast_to(bias, (b, n, q_len, kv_len)), block_q, block_k)
    return DenseTileInputs(mask, kinds, bias)


def _pad_tiles(x, block_q: int, block_k: int):
    T, S = x.shape[-2:]
    return pad_axis(pad_axis(x, -2, -(-T // block_q) * block_q), -1, -(-S // block_k) * block_k)


def visible_key_blocks(kinds, *, block_q: int, block_k: int, is_causal: bool, window):
    """Per query block, the key blocks the τ kernel visits: reachable (causal triangle, window
    band) and not EMPTY in the mask. (count [b, n, nq], ascending list [b, n, nq, nk_pad])."""
    nq, nk = kinds.shape[-2:]
    reach = reachable_tiles(nq, nk, block_q, block_k, is_causal=is_causal, window=window)
    return active_block_lists(((kinds != EMPTY) & reach).astype(jnp.int32))


def transposed_kinds(kinds, num_kv_blocks: int, q_blocks_padded: int):
    """kinds [b, n, nq, nk_pad] → [b, n, nk, nq_pad] for kernels whose grid runs over key blocks."""
    return pad_axis(jnp.swapaxes(kinds[..., :num_kv_blocks], -1, -2), -1, q_blocks_padded, EMPTY)
