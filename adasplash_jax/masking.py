"""Which (query, key) pairs may attend: written once, used by the dense path and every kernel.

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
    return keep

