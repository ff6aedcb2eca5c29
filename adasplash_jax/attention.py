"""Entmax attention with the calling convention of ``jax.nn.dot_product_attention``: the public
entry points, dispatching to the dense path (``implementation="xla"``, every backend, the
correctness reference) or the Pallas kernels (``implementation="pallas"``).

Layout [batch, length, heads, head_dim]. Imports run one way: inputs → masking/solver →
entmax → tiling → dense / kernels → here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from adasplash_jax.dense import dense_attention, dense_sparsity_stats
from adasplash_jax.inputs import AttentionInputs, SparsityStats, check_attention_inputs
from adasplash_jax.kernels import pallas_attention
from adasplash_jax.kernels.config import default_tile_shape, unsupported_reason
from adasplash_jax.masking import dense_keep_mask

__all__ = [
    "entmax_attention",
    "entmax_attention_with_stats",
    "SparsityStats",
    # the pieces models/ builds on (dense probabilities with the library's mask rule)
    "check_attention_inputs",
    "dense_attention",
    "dense_keep_mask",
]

_IMPLEMENTATIONS = (None, "xla", "pallas")


def default_implementation() -> str:
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def entmax_attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    alpha=1.5,
    scale=None,
    is_causal: bool = False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size=None,
    segment_ids=None,
    alibi_slopes=None,
    implementation: str | None = None,
    interpret: bool | None = None,
    block_sizes=None,
):
    """α-entmax attention, a drop-in for ``jax.nn.dot_product_attention`` (same argument order).

    Args:
      query: [batch, q_len, heads, head_dim], or [q_len, heads, head_dim].
      key, value: [batch, kv_len, kv_heads, head_dim] (or without batch, like query);
        ``heads`` must be a multiple of ``kv_heads`` (grouped-query attention; K/V are never
        repeated in memory).
      bias: additive, float, broadcastable to [batch, heads, q_len, kv_len]; differentiable.
      mask: bool, broadcastable to [batch, heads, q_len, kv_len]; True keeps.
      alpha: a float in [1.001, 2] or an array [heads] (one α per query head, differentiable;
        a traced α outside that range gives NaN).
      scale: score scale (a float or a concrete scalar array), default ``1/sqrt(head_dim)``.
      is_causal: causal mask, top-left aligned like ``jax.nn.dot_product_attention``.
      query_seq_lengths, key_value_seq_lengths: int [batch]; positions at or beyond the
        length are padding (padded queries output zeros).
      local_window_size: int or (left, right): query i attends to keys i − left … i + right.
      segment_ids: int [batch, length] for self-attention over packed sequences, or a pair
        (query ids [batch, q_len], kv ids [batch, kv_len]); only equal ids attend.
      alibi_slopes: float [heads]: the bias −slope·|i − j| (ALiBi), never materialised by
        the caller.
      implementation: "xla" (dense), "pallas" (the AdaSplash kernels; interpret mode on
        CPU), or None: "pallas" on a GPU when the kernels take these arguments, else "xla".
      interpret: Pallas only: None runs the kernels in interpret mode on non-GPU backends;
        False forces real (Triton) lowering, True forces interpret mode.
      block_sizes: Pallas only: an ``adasplash_jax.BlockSizes`` (tiles, warps, stages, τ
        passes); None picks defaults for the head dim.

    Returns:
      The query's shape, in the query dtype. Queries with nothing to attend to get zero rows.
    """
    return _attend(query, key, value, bias, mask, dict(
        alpha=alpha, scale=scale, is_causal=is_causal, query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths, local_window_size=local_window_size,
        segment_ids=segment_ids, alibi_slopes=alibi_slopes), implementation, interpret, block_sizes,
        return_stats=False)


def entmax_attention_with_stats(query, key, value, bias=None, mask=None, *, implementation=None, interpret=None,
                                block_sizes=None, **kwargs):
    """``entmax_attention`` that also returns per-head ``SparsityStats`` (for monitoring).

    The Pallas path gets them from its τ pass at no extra pass; the dense path from its
    probabilities. Same arguments as ``entmax_attention``.
    """
    return _attend(query, key, value, bias, mask, _with_defaults(kwargs), implementation, interpret, block_sizes,
                   return_stats=True)


def _attend(query, key, value, bias, mask, kwargs, implementation, interpret, block_sizes, *, return_stats):
    unbatched = all(getattr(t, "ndim", None) == 3 for t in (query, key, value))
    if unbatched:  # [T, N, H] like jax: a batch of one
        query, key, value = (None if t is None else jnp.asarray(t)[None] for t in (query, key, value))
    inp = check_attention_inputs(query, key, value, bias=bias, mask=mask, **kwargs)
    result = _dispatch(inp, implementation, interpret, block_sizes, return_stats=return_stats)
    if not unbatched:
        return result
    return (result[0][0], result[1]) if return_stats else result[0]


def _dispatch(inp: AttentionInputs, implementation, interpret, block_sizes, *, return_stats: bool):
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"`implementation` must be one of {_IMPLEMENTATIONS}, got {implementation!r}")
    if implementation is None:
        implementation = "pallas" if default_implementation() == "pallas" and unsupported_reason(inp) is None else "xla"
    if inp.query.size == 0 or inp.key.size == 0:
        # Empty batch, lengths, heads or head_dim: an empty result (no keys: zero rows, as
        # for queries with nothing to attend to); no kernel is launched.
        out = jnp.zeros(inp.query.shape, inp.query.dtype)
        zeros = jnp.zeros((inp.query.shape[2],), jnp.float32)
        return (out, SparsityStats(zeros, zeros)) if return_stats else out
    if implementation == "xla":
        if block_sizes is not None or interpret is not None:
            raise ValueError("`block_sizes` and `interpret` apply to implementation='pallas' only")
        if not return_stats:
            return dense_attention(inp)
        out, probs = dense_attention(inp, return_probabilities=True)
        block_q, block_k = default_tile_shape(inp.query.shape[3], inp.query.shape[1], inp.key.shape[1])
        return out, dense_sparsity_stats(inp, probs, block_q=block_q, block_k=block_k)
    return pallas_attention(inp, block_sizes=block_sizes, interpret=interpret, return_stats=return_stats)


def _with_defaults(kwargs):
    allowed = ("alpha", "is_causal", "scale", "query_seq_lengths", "key_value_seq_lengths", "local_window_size",
               "segment_ids", "alibi_slopes")
    unknown = set(kwargs) - set(allowed)
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
    defaults = dict(alpha=1.5, is_causal=False, scale=None, query_seq_lengths=None, key_value_seq_lengths=None,
                    local_window_size=None, segment_ids=None, alibi_slopes=None)
    defaults.update(kwargs)
    return defaults
