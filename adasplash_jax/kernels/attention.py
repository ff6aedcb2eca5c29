"""Entmax attention in Pallas (Triton backend), the AdaSplash way: O(L) memory, zero tiles skipped.

The kernels, each in its own module and each checked against the dense path
(``adasplash_jax.dense.dense_attention``):

1. ``threshold`` — τ per query row and the block mask;
2. ``adasplash_jax.tiling.active_block_lists`` — per query block the active key blocks,
   per key block the active query blocks (static shapes, no host sync);
3. ``forward`` — O, the normaliser Σp (and Õ when differentiated) over active tiles only;
4. ``backward`` — dK/dV and dQ over active tiles only.

Inputs are padded to whole blocks (and head_dim to a power of two ≥ 16) on the XLA side;
padded keys and queries are masked by the same ``keep_mask`` the dense path uses. This
module wires them into a ``custom_vjp``. On a CPU backend the kernels run in Pallas
interpret mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from adasplash_jax.inputs import AttentionInputs
from adasplash_jax.kernels.backward import backward
from adasplash_jax.kernels.config import BlockSizes, KernelConfig, make_config, padding_mask_axis
from adasplash_jax.kernels.forward import forward
from adasplash_jax.kernels.mask_info import dense_tile_inputs
from adasplash_jax.kernels.tiles import TileInputs
from adasplash_jax.tiling import pad_axis, sparsity_stats


# ------------------------------------------------------------------ custom_vjp wiring


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, alpha, q_len, kv_len, tile_inputs):
    (out, *_), stats = forward(cfg, alpha, q_len, kv_len, q, k, v, tile_inputs, with_residual=False)
    return out, _public_stats(stats)


def _attention_fwd(cfg, q, k, v, alpha, q_len, kv_len, tile_inputs):
    # symbolic_zeros=True: every primal comes wrapped with a `perturbed` flag. The α-gradient
    # terms of the dQ kernel are computed only when α is actually differentiated (learned α),
    # not when it is merely traced (e.g. annealed inside a jitted train step); the bias gradient
    # only when the bias is differentiated.
    alpha_grad = cfg.alpha_static is None and alpha.perturbed
    bias_grad = tile_inputs.bias is not None and tile_inputs.bias.perturbed
    q, k, v, alpha, q_len, kv_len, tile_inputs = jax.tree.map(
        lambda a: a.value, (q, k, v, alpha, q_len, kv_len, tile_inputs),
        is_leaf=lambda a: isinstance(a, jax.custom_derivatives.CustomVJPPrimal))
    (out, out_tilde, *_), stats = forward(cfg, alpha, q_len, kv_len, q, k, v, tile_inputs, with_residual=True)
    residuals = (q, k, v, alpha, q_len, kv_len, tile_inputs, out_tilde,
                 {key: stats[key] for key in ("tau", "row_max", "norm", "block_mask", "q_counts", "q_lists")},
                 jnp.zeros(()) if alpha_grad else None, jnp.zeros(()) if bias_grad else None)
    return (out, _public_stats(stats)), residuals


def _attention_bwd(cfg, residuals, cotangents):
    q, k, v, alpha, q_len, kv_len, tile_inputs, out_tilde, stats, alpha_grad_flag, bias_grad_flag = residuals
    d_out = cotangents[0]
    if isinstance(d_out, jax.custom_derivatives.SymbolicZero):
        d_out = jnp.zeros(d_out.shape, d_out.dtype)
    with_alpha_grad, with_bias_grad = alpha_grad_flag is not None, bias_grad_flag is not None
    (dk, dv, *_), (dq, *rest), _ = backward(
        cfg, alpha, q_len, kv_len, q, k, v, tile_inputs, stats, out_tilde, d_out, with_alpha_grad, with_bias_grad
    )
    d_bias = None
    if with_bias_grad:
        d_bias = rest.pop(0)
        # A bias shared over the batch or the heads gets the sum of their gradients.
        batched, per_head = cfg.bias_layout
        d_bias = jnp.sum(d_bias, axis=tuple(a for a, full in ((0, batched), (1, per_head)) if not full),
                         keepdims=True).astype(tile_inputs.bias.dtype)
    d_alpha = jnp.sum(rest[0], axis=(0, 2)) if with_alpha_grad else jnp.zeros_like(alpha)
    d_tile_inputs = TileInputs(*([None] * 5), d_bias)
    return dq, dk, dv, d_alpha, None, None, d_tile_inputs


_attention.defvjp(_attention_fwd, _attention_bwd, symbolic_zeros=True)


def _public_stats(stats):
    return {key: jax.lax.stop_gradient(stats[key]) for key in ("nonzero", "allowed", "block_mask")}


# Segment ids given to masked-out positions: they match nothing a caller would use.
_MASKED_KEY_SEGMENT = -(2**31)
_MASKED_QUERY_SEGMENT = -(2**31) + 1


def _segments_with_padding_mask(inp: AttentionInputs, B: int, T: int, S: int):
    """Segment ids [B, T], [B, S] that also encode a query or key padding mask (any padding side)."""
    q_seg = inp.q_segment_ids if inp.q_segment_ids is not None else jnp.zeros((B, T), jnp.int32)
    kv_seg = inp.kv_segment_ids if inp.kv_segment_ids is not None else jnp.zeros((B, S), jnp.int32)
    axis = None if inp.mask is None else padding_mask_axis(inp.mask)  # other masks go to the kernels dense
    if axis is not None:
        mask = inp.mask  # rank 4
        if axis == 3:
            kv_seg = jnp.where(jnp.broadcast_to(mask[:, 0, 0, :], (B, S)), kv_seg, _MASKED_KEY_SEGMENT)
        else:
            q_seg = jnp.where(jnp.broadcast_to(mask[:, 0, :, 0], (B, T)), q_seg, _MASKED_QUERY_SEGMENT)
    return q_seg, kv_seg


def kernel_inputs(cfg: KernelConfig, inp: AttentionInputs):
    """The kernels' arguments (q, k, v, α, q_len, kv_len, TileInputs): padded to whole blocks and a
    power-of-two head_dim, padding folded into the lengths, padding masks into segment ids, a
    dense mask and bias prepared by mask_info, the key negated for a negative scale."""
    B = inp.query.shape[0]
    hp = cfg.head_dim_padded
    q = pad_axis(pad_axis(inp.query, 1, cfg.q_len_padded), 3, hp)
    # The kernels take the row max of the raw scores q·kᵀ as the entmax input's max, which holds
    # for a positive scale only: a negative one runs as |s|·q·(−k)ᵀ (cfg.scale is |s|; autodiff
    # sees the negation).
    k = pad_axis(pad_axis(-inp.key if inp.scale < 0 else inp.key, 1, cfg.kv_len_padded), 3, hp)
    v = pad_axis(pad_axis(inp.value, 1, cfg.kv_len_padded), 3, hp)
    q_len = jnp.full((B,), cfg.q_len, jnp.int32)
    kv_len = jnp.full((B,), cfg.kv_len, jnp.int32)
    if inp.q_lengths is not None:
        q_len = jnp.clip(inp.q_lengths, 0, cfg.q_len)
    if inp.kv_lengths is not None:
        kv_len = jnp.clip(inp.kv_lengths, 0, cfg.kv_len)
    q_seg = kv_seg = None
    if cfg.has_segments:
        q_seg, kv_seg = _segments_with_padding_mask(inp, B, cfg.q_len, cfg.kv_len)
        q_seg = pad_axis(q_seg, 1, cfg.q_len_padded, -1)
        kv_seg = pad_axis(kv_seg, 1, cfg.kv_len_padded, -2)
    dense = dense_tile_inputs(inp.mask if cfg.mask_layout is not None else None, inp.bias, q_len=cfg.q_len,
                              kv_len=cfg.kv_len, block_q=cfg.block_q, block_k=cfg.block_k,
                              kv_blocks_padded=cfg.kv_blocks_padded)
    if isinstance(inp.alpha, float):
        alpha = jnp.full((cfg.num_heads,), inp.alpha, jnp.float32)
    else:
        alpha = inp.alpha.astype(jnp.float32)
    # ALiBi slopes in raw-score units (the kernels add −slope/scale·|i − j| to q·kᵀ).
    alibi = None if inp.alibi_slopes is None else inp.alibi_slopes.astype(jnp.float32) / cfg.scale
    return q, k, v, alpha, q_len, kv_len, TileInputs(q_seg, kv_seg, alibi, dense.mask, dense.kinds, dense.bias)


def pallas_attention(
    inp: AttentionInputs,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    return_stats: bool = False,
):
    """Entmax attention with the Pallas kernels for validated inputs (see ``entmax_attention``)."""
    cfg = make_config(inp, block_sizes, interpret, count_nonzero=return_stats)
    args = kernel_inputs(cfg, inp)
    try:
        out, stats = _attention(cfg, *args)
    except TypeError as e:  # raised while jax.jvp traces the custom_vjp, in this frame
        if "forward-mode" not in str(e):
            raise
        raise TypeError(
            "implementation='pallas' supports reverse-mode autodiff only (jax.grad, jax.vjp); for jax.jvp, "
            "jax.linearize, jax.jacfwd or jax.hessian use implementation='xla'"
        ) from e
    out = out[:, : cfg.q_len, :, : cfg.head_dim]
    if return_stats:
        return out, sparsity_stats(stats["block_mask"], stats["nonzero"], stats["allowed"], block_q=cfg.block_q,
                                   block_k=cfg.block_k, is_causal=cfg.causal, window=cfg.window)
    return out


