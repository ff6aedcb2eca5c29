"""Entmax attention as a drop-in ``attention_fn`` for Flax's attention modules.

    nnx.MultiHeadAttention(..., attention_fn=make_flax_attention_fn(alpha=1.5), decode=False)
    linen.MultiHeadDotProductAttention(..., attention_fn=make_flax_attention_fn(alpha=1.5))

Flax calls ``attention_fn(query, key, value, mask=..., dropout_rng=..., dropout_rate=...,
broadcast_dropout=..., deterministic=..., dtype=..., precision=..., module=...,
is_causal=...)`` with q/k/v as [..., length, heads, head_dim] and (float or bool) masks
broadcastable to [..., heads, q_len, kv_len]. Linen filters the keywords by the
function's signature, so every keyword is named explicitly below.

Without dropout (and without ``module``, i.e. ``sow_weights=False``) the call goes straight
to :func:`adasplash_jax.entmax_attention` (XLA or Pallas). Dropout on the attention
probabilities, and sowing them, need the probabilities themselves: that is done with the
dense path (probabilities materialised), and refused for the Pallas path, which never
materialises them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from adasplash_jax.attention import entmax_attention
from adasplash_jax.dense import dense_attention
from adasplash_jax.inputs import check_attention_inputs, check_mask_shape, mask_to_rank

__all__ = ["flax_entmax_attention", "make_flax_attention_fn"]


def _flatten_batch(x, batch_shape):
    return x.reshape((-1,) + x.shape[len(batch_shape):])


def _flatten_batch_of_mask(m, full, batch_shape, name: str):
    """A mask or bias [..., heads, q_len, kv_len] → [batch, heads, q_len, kv_len] with Flax's batch dims
    flattened. Only the batch dims are broadcast: head/query/key dims of size 1 stay 1, so a key-padding
    mask [..., 1, 1, S] still reads as one (the Pallas path takes those)."""
    check_mask_shape(m.shape, full, name, "[..., heads, q_len, kv_len]")
    m = mask_to_rank(m, len(full), name)
    if any(d != 1 for d in m.shape[: len(batch_shape)]):
        m = jnp.broadcast_to(m, batch_shape + m.shape[len(batch_shape):])
    return m.reshape((-1,) + m.shape[-3:])


def flax_entmax_attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    broadcast_dropout: bool = True,
    dropout_rng=None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype=None,
    precision=None,
    module=None,
    is_causal: bool = False,
    *,
    alpha=1.5,
    implementation: str | None = None,
):
    """α-entmax attention with the keyword contract of ``flax.nnx.dot_product_attention``.

    Args:
      query, key, value: [..., length, heads, head_dim] (any number of batch dims).
      bias: additive float bias broadcastable to [..., heads, q_len, kv_len] (dense path on a GPU
        too: the kernels do not take a bias yet).
      mask: bool or float, broadcastable to [..., heads, q_len, kv_len]; non-zero keeps.
      dropout_rng, dropout_rate, broadcast_dropout, deterministic: dropout on the attention
        probabilities, as in Flax (dense path only).
      dtype: output dtype (default: the query dtype). ``precision`` is accepted and unused.
      module: when given (``sow_weights=True``), the probabilities are sown into it as
        ``attention_weights`` (dense path only).
      is_causal: causal mask, top-left aligned.
      alpha: float in (1, 2] or an array [heads].
      implementation: "xla", "pallas" or None, as in :func:`entmax_attention`.
    """
    del precision
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    if query.ndim < 4:
        raise ValueError(
            f"flax_entmax_attention: `query` must be [..., length, heads, head_dim] with a batch dim, got {query.shape}"
        )
    batch_shape = query.shape[:-3]
    if key.shape[:-3] != batch_shape or value.shape[:-3] != batch_shape:
        raise ValueError(
            f"flax_entmax_attention: batch dims differ: query {query.shape}, key {key.shape}, value {value.shape}"
        )
    T, N = query.shape[-3], query.shape[-2]
    S = key.shape[-3]
    full = batch_shape + (N, T, S)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            mask = mask != 0  # Flax builds float masks (1 keeps, 0 drops)
        mask = _flatten_batch_of_mask(mask, full, batch_shape, "mask")
    if bias is not None:
        bias = _flatten_batch_of_mask(jnp.asarray(bias), full, batch_shape, "bias")
    q, k, v = (_flatten_batch(t, batch_shape) for t in (query, key, value))
    out_dtype = dtype or query.dtype

    use_dropout = dropout_rate > 0.0 and not deterministic
    if not use_dropout and module is None:
        out = entmax_attention(
            q, k, v, bias, mask, alpha=alpha, is_causal=is_causal, implementation=implementation
        )
        return out.reshape(query.shape[:-1] + (value.shape[-1],)).astype(out_dtype)

    what = "dropout on the attention probabilities" if use_dropout else "sowing attention weights"
    if implementation == "pallas":
        raise ValueError(
            f"flax_entmax_attention: {what} needs the probabilities, which the Pallas path never "
            "materialises; use implementation='xla', or dropout_rate=0 / deterministic=True"
        )
    if use_dropout and dropout_rng is None:
        raise ValueError("flax_entmax_attention: dropout_rate > 0 and deterministic=False need a `dropout_rng`")
    def dropout(probs):  # [B, N, T, S]
        keep_prob = 1.0 - dropout_rate
        shape = probs.shape
        if broadcast_dropout:  # one dropout pattern shared across batch and heads, as Flax does
            shape = (1, 1) + shape[2:]
        keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
        return jnp.where(keep, probs / keep_prob, 0.0)

    inp = check_attention_inputs(
        q, k, v, alpha=alpha, mask=mask, is_causal=is_causal, scale=None, query_seq_lengths=None,
        key_value_seq_lengths=None, segment_ids=None, bias=bias,
    )
    out, probs = dense_attention(
        inp, return_probabilities=True, transform_probabilities=dropout if use_dropout else None
    )
    if module is not None:
        from flax import nnx

        if isinstance(module, nnx.Module):
            module.sow(nnx.Intermediate, "attention_weights", probs)
        else:
            module.sow("intermediates", "attention_weights", probs)
    return out.reshape(query.shape[:-1] + (value.shape[-1],)).astype(out_dtype)


def make_flax_attention_fn(alpha=1.5, implementation: str | None = None):
    """An ``attention_fn`` for Flax attention modules with α and the implementation fixed.

    A ``functools.partial``: its signature still names every Flax keyword, which Linen
    filters its call by.
    """
    return functools.partial(flax_entmax_attention, alpha=alpha, implementation=implementation)
