"""Small pieces shared by the model families: config checks, activations, presets, input checks."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from models.alpha import check_alpha_config
from models.attention_fns import ATTENTION_KINDS

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}


def positive_int(cfg, *names: str):
    for name in names:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{type(cfg).__name__}.{name} must be a positive int, got {v!r}")


def check_common(cfg, *, layers: str, heads: str, width: str, eps: str, activation: str) -> None:
    """Fields every family shares (given by their names in this family): width divisible by heads,
    layer-norm eps, attention kind, α, dropout, dtypes, activation."""
    name = type(cfg).__name__
    n_layer, n_head, d = getattr(cfg, layers), getattr(cfg, heads), getattr(cfg, width)
    if d % n_head:
        raise ValueError(f"{name}.{width} ({d}) must be divisible by {heads} ({n_head})")
    if not getattr(cfg, eps) > 0:
        raise ValueError(f"{name}.{eps} must be > 0, got {getattr(cfg, eps)}")
    if cfg.attention not in ATTENTION_KINDS:
        raise ValueError(f"{name}.attention must be one of {ATTENTION_KINDS}, got {cfg.attention!r}")
    object.__setattr__(cfg, "alpha", check_alpha_config(cfg.alpha, n_layer, n_head, f"{name}.alpha"))
    if not isinstance(cfg.learn_alpha, bool):
        raise ValueError(f"{name}.learn_alpha must be a bool, got {cfg.learn_alpha!r}")
    if not (isinstance(cfg.dropout, (int, float)) and 0.0 <= cfg.dropout < 1.0):
        raise ValueError(f"{name}.dropout must be a float in [0, 1), got {cfg.dropout!r}")
    for f in ("dtype", "param_dtype"):
        try:
            dt = jnp.dtype(getattr(cfg, f))
        except TypeError:
            raise ValueError(f"{name}.{f} must be a dtype, got {getattr(cfg, f)!r}") from None
        if not jnp.issubdtype(dt, jnp.floating):
            raise ValueError(f"{name}.{f} must be a floating dtype, got {dt}")
    act = getattr(cfg, activation)
    if act not in ACTIVATIONS:
        raise ValueError(f"{name}.{activation} must be one of {sorted(ACTIVATIONS)}, got {act!r}")


def preset(cls, presets: dict[str, dict[str, Any]], name: str, **overrides):
    if name not in presets:
        raise ValueError(f"unknown {cls.__name__} preset {name!r}; choose from {sorted(presets)}")
    return cls(**{**presets[name], **overrides})



def check_input_ids(input_ids, vocab_size: int, max_positions: int, name: str = "input_ids"):
    """Integer ids [batch, length] inside the vocabulary and the position table (values checked when concrete)."""
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


def key_padding_mask(attention_mask, seq_len: int):
    """HF-style ``attention_mask`` [B, S] (1 = token, 0 = padding) → bool mask [B, 1, 1, S] over keys, or None.

    Every attention kind takes it as it is (the Pallas path folds such a mask into segment
    ids), so padding may be on either side, traced or not.
    """
    if attention_mask is None:
        return None
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.ndim != 2 or attention_mask.shape[1] != seq_len:
        raise ValueError(
            f"`attention_mask` must have shape [batch, {seq_len}] like input_ids, got {attention_mask.shape}"
        )
    return attention_mask.astype(bool)[:, None, None, :]
