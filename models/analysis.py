"""Looking inside: per-layer, per-head attention sparsity, attention maps and their plots."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from adasplash_jax import entmax_attention_with_stats
from models.attention import attention_layers


def attention_maps(model, input_ids, attention_mask=None, **call_kwargs):
    """Attention probabilities of every layer, float32 [n_layers, batch, heads, T, T].

    Computed densely (scores materialised) with the model's own α and kind, so keep the
    inputs small. Masked (query, key) pairs are exactly 0.
    """
    _, probs = model(input_ids, attention_mask, output_attentions=True, **call_kwargs)
    return jnp.stack(probs)


def attention_sparsity(model, input_ids, attention_mask=None, **call_kwargs):
    """Fraction of exact zeros among the allowed attention entries of each layer and head, [n_layers, n_heads].

    Counted by the library: the model runs once with every layer's call going through
    ``adasplash_jax.entmax_attention_with_stats(..., implementation="xla")``, whose
    ``nonzero_fraction`` is the share of non-zero probabilities among the (query, key) pairs
    the mask allows; this is 1 minus it. Allowed pairs: causal for GPT-2, and where
    ``attention_mask`` is given only pairs of a real query and a real key (padded query
    rows are junk and not counted). The dense path stands in for "adasplash" models (same
    probabilities). 0 for softmax attention. Pure JAX: runs under ``jax.jit``/``nnx.jit``.
    """
    layers = attention_layers(model)
    if model.config.attention == "softmax":
        return jnp.zeros((len(layers), layers[0].n_head), jnp.float32)
    nonzero = []

    def counting(query, key, value, *, alpha, mask, is_causal, key_value_seq_lengths):
        if mask is not None:  # the models' key-padding mask [B, 1, 1, S]: count real queries only
            mask = mask & jnp.swapaxes(mask, -1, -2)
        out, stats = entmax_attention_with_stats(
            query, key, value, alpha=alpha, mask=mask, is_causal=is_causal,
            key_value_seq_lengths=key_value_seq_lengths, implementation="xla",
        )
        nonzero.append(stats.nonzero_fraction)
        return out

    own = [layer.attention_fn for layer in layers]
    try:
        for layer in layers:
            layer.attention_fn = counting
        model(input_ids, attention_mask, **call_kwargs)
    finally:
        for layer, fn in zip(layers, own):
            layer.attention_fn = fn
    return jnp.clip(1.0 - jnp.stack(nonzero), 0.0, 1.0)


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
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
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
