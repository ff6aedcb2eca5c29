"""Small pieces shared by the model families: config checks, activations, dtypes."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from models.attention import ATTENTION_KINDS, check_alpha_config

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

