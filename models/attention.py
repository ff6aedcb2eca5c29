"""The self-attention layer shared by GPT-2 and BERT.

q, k, v projections, one attention function (softmax, dense entmax or the AdaSplash kernels,
from :mod:`models.attention_fns`), output projection. The function is a plain (static)
attribute, so :func:`set_attention_fn` can swap it (e.g. for a shard_map'd Pallas call)
without touching parameters.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from adasplash_jax.attention import check_attention_inputs, dense_attention, dense_keep_mask
from models.alpha import alpha_logit_init, learned_alpha
from models.attention_fns import make_attention_fn


class SelfAttention(nnx.Module):
    """Multi-head self-attention with a fixed α (a float, or a tuple per head) or α learned per head."""

    def __init__(
        self,
        hidden: int,
        n_head: int,
        *,
        attention: str,
        alpha,
        learn_alpha: bool,
        dtype,
        param_dtype,
        init_std: float,
        out_init_std: float | None = None,
        rngs: nnx.Rngs,
    ):
        if hidden % n_head:
            raise ValueError(f"hidden size {hidden} must be divisible by the number of heads {n_head}")
        self.n_head = n_head
        self.head_dim = hidden // n_head
        self.kind = attention
        self.attention_fn = make_attention_fn(attention)
        linear = functools.partial(nnx.Linear, hidden, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        init = nnx.initializers.normal(init_std)
        self.q, self.k, self.v = (linear(kernel_init=init) for _ in range(3))
        self.o = linear(kernel_init=nnx.initializers.normal(out_init_std or init_std))
        self.learn_alpha = learn_alpha
        if learn_alpha:
            self.alpha_logit = nnx.Param(jnp.asarray(alpha_logit_init(alpha, n_head), param_dtype))
            self.alpha = None
        else:
            self.alpha = alpha  # float or tuple of n_head floats (static)

    def __call__(
        self,
        x,
        *,
        mask=None,
        is_causal: bool = False,
        alpha=None,
        cache=None,
        cache_index=None,
        output_attentions: bool = False,
    ):
        """x [B, T, D] → (y [B, T, D], new cache or None, probabilities [B, N, T, S] or None).

        ``mask`` is boolean, broadcastable to [B, N, T, S] (True keeps). ``alpha`` overrides
        this layer's α (a scalar, may be traced). With ``cache = (k, v)`` ([B, max_len, N, H]
        each) this call's keys/values are written at ``cache_index`` and the queries attend
        over the cache: see :func:`write_cache`.
        """
        B, T, _ = x.shape
        split_heads = lambda t: t.reshape(B, T, self.n_head, self.head_dim)  # noqa: E731
        q, k, v = split_heads(self.q(x)), split_heads(self.k(x)), split_heads(self.v(x))
        kv_lengths = None
        if cache is not None:
            k, v, kv_lengths = write_cache(cache, cache_index, k, v)
            cache, is_causal, q = (k, v), T > 1, q.astype(k.dtype)
        alpha = self.current_alpha(alpha)
        probs = None
        if output_attentions:
            probs = attention_probabilities(self.kind, q, k, alpha, mask=mask, kv_lengths=kv_lengths,
                                            is_causal=is_causal)
            y = jnp.einsum("bnts,bsnh->btnh", probs, v.astype(jnp.float32)).astype(q.dtype)
        else:
            y = self.attention_fn(q, k, v, alpha=alpha, mask=mask, is_causal=is_causal,
                                  key_value_seq_lengths=kv_lengths)
        return self.o(y.reshape(B, T, -1)), cache, probs

    def current_alpha(self, override=None):
        """The α used in a call: the override (scalar, may be traced) or this layer's own."""
        if override is not None:
            return override
        if self.learn_alpha:
            return learned_alpha(self.alpha_logit[...])
        if isinstance(self.alpha, tuple):
            return jnp.asarray(self.alpha, jnp.float32)
        return self.alpha


def write_cache(cache, cache_index, k, v):
    """Writes k, v [B, T, N, H] into ``cache`` at ``cache_index`` → (k cache, v cache, kv lengths [B]).

    A multi-token call (prefill) must start at index 0 (it is causal, and the causal mask is
    top-left aligned); a one-token call (decode) attends to the first ``cache_index + 1``
    entries through the returned lengths.
    """
    B, T = k.shape[:2]
    if T > 1 and not (isinstance(cache_index, int) and cache_index == 0):
        raise ValueError(
            f"a {T}-token call with a KV cache must be the prefill at cache_index=0, got {cache_index!r}; "
            "feed later tokens one at a time"
        )
    k_cache, v_cache = cache
    idx = jnp.asarray(cache_index, jnp.int32)
    k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, idx, 0, 0))
    v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, idx, 0, 0))
    return k, v, jnp.full((B,), idx + T, jnp.int32)


def attention_probabilities(kind, q, k, alpha, *, mask=None, kv_lengths=None, is_causal=False):
    """Dense attention probabilities [B, N, T, S] in float32 (for inspection).

    Masks and scores come from the library's dense path, so they match what the
    attention functions compute.
    """
    inp = check_attention_inputs(
        q, k, k, alpha=1.5 if kind == "softmax" else alpha, mask=mask, is_causal=is_causal, scale=None,
        query_seq_lengths=None, key_value_seq_lengths=kv_lengths, segment_ids=None,
    )
    if kind != "softmax":
        return dense_attention(inp, return_probabilities=True)[1]
    scores = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * inp.scale
    keep = dense_keep_mask(inp)
    probs = jax.nn.softmax(jnp.where(keep, scores, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.where(keep, probs, 0.0)


# --------------------------------------------------------------------------- the layers of a model


def attention_layers(model) -> list[SelfAttention]:
    """Every attention layer of ``model``, in order."""
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, SelfAttention)]


def set_attention_fn(model, fn) -> None:
    """Every attention layer of ``model`` calls ``fn`` (entmax_attention's keyword signature)."""
    if not callable(fn):
        raise ValueError(f"`fn` must be callable, got {fn!r}")
    layers = attention_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no attention layers")
    for layer in layers:
        layer.attention_fn = fn
