"""GPT-2 (causal LM with tied embeddings) as a Flax NNX module, with cached generation.

Pre-LayerNorm blocks: x + attn(ln_1(x)), then x + mlp(ln_2(x)); logits = ln_f(x) @ wteᵀ.
Attention is softmax, dense entmax or AdaSplash (Pallas), chosen by ``config.attention``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.alpha import check_alpha_override, layer_alpha
from models.attention import SelfAttention
from models.common import ACTIVATIONS, check_common, check_input_ids, key_padding_mask, positive_int, preset
from models.tokenizer import BYTE_VOCAB_SIZE

# How often each compiled generation function was traced (tests check decode is traced once).
TRACE_COUNTS: collections.Counter = collections.Counter()

_PRESETS = {
    # Byte-level models trained by train/ (vocab: models.ByteTokenizer).
    "tiny": dict(vocab_size=BYTE_VOCAB_SIZE, n_positions=256, n_embd=64, n_layer=2, n_head=4),
    "small": dict(vocab_size=BYTE_VOCAB_SIZE, n_positions=512, n_embd=256, n_layer=4, n_head=8),
    # OpenAI's GPT-2 sizes (vocab and positions are the class defaults).
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25),
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width, None = 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    initializer_range: float = 0.02
    attention: str = "softmax"  # "softmax" | "entmax" | "adasplash"
    alpha: float | tuple = 1.5  # float, per layer (tuple), or per layer and head (tuple of tuples)
    learn_alpha: bool = False  # α per head learned as 1.01 + 0.99·sigmoid(logit), initialised from `alpha`
    dropout: float = 0.0  # embeddings, residual branches (not attention probabilities)
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        positive_int(self, "vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
        if self.n_inner is not None:
            positive_int(self, "n_inner")
        check_common(self, layers="n_layer", heads="n_head", width="n_embd", eps="layer_norm_epsilon",
                     activation="activation_function")

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPT2Config":
        """"tiny" (2 layers × 64, 256 positions; seconds on a CPU), "small" (4 × 256, 512 positions),
        both byte-level; "gpt2" (124M), "gpt2-medium", "gpt2-large", "gpt2-xl"."""
        return preset(cls, _PRESETS, name, **overrides)


class MLP(nnx.Module):
    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        d, inner = config.n_embd, config.n_inner or 4 * config.n_embd
        std = config.initializer_range
        kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.c_fc = nnx.Linear(d, inner, kernel_init=nnx.initializers.normal(std), **kw)
        self.c_proj = nnx.Linear(inner, d, kernel_init=nnx.initializers.normal(std / math.sqrt(2 * config.n_layer)), **kw)
        self.act = ACTIVATIONS[config.activation_function]

    def __call__(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nnx.Module):
    def __init__(self, config: GPT2Config, layer: int, *, rngs: nnx.Rngs):
        ln = functools.partial(
            nnx.LayerNorm, config.n_embd, epsilon=config.layer_norm_epsilon,
            dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs,
        )
        self.ln_1 = ln()
        self.attn = SelfAttention(
            config.n_embd,
            config.n_head,
            attention=config.attention,
            alpha=layer_alpha(config.alpha, layer),
            learn_alpha=config.learn_alpha,
            dtype=config.dtype,
            param_dtype=config.param_dtype,
            init_std=config.initializer_range,
            # GPT-2 scales the residual projections' init by 1/sqrt(2 * n_layer).
            out_init_std=config.initializer_range / math.sqrt(2 * config.n_layer),
            rngs=rngs,
        )
        self.ln_2 = ln()
        self.mlp = MLP(config, rngs=rngs)
        self.drop = nnx.Dropout(config.dropout, rngs=rngs)

    def __call__(self, x, *, deterministic: bool, **attn_kwargs):
        a, cache, probs = self.attn(self.ln_1(x), is_causal=True, **attn_kwargs)
        x = x + self.drop(a, deterministic=deterministic)
        x = x + self.drop(self.mlp(self.ln_2(x)), deterministic=deterministic)
        return x, cache, probs


class GPT2LMHeadModel(nnx.Module):
    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        if not isinstance(config, GPT2Config):
            raise ValueError(f"GPT2LMHeadModel needs a GPT2Config, got {type(config).__name__}")
        self.config = config
        init = nnx.initializers.normal(config.initializer_range)
        kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, embedding_init=init, rngs=rngs)
        self.wte = nnx.Embed(config.vocab_size, config.n_embd, **kw)
        self.wpe = nnx.Embed(config.n_positions, config.n_embd, **kw)
        self.drop = nnx.Dropout(config.dropout, rngs=rngs)
        self.h = nnx.List([Block(config, i, rngs=rngs) for i in range(config.n_layer)])
        self.ln_f = nnx.LayerNorm(
            config.n_embd, epsilon=config.layer_norm_epsilon,
            dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs,
        )

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        *,
        alpha=None,
        deterministic: bool = True,
        output_attentions: bool = False,
    ):
        """Logits [B, T, vocab]; with ``output_attentions`` also a tuple of [B, heads, T, T] per layer.

        ``attention_mask`` [B, T] (1 = token, 0 = padding) masks padded keys. ``alpha``
        overrides every layer's α (a float or a scalar array, may be traced).
        """
        input_ids = check_input_ids(input_ids, self.config.vocab_size, self.config.n_positions)
        logits, _, probs = self.forward(
            input_ids,
            mask=key_padding_mask(attention_mask, input_ids.shape[1]),
            alpha=check_alpha_override(alpha),
            deterministic=deterministic,
            output_attentions=output_attentions,
        )
        return (logits, probs) if output_attentions else logits

    def forward(
        self,
        input_ids,
        *,
        mask=None,
        alpha=None,
        deterministic: bool = True,
        cache=None,
        cache_index=0,
        output_attentions: bool = False,
    ):
        """The unchecked forward pass: (logits, new cache or None, attention probabilities or None)."""
        T = input_ids.shape[1]
        pos = jnp.asarray(cache_index, jnp.int32) + jnp.arange(T, dtype=jnp.int32)
        x = self.wte(input_ids) + self.wpe(pos)[None]
        x = self.drop(x, deterministic=deterministic)
        new_cache, probs = [], []
        for i, block in enumerate(self.h):
            x, c, p = block(
                x,
                deterministic=deterministic,
                mask=mask,
                alpha=alpha,
                cache=None if cache is None else cache[i],
                cache_index=cache_index,
                output_attentions=output_attentions,
            )
            new_cache.append(c)
            probs.append(p)
        logits = self.wte.attend(self.ln_f(x))
        return (
            logits,
            None if cache is None else tuple(new_cache),
            tuple(probs) if output_attentions else None,
        )

    def init_cache(self, batch_size: int, max_length: int):
        """Empty KV cache: per layer (k, v), each [batch, max_length, heads, head_dim]."""
        c = self.config
        shape = (batch_size, max_length, c.n_head, c.n_embd // c.n_head)
        return tuple((jnp.zeros(shape, c.dtype), jnp.zeros(shape, c.dtype)) for _ in range(c.n_layer))

    def generate(
        self,
        input_ids,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        rng=None,
        alpha=None,
    ):
        """Continues ``input_ids`` [B, T] by ``max_new_tokens`` tokens with a KV cache → [B, T + new].

        ``temperature=0`` is greedy (argmax); otherwise tokens are sampled from
        softmax(logits / temperature), restricted to the ``top_k`` most likely tokens
        and/or the smallest set whose probability reaches ``top_p``, using ``rng``.
        The prompt is processed once (prefill); each new token then costs one call of a
        single compiled decode step that attends over the cache.
        """
        c = self.config
        input_ids = check_input_ids(input_ids, c.vocab_size, c.n_positions)
        B, T = input_ids.shape
        max_new_tokens = _number(max_new_tokens, "max_new_tokens", numbers.Integral)
        if max_new_tokens < 0:
            raise ValueError(f"`max_new_tokens` must be an int >= 0, got {max_new_tokens}")
        if T == 0:
            raise ValueError("`input_ids` must hold at least one prompt token")
        if T + max_new_tokens > c.n_positions:
            raise ValueError(
                f"prompt length {T} + max_new_tokens {max_new_tokens} exceeds the position table "
                f"(n_positions = {c.n_positions})"
            )
        temperature = _number(temperature, "temperature", numbers.Real)
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"`temperature` must be a finite float >= 0, got {temperature}")
        if top_k is not None:
            top_k = _number(top_k, "top_k", numbers.Integral)
            if not 0 < top_k <= c.vocab_size:
                raise ValueError(f"`top_k` must be an int in [1, vocab_size={c.vocab_size}], got {top_k}")
        if top_p is not None:
            top_p = _number(top_p, "top_p", numbers.Real)
            if not 0.0 < top_p <= 1.0:
                raise ValueError(f"`top_p` must lie in (0, 1], got {top_p}")
        alpha = check_alpha_override(alpha)  # here: inside the compiled steps it is traced, only its dtype known
        if temperature > 0 and rng is None:
            raise ValueError("sampling (temperature > 0) needs `rng`, a jax.random key")
        if rng is not None and not _is_key(rng):
            raise ValueError(f"`rng` must be a jax.random key (jax.random.key or PRNGKey), got {rng!r}")
        if max_new_tokens == 0:
            return input_ids
        if B == 0:
            return jnp.zeros((0, T + max_new_tokens), input_ids.dtype)
        # A temperature that is 0 in float32 (or subnormal, which XLA may flush to 0) is greedy.
        greedy = bool(np.float32(temperature) < np.finfo(np.float32).tiny)
        rng = jax.random.key(0) if rng is None else rng
        temp = jnp.float32(1.0 if greedy else temperature)
        k = jnp.int32(c.vocab_size if top_k is None else top_k)
        p = jnp.float32(1.0 if top_p is None else top_p)
        graphdef, state = nnx.split(self)
        static = dict(graphdef=graphdef, greedy=greedy)
        # Cache length rounded up to a multiple of 64 (slots past the written ones are masked by
        # the kv lengths), so different prompt / generation lengths reuse one compiled decode step.
        cache = self.init_cache(B, min(c.n_positions, -(-(T + max_new_tokens) // 64) * 64))
        rng, key = jax.random.split(rng)
        tok, cache = _prefill(state, input_ids, cache, alpha, key, temp, k, p, **static)
        out = [tok]
        for i in range(max_new_tokens - 1):
            rng, key = jax.random.split(rng)
            tok, cache = _decode_step(state, tok, cache, jnp.int32(T + i), alpha, key, temp, k, p, **static)
            out.append(tok)
        return jnp.concatenate([input_ids, jnp.stack(out, axis=1).astype(input_ids.dtype)], axis=1)


def _number(value, name: str, kind):
    """A Python or numpy scalar (or a concrete 0-d array) of ``kind`` (numbers.Integral or numbers.Real)."""
    if isinstance(value, (np.ndarray, jax.Array)) and value.ndim == 0 and not isinstance(value, jax.core.Tracer):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an int" if kind is numbers.Integral else "a float"
        raise ValueError(f"`{name}` must be {what}, got {value!r}")
    return int(value) if kind is numbers.Integral else float(value)


def _is_key(rng) -> bool:
    if not isinstance(rng, jax.Array):
        return False
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng.shape == ()
    return rng.dtype == jnp.uint32 and rng.shape == (2,)  # a raw PRNGKey


def sample_logits(logits, key, temperature, top_k, top_p, *, greedy: bool):
    """logits [B, V] → token ids [B]; temperature, top_k and top_p may be traced."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # Shifted by the row max before dividing: the largest logit stays 0 at any temperature, and
    # a tiny one sends the others to -inf (greedy) instead of overflowing to inf - inf = NaN.
    logits = logits.astype(jnp.float32)
    logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature
    # top-k: keep logits at least the k-th largest (k = vocab keeps all); k is traced
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    kth = jax.lax.dynamic_slice_in_dim(sorted_logits, top_k - 1, 1, axis=-1)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    # nucleus: keep the most likely tokens until their mass reaches top_p (always keep the first)
    sorted_logits = jnp.where(sorted_logits < kth, -jnp.inf, sorted_logits)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
    cutoff = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "greedy"))
def _prefill(state, input_ids, cache, alpha, key, temperature, top_k, top_p, *, graphdef, greedy):
    TRACE_COUNTS["prefill"] += 1
    model = nnx.merge(graphdef, state)
    logits, cache, _ = model.forward(input_ids, alpha=alpha, cache=cache, cache_index=0)
    return sample_logits(logits[:, -1], key, temperature, top_k, top_p, greedy=greedy), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "greedy"), donate_argnames=("cache",))
def _decode_step(state, token, cache, index, alpha, key, temperature, top_k, top_p, *, graphdef, greedy):
    TRACE_COUNTS["decode"] += 1
    model = nnx.merge(graphdef, state)
    logits, cache, _ = model.forward(token[:, None], alpha=alpha, cache=cache, cache_index=index)
    return sample_logits(logits[:, -1], key, temperature, top_k, top_p, greedy=greedy), cache


# --------------------------------------------------------------------------- Hugging Face layout


def hf_weight_map(config: GPT2Config, architecture: str = "GPT2LMHeadModel"):
    """(HF tensor name, our parameter paths, conversion) for every weight.

    HF GPT-2 uses Conv1D, stored (in, out) like Flax kernels: copied as is; ``c_attn``
    holds q, k, v side by side. ``lm_head.weight`` is tied to ``wte`` and not listed.
    """
    del architecture
    t = "transformer."
    rows = [
        (t + "wte.weight", [("wte", "embedding")], "copy"),
        (t + "wpe.weight", [("wpe", "embedding")], "copy"),
        (t + "ln_f.weight", [("ln_f", "scale")], "copy"),
        (t + "ln_f.bias", [("ln_f", "bias")], "copy"),
    ]
    for i in range(config.n_layer):
        h = f"{t}h.{i}."
        blk = ("h", i)
        rows += [
            (h + "ln_1.weight", [blk + ("ln_1", "scale")], "copy"),
            (h + "ln_1.bias", [blk + ("ln_1", "bias")], "copy"),
            (h + "attn.c_attn.weight", [blk + ("attn", x, "kernel") for x in "qkv"], "concat_out"),
            (h + "attn.c_attn.bias", [blk + ("attn", x, "bias") for x in "qkv"], "concat_out"),
            (h + "attn.c_proj.weight", [blk + ("attn", "o", "kernel")], "copy"),
            (h + "attn.c_proj.bias", [blk + ("attn", "o", "bias")], "copy"),
            (h + "ln_2.weight", [blk + ("ln_2", "scale")], "copy"),
            (h + "ln_2.bias", [blk + ("ln_2", "bias")], "copy"),
            (h + "mlp.c_fc.weight", [blk + ("mlp", "c_fc", "kernel")], "copy"),
            (h + "mlp.c_fc.bias", [blk + ("mlp", "c_fc", "bias")], "copy"),
            (h + "mlp.c_proj.weight", [blk + ("mlp", "c_proj", "kernel")], "copy"),
            (h + "mlp.c_proj.bias", [blk + ("mlp", "c_proj", "bias")], "copy"),
        ]
    return rows


def config_from_hf(hf: dict, **overrides) -> GPT2Config:
    if not hf.get("scale_attn_weights", True):
        raise ValueError("config.json: scale_attn_weights=false is not supported (scores are scaled by 1/sqrt(head_dim))")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError("config.json: scale_attn_by_inverse_layer_idx=true is not supported")
    if hf.get("add_cross_attention", False):
        raise ValueError("config.json: add_cross_attention=true is not supported")
    keys = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
            "layer_norm_epsilon", "activation_function", "initializer_range")
    fields = {k: hf[k] for k in keys if k in hf}
    return GPT2Config(**{**fields, **overrides})


def config_to_hf(config: GPT2Config, architecture: str = "GPT2LMHeadModel") -> dict:
    c = config
    return {
        "model_type": "gpt2",
        "architectures": [architecture],
        "vocab_size": c.vocab_size,
        "n_positions": c.n_positions,
        "n_ctx": c.n_positions,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": c.n_inner,
        "layer_norm_epsilon": c.layer_norm_epsilon,
        "activation_function": c.activation_function,
        "initializer_range": c.initializer_range,
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": True,
    }
