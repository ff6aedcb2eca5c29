"""Entmax attention with the calling convention of ``jax.nn.dot_product_attention``.

Layout [batch, length, heads, head_dim]. ``implementation="xla"`` is the dense path:
scores are materialised, α-entmax is applied row-wise, and autodiff goes through the
closed-form entmax backward. It runs on every backend and is the correctness reference
for the Pallas kernels (``implementation="pallas"``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from adasplash_jax.entmax import check_alpha, entmax
from adasplash_jax.masking import keep_mask

_IMPLEMENTATIONS = (None, "xla", "pallas")


@dataclasses.dataclass(frozen=True)
class AttentionInputs:
    """Validated, normalised arguments shared by every implementation."""

    query: jax.Array  # [B, T, N, H]
    key: jax.Array  # [B, S, K, H]
    value: jax.Array  # [B, S, K, H]
    alpha: float | jax.Array  # Python float, or float32 [N]
    mask: jax.Array | None  # bool, broadcastable to [B, N, T, S]
    is_causal: bool
    scale: float
    q_lengths: jax.Array | None  # int32 [B]
    kv_lengths: jax.Array | None  # int32 [B]
    q_segment_ids: jax.Array | None  # int32 [B, T]
    kv_segment_ids: jax.Array | None  # int32 [B, S]

    @property
    def num_groups(self) -> int:
        return self.query.shape[2] // self.key.shape[2]


def _check_int_array(x, name: str, shape: tuple[int, ...], what: str):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"`{name}` must be an integer array ({what}), got dtype {x.dtype}")
    if x.shape != shape:
        raise ValueError(f"`{name}` must have shape {shape} ({what}), got {x.shape}")
    return x.astype(jnp.int32)


def check_attention_inputs(
    query,
    key,
    value,
    *,
    alpha,
    mask,
    is_causal,
    scale,
    query_seq_lengths,
    key_value_seq_lengths,
    segment_ids,
) -> AttentionInputs:
    """Validates arguments; every error names the argument and what was expected."""
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.ndim != 4:
            raise ValueError(
                f"`{name}` must have rank 4 [batch, length, heads, head_dim], got shape {t.shape}"
            )
        if not jnp.issubdtype(t.dtype, jnp.floating):
            raise ValueError(f"`{name}` must be a floating array, got dtype {t.dtype}")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(
            f"`query`, `key` and `value` must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    B, T, N, H = query.shape
    _, S, K, _ = key.shape
    if key.shape[0] != B or value.shape[0] != B:
        raise ValueError(
            f"batch sizes differ: `query` {B}, `key` {key.shape[0]}, `value` {value.shape[0]}"
        )
    if key.shape[3] != H:
        raise ValueError(f"`key` head_dim {key.shape[3]} must equal `query` head_dim {H}")
    if value.shape != key.shape:
        raise ValueError(f"`value` must have the shape of `key` {key.shape}, got {value.shape}")
    if N % K != 0:
        raise ValueError(
            f"`query` heads ({N}) must be a multiple of `key`/`value` heads ({K}) for grouped-query attention"
        )
    if T == 0 or S == 0 or H == 0:
        raise ValueError(f"lengths and head_dim must be non-zero, got query {query.shape}, key {key.shape}")

    alpha = check_alpha(alpha)
    if not isinstance(alpha, float):
        alpha = jnp.asarray(alpha, jnp.float32)
        if alpha.ndim == 0:
            alpha = jnp.broadcast_to(alpha, (N,))
        if alpha.shape != (N,):
            raise ValueError(
                f"`alpha` must be a float or an array of shape [num_heads] = ({N},), got shape {alpha.shape}"
            )

    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise ValueError(
                f"`mask` must be a boolean array (True keeps), got dtype {mask.dtype}; "
                "convert additive/float masks with `mask != 0` or `mask > -inf` first"
            )
        full = (B, N, T, S)
        ok = mask.ndim <= 4
        if ok:
            try:
                ok = np.broadcast_shapes(mask.shape, full) == full
            except ValueError:
                ok = False
        if not ok:
            raise ValueError(f"`mask` must be broadcastable to [batch, heads, q_len, kv_len] = {full}, got {mask.shape}")

    if scale is None:
        scale = 1.0 / math.sqrt(H)
    elif not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise ValueError(f"`scale` must be a Python float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not isinstance(is_causal, bool):
        raise ValueError(f"`is_causal` must be a bool, got {is_causal!r}")

    q_lengths = kv_lengths = None
    if query_seq_lengths is not None:
        q_lengths = _check_int_array(query_seq_lengths, "query_seq_lengths", (B,), "one length per batch row")
    if key_value_seq_lengths is not None:
        kv_lengths = _check_int_array(
            key_value_seq_lengths, "key_value_seq_lengths", (B,), "one length per batch row"
        )

    q_seg = kv_seg = None
    if segment_ids is not None:
        if isinstance(segment_ids, (tuple, list)):
            if len(segment_ids) != 2:
                raise ValueError(
                    "`segment_ids` must be one array [batch, length] or a pair (query_ids, kv_ids)"
                )
            q_seg = _check_int_array(segment_ids[0], "segment_ids[0]", (B, T), "query segment ids [batch, q_len]")
            kv_seg = _check_int_array(segment_ids[1], "segment_ids[1]", (B, S), "key/value segment ids [batch, kv_len]")
        else:
            if T != S:
                raise ValueError(
                    f"a single `segment_ids` array needs q_len == kv_len (got {T} and {S}); "
                    "pass a pair (query_ids, kv_ids)"
                )
            q_seg = kv_seg = _check_int_array(segment_ids, "segment_ids", (B, T), "segment ids [batch, length]")

    return AttentionInputs(
        query, key, value, alpha, mask, is_causal, scale, q_lengths, kv_lengths, q_seg, kv_seg
    )


def dense_keep_mask(inp: AttentionInputs):
    """The boolean keep mask of every (query, key) pair, broadcastable to [B, N, T, S]."""
    B, T, N, _ = inp.query.shape
    S = inp.key.shape[1]
    q_pos = jnp.arange(T, dtype=jnp.int32)[:, None]
    kv_pos = jnp.arange(S, dtype=jnp.int32)[None, :]
    per_batch = lambda x: None if x is None else x[:, None, None, None]  # noqa: E731
    keep = keep_mask(
        q_pos,
        kv_pos,
        is_causal=inp.is_causal,
        q_len=per_batch(inp.q_lengths),
        kv_len=per_batch(inp.kv_lengths),
        q_segment=None if inp.q_segment_ids is None else inp.q_segment_ids[:, None, :, None],
        kv_segment=None if inp.kv_segment_ids is None else inp.kv_segment_ids[:, None, None, :],
    )
    if inp.mask is not None:
        keep = keep & inp.mask
    return jnp.broadcast_to(keep, jnp.broadcast_shapes(keep.shape, (1, 1, T, S)))


def _grouped_alpha(alpha, num_kv_heads: int, num_groups: int):
    """α per query head [N] → broadcastable against rows [B, K, G, T]."""
    if isinstance(alpha, float):
        return alpha
    return alpha.reshape(1, num_kv_heads, num_groups, 1)


def dense_attention(inp: AttentionInputs, *, return_probabilities: bool = False, transform_probabilities=None):
    """The XLA path: scores materialised, entmax row-wise. Also the kernels' reference.

    ``transform_probabilities`` (e.g. dropout) maps the [B, N, T, S] probabilities to the
    weights applied to the values; ``return_probabilities`` also returns the untransformed
    probabilities [B, N, T, S].
    """
    B, T, N, H = inp.query.shape
    _, S, K, _ = inp.key.shape
    G = inp.num_groups
    q = inp.query.reshape(B, T, K, G, H)
    scores = jnp.einsum(
        "btkgh,bskh->bkgts", q, inp.key, preferred_element_type=jnp.float32
    ) * jnp.float32(inp.scale)
    keep = dense_keep_mask(inp)
    keep = jnp.broadcast_to(keep, (keep.shape[0], N, T, S)).reshape(keep.shape[0], K, G, T, S)
    scores = jnp.where(keep, scores, -jnp.inf)
    probs = entmax(scores, _grouped_alpha(inp.alpha, K, G), axis=-1)
    weights = probs
    if transform_probabilities is not None:
        weights = transform_probabilities(probs.reshape(B, N, T, S)).reshape(probs.shape)
    out = jnp.einsum(
        "bkgts,bskh->btkgh", weights, inp.value.astype(jnp.float32), preferred_element_type=jnp.float32
    )
    out = out.reshape(B, T, N, H).astype(inp.query.dtype)
    if return_probabilities:
        return out, probs.reshape(B, N, T, S)
    return out


def default_implementation() -> str:
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def entmax_attention(
    query,
    key,
    value,
    *,
    alpha=1.5,
    mask=None,
    is_causal: bool = False,
    scale: float | None = None,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    segment_ids=None,
    implementation: str | None = None,
    interpret: bool | None = None,
    block_sizes=None,
):
    """α-entmax attention, a drop-in for ``jax.nn.dot_product_attention``.

    Args:
      query: [batch, q_len, heads, head_dim].
      key, value: [batch, kv_len, kv_heads, head_dim]; ``heads`` must be a multiple of
        ``kv_heads`` (grouped-query attention; K/V are never repeated in memory).
      alpha: a float in (1, 2] or an array [heads] (one α per query head, differentiable).
      mask: bool, broadcastable to [batch, heads, q_len, kv_len]; True keeps.
      is_causal: causal mask, top-left aligned like ``jax.nn.dot_product_attention``.
      scale: score scale, default ``1/sqrt(head_dim)``.
      query_seq_lengths, key_value_seq_lengths: int [batch]; positions at or beyond the
        length are padding (padded queries output zeros).
      segment_ids: int [batch, length] for self-attention over packed sequences, or a pair
        (query ids [batch, q_len], kv ids [batch, kv_len]); only equal ids attend.
      implementation: "xla" (dense), "pallas" (the AdaSplash kernels; interpret mode on
        CPU), or None for the best available ("pallas" on GPU, else "xla").
      interpret: Pallas only: None runs the kernels in interpret mode on non-GPU backends;
        False forces real (Triton) lowering, True forces interpret mode.
      block_sizes: Pallas only: an ``adasplash_jax.BlockSizes`` (tiles, warps, stages, τ
        passes); None picks defaults for the head dim.

    Returns:
      [batch, q_len, heads, head_dim] in the query dtype. Queries with nothing to attend
      to get zero rows.
    """
    inp = check_attention_inputs(
        query,
        key,
        value,
        alpha=alpha,
        mask=mask,
        is_causal=is_causal,
        scale=scale,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        segment_ids=segment_ids,
    )
    return _dispatch(inp, implementation, interpret, block_sizes, return_stats=False)


def _dispatch(inp: AttentionInputs, implementation, interpret, block_sizes, *, return_stats: bool):
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"`implementation` must be one of {_IMPLEMENTATIONS}, got {implementation!r}")
    implementation = implementation or default_implementation()
    if implementation == "xla":
        if block_sizes is not None or interpret is not None:
            raise ValueError("`block_sizes` and `interpret` apply to implementation='pallas' only")
        if not return_stats:
            return dense_attention(inp)
        out, probs = dense_attention(inp, return_probabilities=True)
        return out, dense_sparsity_stats(inp, probs)
    from adasplash_jax.pallas_attention import pallas_attention

    return pallas_attention(inp, block_sizes=block_sizes, interpret=interpret, return_stats=return_stats)


@dataclasses.dataclass(frozen=True)
class SparsityStats:
    """Per-head sparsity of one attention call.

    active_tile_fraction: fraction of (query block, key block) tiles holding any non-zero
      probability, among the tiles a dense kernel would compute (the causal triangle when
      causal); the work the Pallas kernels actually do.
    nonzero_fraction: fraction of non-zero probabilities among the allowed (unmasked) pairs.
    """

    active_tile_fraction: jax.Array  # [heads]
    nonzero_fraction: jax.Array  # [heads]


jax.tree_util.register_dataclass(
    SparsityStats, data_fields=["active_tile_fraction", "nonzero_fraction"], meta_fields=[]
)


def tile_fractions(block_mask, *, block_q: int, block_k: int, is_causal: bool):
    """Per-head active-tile fraction of a [B, N, nq, nk] 0/1 block mask."""
    nq, nk = block_mask.shape[-2:]
    if is_causal:
        reachable = jnp.arange(nk)[None, :] * block_k <= jnp.arange(nq)[:, None] * block_q + block_q - 1
    else:
        reachable = jnp.ones((nq, nk), bool)
    active = jnp.where(reachable, block_mask > 0, False).astype(jnp.float32)
    return active.sum((0, 2, 3)) / (block_mask.shape[0] * jnp.sum(reachable))


def dense_sparsity_stats(inp: AttentionInputs, probs, block_q: int = 64, block_k: int = 64) -> SparsityStats:
    """Sparsity of dense probabilities [B, N, T, S], tiled like the Pallas kernels' defaults."""
    B, N, T, S = probs.shape
    keep = jnp.broadcast_to(dense_keep_mask(inp), probs.shape)
    nonzero = (probs > 0).astype(jnp.float32)
    nonzero_fraction = nonzero.sum((0, 2, 3)) / jnp.maximum(keep.astype(jnp.float32).sum((0, 2, 3)), 1.0)
    nq, nk = -(-T // block_q), -(-S // block_k)
    padded = jnp.pad(nonzero, ((0, 0), (0, 0), (0, nq * block_q - T), (0, nk * block_k - S)))
    block_mask = padded.reshape(B, N, nq, block_q, nk, block_k).max((3, 5))
    return SparsityStats(tile_fractions(block_mask, block_q=block_q, block_k=block_k, is_causal=inp.is_causal),
                         nonzero_fraction)


def entmax_attention_with_stats(query, key, value, **kwargs):
    """``entmax_attention`` that also returns per-head ``SparsityStats`` (for monitoring).

    The Pallas path gets them from its τ pass at no extra pass; the dense path from its
    probabilities. Same keyword arguments as ``entmax_attention``.
    """
    implementation = kwargs.pop("implementation", None)
    interpret = kwargs.pop("interpret", None)
    block_sizes = kwargs.pop("block_sizes", None)
    inp = check_attention_inputs(query, key, value, **_with_defaults(kwargs))
    return _dispatch(inp, implementation, interpret, block_sizes, return_stats=True)


def _with_defaults(kwargs):
    allowed = ("alpha", "mask", "is_causal", "scale", "query_seq_lengths", "key_value_seq_lengths", "segment_ids")
    unknown = set(kwargs) - set(allowed)
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
    defaults = dict(alpha=1.5, mask=None, is_causal=False, scale=None, query_seq_lengths=None,
                    key_value_seq_lengths=None, segment_ids=None)
    defaults.update(kwargs)
    return defaults
