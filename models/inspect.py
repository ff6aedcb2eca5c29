"""Looking inside: per-layer, per-head attention sparsity, attention maps and their plots."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def attention_maps(model, input_ids, attention_mask=None, **call_kwargs):
    """Attention probabilities of every layer, float32 [n_layers, batch, heads, T, T].

    Computed densely (scores materialised) with the model's own α and kind, so keep the
    inputs small. Masked (query, key) pairs are exactly 0.
    """
    _, probs = model(input_ids, attention_mask, output_attentions=True, **call_kwargs)
    return jnp.stack(probs)


def attention_sparsity(model, input_ids, attention_mask=None, **call_kwargs):
    """Fraction of exact zeros among the allowed (unmasked) attention entries, [n_layers, n_heads].

    0 for softmax attention. Allowed entries: causal for GPT-2; where ``attention_mask`` is
    given, only pairs of a non-padded query and a non-padded key (padded query rows are
    junk and not counted). Pure JAX, so it can run under ``jax.jit``/``nnx.jit``.
    """
    # Each layer's map is reduced on its own (never stacked), so under jit only one
    # [B, N, T, S] map needs to be alive at a time.
    _, layer_probs = model(input_ids, attention_mask, output_attentions=True, **call_kwargs)
    L = len(layer_probs)
    B, N, T, S = layer_probs[0].shape
    if model.config.attention == "softmax":
        return jnp.zeros((L, N), jnp.float32)
    keep = jnp.ones((B, 1, T, S), jnp.bool_)
    if _is_causal(model):
        keep = keep & (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None])
    if attention_mask is not None:
        valid = jnp.asarray(attention_mask).astype(bool)
        keep = keep & valid[:, None, None, :] & valid[:, None, :, None]
    keep = jnp.broadcast_to(keep, (B, N, T, S))
    zeros = jnp.stack([((p == 0) & keep).sum(axis=(0, 2, 3)) for p in layer_probs]).astype(jnp.float32)
    return zeros / jnp.maximum(keep.sum(axis=(0, 2, 3)).astype(jnp.float32), 1.0)


def _is_causal(model) -> bool:
    from models.gpt2 import GPT2LMHeadModel

    return isinstance(model, GPT2LMHeadModel)


def plot_attention(
    model,
    input_ids,
    attention_mask=None,
    *,
    path: str | None = None,
    layers=None,
    heads=None,
    batch_index: int = 0,
    tokens: list[str] | None = None,
    **call_kwargs,
):
    """Draws attention maps as a grid (rows: layers, columns: heads); exact zeros in white.

    Returns the matplotlib Figure; writes a PNG when ``path`` is given. ``tokens`` labels
    the axes (one string per position).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    maps = np.asarray(attention_maps(model, input_ids, attention_mask, **call_kwargs))[:, batch_index]
    sparsity = np.asarray(attention_sparsity(model, input_ids, attention_mask, **call_kwargs))
    L, N, T, S = maps.shape
    layers = list(range(L)) if layers is None else list(layers)
    heads = list(range(N)) if heads is None else list(heads)
    if tokens is not None and len(tokens) != T:
        raise ValueError(f"`tokens` must have one label per position ({T}), got {len(tokens)}")
    fig, axes = plt.subplots(
        len(layers), len(heads), figsize=(2.2 * len(heads), 2.2 * len(layers)), squeeze=False
    )
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("white")
    for r, l in enumerate(layers):
        for c, h in enumerate(heads):
            ax = axes[r, c]
            m = np.ma.masked_equal(maps[l, h], 0.0)
            ax.imshow(m, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"L{l} H{h} zeros {sparsity[l, h]:.0%}", fontsize=7)
            if tokens is not None:
                ax.set_xticks(range(S), tokens, rotation=90, fontsize=5)
                ax.set_yticks(range(T), tokens, fontsize=5)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
    fig.suptitle(f"{type(model).__name__} attention ({model.config.attention})", fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, format="png", dpi=120)
    return fig
