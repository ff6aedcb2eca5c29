"""Fenchel–Young losses of α-entmax, for classification heads.

For logits θ, gold class y and p = entmax_α(θ):

    L(θ, y) = ⟨θ, p − e_y⟩ + (1 − Σ_j p_j^α) / (α(α − 1))  ≥ 0,

whose gradient with respect to θ is p − e_y (the entropy term is the Tsallis
α-entropy of p). α = 2 gives the sparsemax loss; α → 1 approaches cross-entropy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from adasplash_jax.entmax import check_alpha, entmax


def _check_labels(logits, labels):
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    if not jnp.issubdtype(logits.dtype, jnp.floating) or logits.ndim < 1:
        raise ValueError(f"`logits` must be a floating array [..., num_classes], got {logits.dtype} {logits.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"`labels` must hold integer class ids, got dtype {labels.dtype}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"`labels` must have shape {logits.shape[:-1]} (logits without the class axis), got {labels.shape}")
    if not isinstance(labels, jax.core.Tracer) and labels.size:  # checked where the labels are known
        values = np.asarray(labels)  # numpy: jnp reductions would be traced under jit
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= logits.shape[-1]:
            raise ValueError(f"`labels` must be class ids in [0, {logits.shape[-1]}), got values in [{lo}, {hi}]")
    return logits, labels


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fy_loss(logits, labels, alpha):
    return _fy_forward(logits, labels, alpha)[0]


def _fy_forward(logits, labels, alpha):
    x = logits.astype(jnp.float32)
    p = jax.lax.stop_gradient(entmax(x, alpha, axis=-1))
    onehot = jax.nn.one_hot(labels, x.shape[-1], dtype=jnp.float32)
    pos = p > 0
    p_alpha = jnp.where(pos, jnp.exp(alpha * jnp.log(jnp.where(pos, p, 1.0))), 0.0)
    # ⟨θ, p − e_y⟩ with masked (−inf) logits: p is 0 there, so drop them from the product.
    finite = jnp.isfinite(x)
    inner = jnp.sum(jnp.where(finite, x, 0.0) * (p - onehot), axis=-1)
    entropy = (1.0 - jnp.sum(p_alpha, axis=-1)) / (alpha * (alpha - 1.0))
    # A gold class whose logit is −inf can never be predicted: the loss is +inf (−θ_y).
    gold_masked = jnp.sum(jnp.where(finite, 0.0, onehot), axis=-1) > 0
    return jnp.where(gold_masked, jnp.inf, inner + entropy), (p, onehot)


def _fy_fwd(logits, labels, alpha):
    loss, (p, onehot) = _fy_forward(logits, labels, alpha)
    return loss, (p - onehot, jnp.zeros((), logits.dtype), labels)


def _fy_bwd(alpha, res, g):
    diff, dtype_carrier, labels = res
    zero_labels = jnp.zeros(labels.shape, jax.dtypes.float0)
    return (g[..., None] * diff).astype(dtype_carrier.dtype), zero_labels


_fy_loss.defvjp(_fy_fwd, _fy_bwd)


def entmax_loss(logits, labels, alpha: float = 1.5):
    """Per-example α-entmax Fenchel–Young loss (shape ``labels.shape``); gradient ``p − onehot``."""
    alpha = check_alpha(alpha)
    if not isinstance(alpha, float):
        raise ValueError("`alpha` of entmax_loss must be a Python float in [1.001, 2]")
    logits, labels = _check_labels(logits, labels)
    return _fy_loss(logits, labels, alpha)


def sparsemax_loss(logits, labels):
    """Per-example sparsemax loss (α = 2 Fenchel–Young loss)."""
    return entmax_loss(logits, labels, 2.0)
