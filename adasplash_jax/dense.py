"""The dense (XLA) path: scores materialised, α-entmax row-wise. The kernels' reference.

Runs on every backend; autodiff goes through the closed-form entmax backward.
"""

from __future__ import annotations

import jax.numpy as jnp

from adasplash_jax.entmax import entmax
from adasplash_jax.inputs import AttentionInputs, SparsityStats
from adasplash_jax.masking import dense_keep_mask
from adasplash_jax.tiling import block_mask_from_dense, sparsity_stats


def _grouped_alpha(alpha, num_kv_heads: int, num_groups: int):
    """α per query head [N] → broadcastable against rows [B, K, G, T]."""
    if isinstance(alpha, float):
        return alpha
    return alpha.reshape(1, num_kv_heads, num_groups, 1)


def dense_attention(inp: AttentionInputs, *, return_probabilities: bool = False, transform_probabilities=None):
    """Entmax attention with the probabilities materialised: s = scale·q·kᵀ + bias − slope·|i − j|,
    masked entries −inf, p = entmax_α(s) row-wise, out = p·v.

    ``transform_probabilities`` (e.g. dropout) maps the [B, N, T, S] probabilities to the
    weights applied to the values; ``return_probabilities`` also returns the untransformed
    probabilities [B, N, T, S].
    """
    B, T, N, H = inp.query.shape
    _, S, K, _ = inp.key.shape
    G = inp.num_groups
    q = inp.query.reshape(B, T, K, G, H)
    acc = jnp.float64 if inp.query.dtype == jnp.float64 else jnp.float32  # float64 stays float64 (x64 mode)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, inp.key, preferred_element_type=acc) * jnp.asarray(inp.scale, acc)
    if inp.bias is not None:
        b, n, t, s = inp.bias.shape
        bias = inp.bias.astype(acc)
        scores = scores + (bias.reshape(b, 1, 1, t, s) if n == 1 else bias.reshape(b, K, G, t, s))
    if inp.alibi_slopes is not None:
        distance = jnp.abs(jnp.arange(T)[:, None] - jnp.arange(S)[None, :]).astype(acc)
        scores = scores - inp.alibi_slopes.astype(acc).reshape(1, K, G, 1, 1) * distance
    keep = dense_keep_mask(inp)
    keep = jnp.broadcast_to(keep, (keep.shape[0], N, T, S)).reshape(keep.shape[0], K, G, T, S)
    scores = jnp.where(keep, scores, -jnp.inf)
    probs = entmax(scores, _grouped_alpha(inp.alpha, K, G), axis=-1)
    weights = probs
    if transform_probabilities is not None:
        weights = transform_probabilities(probs.reshape(B, N, T, S)).reshape(probs.shape)
    out = jnp.einsum("bkgts,bskh->btkgh", weights, inp.value.astype(acc), preferred_element_type=acc)
    out = out.reshape(B, T, N, H).astype(inp.query.dtype)
    if return_probabilities:
        return out, probs.reshape(B, N, T, S)
    return out


def dense_sparsity_stats(inp: AttentionInputs, probs, *, block_q: int, block_k: int) -> SparsityStats:
    """Sparsity of dense probabilities [B, N, T, S], counted on (block_q, block_k) tiles."""
    keep = jnp.broadcast_to(dense_keep_mask(inp), probs.shape).astype(jnp.float32)
    nonzero = (probs > 0).astype(jnp.float32)
    return sparsity_stats(block_mask_from_dense(nonzero, block_q, block_k), nonzero.sum(-1), keep.sum(-1),
                          block_q=block_q, block_k=block_k, is_causal=inp.is_causal, window=inp.window)
