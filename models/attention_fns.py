"""The attention functions a layer can call: one per ``config.attention`` kind.

Each has ``entmax_attention``'s keyword signature:

    fn(query, key, value, *, alpha, mask, is_causal, key_value_seq_lengths) -> [B, T, N, H]
"""

from __future__ import annotations

import functools

import jax

from adasplash_jax import entmax_attention


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
    "entmax": functools.partial(entmax_attention, implementation="xla"),  # dense: scores materialised
    "adasplash": functools.partial(entmax_attention, implementation="pallas"),  # the AdaSplash kernels
}
ATTENTION_KINDS = tuple(_ATTENTION_FNS)


def make_attention_fn(kind: str):
    """The attention function for ``config.attention``: "softmax", "entmax" or "adasplash"."""
    if kind not in _ATTENTION_FNS:
        raise ValueError(f"`attention` must be one of {ATTENTION_KINDS}, got {kind!r}")
    return _ATTENTION_FNS[kind]
