"""The attention layer shared by GPT-2 and BERT, and the attention functions it can call.

Every layer calls one function with ``entmax_attention``'s keyword signature:

    fn(query, key, value, *, alpha, mask, is_causal, key_value_seq_lengths) -> [B, T, N, H]

built by :func:`make_attention_fn` from ``config.attention`` and stored on the layer as a
plain (static) attribute, so :func:`set_attention_fn` can swap it (e.g. for a shard_map'd
Pallas call) without touching parameters.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adasplash_jax import entmax_attention
from adasplash_jax.attention import check_attention_inputs, dense_attention, dense_keep_mask

ATTENTION_KINDS = ("softmax", "entmax", "adasplash")
# Learned α = ALPHA_MIN + (2 - ALPHA_MIN)·sigmoid(logit): strictly above 1 even in float32
# (α → 1 is softmax, where entmax's 1/(α−1) powers blow up), at most 2.
ALPHA_MIN = 1.01


# --------------------------------------------------------------------------- attention functions


def softmax_attention(
    query,
    key,
    value,
    *,
    alpha=None,
    mask=None,
    is_causal: bool = False,
    scale=None,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    segment_ids=None,
    implementation=None,
):
    """``jax.nn.dot_product_attention`` behind entmax_attention's signature (α is ignored)."""
    del alpha, implementation
    if segment_ids is not None:
        q_ids, kv_ids = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
        seg = q_ids[:, None, :, None] == kv_ids[:, None, None, :]
        mask = seg if mask is None else mask & seg
    return jax.nn.dot_product_attention(
        query,
        key,
        value,
        mask=mask,
        scale=scale,
        is_causal=is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
    )


# One object per kind: models built from equal configs then have equal graphdefs, so
# jit caches (nnx.jit, generation steps) are shared between them.
_ATTENTION_FNS = {
    "softmax": softmax_attention,
    "entmax": functools.partial(entmax_attention, implementation="xla"),
    "adasplash": functools.partial(entmax_attention, implementation="pallas"),
}


def make_attention_fn(kind: str):
    """The attention function for ``config.attention``: "softmax", "entmax" or "adasplash"."""
    if kind not in _ATTENTION_FNS:
        raise ValueError(f"`attention` must be one of {ATTENTION_KINDS}, got {kind!r}")
    return _ATTENTION_FNS[kind]


# --------------------------------------------------------------------------- α


def check_alpha_config(alpha, n_layer: int, n_head: int, field: str = "alpha"):
    """α per model (float), per layer (tuple of n_layer), or per layer and head (tuple of tuples)."""

    def one(a, where):
        if isinstance(a, bool) or not isinstance(a, (int, float)):
            raise ValueError(f"`{field}`{where} must be a float in (1, 2], got {a!r}")
        if not 1.0 < float(a) <= 2.0:
            raise ValueError(f"`{field}`{where} must lie in (1, 2] (α → 1 is softmax, 2 is sparsemax), got {a}")
        return float(a)

    if isinstance(alpha, (list, tuple)):
        if len(alpha) != n_layer:
            raise ValueError(f"`{field}` given per layer must have n_layer = {n_layer} entries, got {len(alpha)}")
        out = []
        for i, a in enumerate(alpha):
            if isinstance(a, (list, tuple)):
                if len(a) != n_head:
                    raise ValueError(f"`{field}`[{i}] given per head must have {n_head} entries, got {len(a)}")
                out.append(tuple(one(x, f"[{i}][{h}]") for h, x in enumerate(a)))
            else:
                out.append(one(a, f"[{i}]"))
        return tuple(out)
    return one(alpha, "")


def layer_alpha(alpha, layer: int):
    return alpha[layer] if isinstance(alpha, tuple) else alpha


# --------------------------------------------------------------------------- the layer


class SelfAttention(nnx.Module):
    """Multi-head self-attention: q, k, v projections, one attention function, output projection.

    α is either fixed (a float or a tuple per head, static) or learned per head as
    ``α = ALPHA_MIN + (2 − ALPHA_MIN)·sigmoid(alpha_logit)``, which keeps it inside (1, 2].
    """

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
            a = np.broadcast_to(np.asarray(alpha, np.float32), (n_head,))
            frac = np.clip((a - ALPHA_MIN) / (2.0 - ALPHA_MIN), 1e-3, 1.0 - 1e-3)
            self.alpha_logit = nnx.Param(jnp.asarray(np.log(frac / (1.0 - frac)), param_dtype))
            self.alpha = None
        else:
            self.alpha = alpha  # float or tuple of n_head floats (static)

    def current_alpha(self, override=None):
        """The α used in a call: the override (scalar, may be traced) or this layer's own."""
        if override is not None:
            return override
        if self.learn_alpha:
            return ALPHA_MIN + (2.0 - ALPHA_MIN) * jax.nn.sigmoid(self.alpha_logit[...].astype(jnp.float32))
        if isinstance(self.alpha, tuple):
            return jnp.asarray(self.alpha, jnp.float32)
        return self.alpha

    def __call__(
        self,
        x,
        *,
        mask=None,
        kv_lengths=None,
        is_causal: bool = False,
        alpha=None,
        cache=None,
        cache_index=None,
        output_attentions: bool = False,
    ):
        """x [B, T, D] → (y [B, T, D], new cache or None, probabilities [B, N, T, S] or None).

        With ``cache = (k, v)`` ([B, max_len, N, H] each), this call's keys/values are written
        at ``cache_index`` and the queries attend over the cache: a multi-token call (prefill)
        must start at index 0 and is causal; a one-token call (decode) attends to the first
        ``cache_index + 1`` entries through ``key_value_seq_lengths``.
        """
        B, T, _ = x.shape
        split = lambda t: t.reshape(B, T, self.n_head, self.head_dim)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        new_cache = None
        if cache is not None:
            if T > 1 and not (isinstance(cache_index, int) and cache_index == 0):
                # The causal mask is top-left aligned: only a prefill from position 0 is right.
                raise ValueError(
                    f"a {T}-token call with a KV cache must be the prefill at cache_index=0, got {cache_index!r}; "
                    "feed later tokens one at a time"
                )
            k_cache, v_cache = cache
            idx = jnp.asarray(cache_index, jnp.int32)
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, idx, 0, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, idx, 0, 0))
            new_cache = (k, v)
            kv_lengths = jnp.full((B,), idx + T, jnp.int32)
            is_causal = T > 1
            q = q.astype(k.dtype)
        a = self.current_alpha(alpha)
        probs = None
        if output_attentions:
            probs = attention_probabilities(self.kind, q, k, a, mask=mask, kv_lengths=kv_lengths, is_causal=is_causal)
            y = jnp.einsum("bnts,bsnh->btnh", probs, v.astype(jnp.float32)).astype(q.dtype)
        else:
            y = self.attention_fn(
                q, k, v, alpha=a, mask=mask, is_causal=is_causal, key_value_seq_lengths=kv_lengths
            )
        return self.o(y.reshape(B, T, -1)), new_cache, probs


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


# --------------------------------------------------------------------------- padding masks


def padding_arguments(attention_mask, kind: str, seq_len: int):
    """HF-style padding mask [B, S] (1 keeps) → (mask [B, 1, 1, S], key_value_seq_lengths) for the layers.

    Every kind takes the key-padding mask as it is (the Pallas path folds such a mask into
    segment ids), so padding may be on either side, traced or not.
    """
    del kind
    if attention_mask is None:
        return None, None
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.ndim != 2 or attention_mask.shape[1] != seq_len:
        raise ValueError(
            f"`attention_mask` must have shape [batch, {seq_len}] like input_ids, got {attention_mask.shape}"
        )
    return attention_mask.astype(bool)[:, None, None, :], None


def check_input_ids(input_ids, vocab_size: int, max_positions: int, name: str = "input_ids"):
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"`{name}` must have shape [batch, length], got {input_ids.shape}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"`{name}` must be integer token ids, got dtype {input_ids.dtype}")
    if input_ids.shape[1] > max_positions:
        raise ValueError(
            f"`{name}` length {input_ids.shape[1]} exceeds the position table "
            f"(max positions = {max_positions})"
        )
    if not isinstance(input_ids, jax.core.Tracer) and input_ids.size:
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"`{name}` has token ids in [{lo}, {hi}], outside the vocabulary [0, {vocab_size})")
    return input_ids


# --------------------------------------------------------------------------- model-wide helpers


def attention_layers(model) -> list[SelfAttention]:
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
