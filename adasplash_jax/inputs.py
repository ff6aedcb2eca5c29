"""Validated inputs: α, the attention arguments and the masks, checked once for every path.

Every error names the argument and what was expected. ``AttentionInputs`` is what the
dense path and the kernels receive; ``SparsityStats`` is what both report.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np


# --------------------------------------------------------------------------- α


# The smallest α accepted. Below it float32 cannot resolve α-entmax: p = z^(1/(α−1))
# amplifies the rounding of z by 1/(α−1) (measured against a float64 oracle: max error
# 3e-6 at α = 1.001, 3e-5 at 1.0001, 3e-4 at 1.00001). Use softmax for α → 1.
ALPHA_MIN = 1.001
_ALPHA_MIN_F32 = float(np.float32(ALPHA_MIN))


def check_alpha(alpha, name: str = "alpha"):
    """Validates α as it will be used (in float32): ALPHA_MIN ≤ α ≤ 2.

    Python numbers and concrete arrays are checked here and raise ValueError naming
    ``name``; a traced array can only be checked by dtype, and out-of-range values of it
    become NaN where α is used (see ``alpha_or_nan``), never a plausible answer.
    """
    if isinstance(alpha, bool) or alpha is None or isinstance(alpha, (str, bytes)):
        raise ValueError(f"`{name}` must be a float in [{ALPHA_MIN}, 2] or a floating array, got {alpha!r}")
    if isinstance(alpha, numbers.Real):
        a = float(alpha)
        a32 = float(np.float32(a))
        if not (a32 >= _ALPHA_MIN_F32 and a32 <= 2.0):
            raise ValueError(
                f"`{name}` must lie in [{ALPHA_MIN}, 2] (α → 1 is softmax, α = 2 is sparsemax; below "
                f"{ALPHA_MIN} float32 cannot resolve entmax), got {a}"
            )
        return a32 if a32 == 2.0 or a32 == 1.5 else a
    try:
        arr = jnp.asarray(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a float in [{ALPHA_MIN}, 2] or a floating array, got {alpha!r}") from None
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise ValueError(f"`{name}` must be a float or a floating array, got dtype {arr.dtype}")
    if not isinstance(arr, jax.core.Tracer):  # values are checked whenever they are known
        values = np.asarray(arr, np.float32)
        if not np.all((values >= _ALPHA_MIN_F32) & (values <= 2.0)):
            raise ValueError(f"every `{name}` must lie in [{ALPHA_MIN}, 2], got {np.asarray(arr)}")
    return arr


def alpha_or_nan(alpha):
    """A float32 (float64 if given so) α array with NaN wherever it lies outside [ALPHA_MIN, 2] (for traced α)."""
    alpha = jnp.asarray(alpha)
    alpha = alpha.astype(jnp.float64 if alpha.dtype == jnp.float64 else jnp.float32)
    return jnp.where((alpha >= _ALPHA_MIN_F32) & (alpha <= 2.0), alpha, jnp.nan)


# ------------------------------------------------------------------------ masks


def mask_to_rank(mask, rank: int, name: str = "mask"):
    """A mask with leading size-1 dims added up to ``rank`` (the broadcasting jax applies)."""
    mask = jnp.asarray(mask)
    if mask.ndim > rank:
        raise ValueError(f"`{name}` must have rank at most {rank}, got shape {mask.shape}")
    return mask.reshape((1,) * (rank - mask.ndim) + mask.shape)


def check_mask_shape(mask_shape, full: tuple[int, ...], name: str = "mask", what: str = ""):
    """Raises unless ``mask_shape`` broadcasts to ``full`` without growing its rank."""
    ok = len(mask_shape) <= len(full)
    if ok:
        try:
            ok = np.broadcast_shapes(tuple(mask_shape), full) == full
        except ValueError:
            ok = False
    if not ok:
        raise ValueError(f"`{name}` must be broadcastable to {what or full} = {full}, got {tuple(mask_shape)}")


# ------------------------------------------------------------------- attention


@dataclasses.dataclass(frozen=True)
class AttentionInputs:
    """Validated, normalised arguments shared by every implementation."""

    query: jax.Array  # [B, T, N, H]
    key: jax.Array  # [B, S, K, H]
    value: jax.Array  # [B, S, K, H]
    alpha: float | jax.Array  # Python float, or float32 [N]
    mask: jax.Array | None  # bool [b, n, t, s], each dim 1 or the full size
    is_causal: bool
    scale: float
    q_lengths: jax.Array | None  # int32 [B]
    kv_lengths: jax.Array | None  # int32 [B]
    q_segment_ids: jax.Array | None  # int32 [B, T]
    kv_segment_ids: jax.Array | None  # int32 [B, S]
    bias: jax.Array | None = None  # float [b, n, t, s], each dim 1 or the full size
    window: tuple[int, int] | None = None  # (left, right) of a local window
    alibi_slopes: jax.Array | None = None  # float32 [N]: bias −slope·|i − j| per query head

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
    bias=None,
    local_window_size=None,
    alibi_slopes=None,
) -> AttentionInputs:
    """Validates arguments; every error names the argument and what was expected."""
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.ndim != 4:
            raise ValueError(
                f"`{name}` must have rank 4 [batch, length, heads, head_dim] (or rank 3 without the batch, "
                f"for query, key and value alike), got shape {t.shape}"
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

    alpha = check_alpha(alpha)
    if not isinstance(alpha, float):
        alpha = alpha_or_nan(alpha)
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
        check_mask_shape(mask.shape, (B, N, T, S), "mask", "[batch, heads, q_len, kv_len]")
        mask = mask_to_rank(mask, 4)

    if scale is None:
        scale = 1.0 / math.sqrt(H)
    elif isinstance(scale, bool) or not (isinstance(scale, numbers.Real) or _is_concrete_scalar(scale)):
        raise ValueError(f"`scale` must be a float, a concrete scalar array or None, got {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"`scale` must be finite, got {scale}")
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

    if bias is not None:
        bias = jnp.asarray(bias)
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            raise ValueError(f"`bias` must be a floating array (added to the scores), got dtype {bias.dtype}")
        check_mask_shape(bias.shape, (B, N, T, S), "bias", "[batch, heads, q_len, kv_len]")
        bias = mask_to_rank(bias, 4, "bias")

    window = _check_window(local_window_size)
    if alibi_slopes is not None:
        alibi_slopes = jnp.asarray(alibi_slopes)
        if not jnp.issubdtype(alibi_slopes.dtype, jnp.floating) or alibi_slopes.shape != (N,):
            raise ValueError(f"`alibi_slopes` must be a float array [num_heads] = ({N},), got "
                             f"{alibi_slopes.dtype} {alibi_slopes.shape}")
        alibi_slopes = alibi_slopes.astype(jnp.float32)

    return AttentionInputs(
        query, key, value, alpha, mask, is_causal, scale, q_lengths, kv_lengths, q_seg, kv_seg,
        bias, window, alibi_slopes,
    )


def _is_concrete_scalar(x) -> bool:
    return (isinstance(x, (np.ndarray, np.generic, jax.Array)) and not isinstance(x, jax.core.Tracer)
            and np.ndim(x) == 0 and np.issubdtype(np.asarray(x).dtype, np.number))


def _check_window(local_window_size):
    """None, or (left, right) non-negative ints, from an int (symmetric) or a pair, as jax takes it."""
    if local_window_size is None:
        return None
    if isinstance(local_window_size, (int, np.integer)) and not isinstance(local_window_size, bool):
        window = (int(local_window_size), int(local_window_size))
    elif (isinstance(local_window_size, (tuple, list)) and len(local_window_size) == 2
          and all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) for w in local_window_size)):
        window = (int(local_window_size[0]), int(local_window_size[1]))
    else:
        raise ValueError(f"`local_window_size` must be an int or a pair (left, right) of ints, got {local_window_size!r}")
    if min(window) < 0:
        raise ValueError(f"`local_window_size` must be non-negative, got {local_window_size!r}")
    return window


# ------------------------------------------------------------------- sparsity


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
