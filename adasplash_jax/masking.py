"""Which (query, key) pairs may attend, and which key blocks a query block can reach: written once,
used by the dense path and every kernel.

All functions take integer *positions* (not booleans) so that a kernel can call them on
the positions of one tile and the dense path on the whole score matrix, with the same
broadcasting rules: query positions vary along the second-to-last axis, key positions
along the last.
"""

from __future__ import annotations

import jax.numpy as jnp


def keep_mask(
    q_pos,
    kv_pos,
    *,
    is_causal: bool,
    q_len=None,
    kv_len=None,
    q_segment=None,
    kv_segment=None,
    window: tuple[int, int] | None = None,
):
    """True where query ``q_pos`` may attend to key ``kv_pos``.

    Args:
      q_pos: int positions of queries, shape [..., Tq, 1].
      kv_pos: int positions of keys, shape [..., 1, Tk].
      is_causal: keys after the query are dropped (top-left aligned, ``kv_pos <= q_pos``,
        as ``jax.nn.dot_product_attention`` does).
      q_len, kv_len: valid lengths (scalars or arrays broadcastable against the result);
        queries at ``q_pos >= q_len`` and keys at ``kv_pos >= kv_len`` attend nowhere.
      q_segment, kv_segment: segment ids of the queries ([..., Tq, 1]) and keys
        ([..., 1, Tk]); only equal ids attend.
      window: (left, right): query i attends to keys i − left … i + right only (as
        ``jax.nn.dot_product_attention``'s ``local_window_size``).
    """
    keep = jnp.ones(jnp.broadcast_shapes(jnp.shape(q_pos), jnp.shape(kv_pos)), jnp.bool_)
    if is_causal:
        keep = keep & (kv_pos <= q_pos)
    if q_len is not None:
        keep = keep & (q_pos < q_len)
    if kv_len is not None:
        keep = keep & (kv_pos < kv_len)
    if q_segment is not None:
        keep = keep & (q_segment == kv_segment)
    if window is not None:
        left, right = window
        keep = keep & (kv_pos >= q_pos - left) & (kv_pos <= q_pos + right)
    return keep


def reachable_kv_range(q_start, block_q: int, kv_len, *, is_causal: bool, window: tuple[int, int] | None = None):
    """(start, end) of the keys that the query block [q_start, q_start + block_q) can reach.

    Causal masks are top-left aligned, so the block's last query sees keys up to its own
    position; a local window (left, right) bounds both sides; beyond ``kv_len`` every key
    is padding. ``start`` is 0 without a window.
    """
    end = kv_len
    if is_causal:
        end = jnp.minimum(end, q_start + block_q)
    start = 0
    if window is not None:
        left, right = window
        end = jnp.minimum(end, q_start + block_q + right)
        start = jnp.maximum(q_start - left, 0)
    return start, end


def reachable_kv_end(q_start, block_q: int, kv_len, *, is_causal: bool, window: tuple[int, int] | None = None):
    """End (exclusive) of the keys the query block can reach (see ``reachable_kv_range``)."""
    return reachable_kv_range(q_start, block_q, kv_len, is_causal=is_causal, window=window)[1]


def reachable_tiles(num_q_blocks: int, num_kv_blocks: int, block_q: int, block_k: int, *, is_causal: bool,
                    window: tuple[int, int] | None = None):
    """bool [nq, nk]: the tiles a dense kernel would compute (the causal triangle when causal,
    the band of a local window)."""
    q_start = jnp.arange(num_q_blocks)[:, None] * block_q
    kv_start = jnp.arange(num_kv_blocks)[None, :] * block_k
    start, end = reachable_kv_range(q_start, block_q, num_kv_blocks * block_k, is_causal=is_causal, window=window)
    return jnp.broadcast_to((kv_start < end) & (kv_start + block_k > start), (num_q_blocks, num_kv_blocks))


def dense_keep_mask(inp):
    """The boolean keep mask of every (query, key) pair of validated ``AttentionInputs``,
    broadcastable to [B, N, T, S]."""
    B, T, N, _ = inp.query.shape
    S = inp.key.shape[1]
    q_pos = jnp.arange(T, dtype=jnp.int32)[:, None]
    kv_pos = jnp.arange(S, dtype=jnp.int32)[None, :]
    per_batch = lambda x: None if x is None else x[:, None, None, None]  # noqa: E731
    keep = keep_mask(
        q_pos,
        kv_pos,
        is_causal=inp.is_causal,
        q_len=per_batch(inp.q_lengths),
        kv_len=per_batch(inp.kv_lengths),
        q_segment=None if inp.q_segment_ids is None else inp.q_segment_ids[:, None, :, None],
        kv_segment=None if inp.kv_segment_ids is None else inp.kv_segment_ids[:, None, None, :],
        window=inp.window,
    )
    if inp.mask is not None:
        keep = keep & inp.mask
    return jnp.broadcast_to(keep, jnp.broadcast_shapes(keep.shape, (1, 1, T, S)))
