"""4. The backward kernels: dK/dV over each key block's active query blocks (summing over the
query heads of a GQA group), and dQ over each query block's active key blocks (also the row
terms of the gradient with respect to a per-head α)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from adasplash_jax.kernels.config import KernelConfig
from adasplash_jax.kernels.mask_info import transposed_kinds
from adasplash_jax.kernels.specs import block_specs, call, tile_input_specs
from adasplash_jax.kernels.tiles import (RowContext, TileInputs, alpha_of, dot, fold_row_max, folded_z,
                                         interior_query_blocks, list_slots_below, log2_positive, powers, shifted_z,
                                         split_loop, tile_x, x_multiplier)
from adasplash_jax.tiling import active_block_lists, pad_axis, transposed_block_mask

_LN2 = math.log(2.0)


def _dkdv_kernel(
    alpha_ref, q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref, refs: TileInputs,
    row_max_ref, z_mult_ref, z_shift_ref, delta_ref, count_ref, list_ref,
    dk_ref, dv_ref, *debug_refs,
    cfg: KernelConfig,
):
    kv_block = pl.program_id(0)
    kv_start = kv_block * cfg.block_k
    k = k_ref[pl.ds(kv_start, cfg.block_k), :]
    v = v_ref[pl.ds(kv_start, cfg.block_k), :]
    hp = cfg.head_dim_padded
    dk = jnp.zeros((cfg.block_k, hp), jnp.float32)
    dv = jnp.zeros((cfg.block_k, hp), jnp.float32)
    visited = jnp.int32(0)
    q_len, kv_len = q_len_ref[...], kv_len_ref[...]
    interior_lo, interior_hi = interior_query_blocks(cfg, kv_block, q_len, kv_len)

    for g in range(cfg.groups):  # query heads sharing this key/value head
        alpha = alpha_of(cfg, alpha_ref, g)

        def body(t, masked, carry, g=g, alpha=alpha):
            dk, dv = carry
            i = list_ref[g, t]
            rows = pl.ds(i * cfg.block_q, cfg.block_q)
            q = q_ref[rows, g, :]
            do = do_ref[rows, g, :]
            d, _ = RowContext(cfg, i, q_len, kv_len, refs, head=g).tile_scores(q, k, kv_block, masked)
            _, p, u = gradient_powers(cfg, alpha, d, row_max_ref[g, rows], z_mult_ref[g, rows], z_shift_ref[g, rows])
            dv = dv + dot(cfg, p.astype(do.dtype), do, trans_a=True)
            dp = dot(cfg, do, v, trans_b=True)
            ds = u * (dp - delta_ref[g, rows][:, None])
            dk = dk + dot(cfg, ds.astype(q.dtype), q, trans_a=True)
            return dk, dv

        count = count_ref[g]
        # The list is ascending: its interior query blocks (no mask needed) are one run of slots.
        blocks = list_ref[g, :]
        start = list_slots_below(blocks, count, interior_lo)
        end = list_slots_below(blocks, count, interior_hi)
        dk, dv = split_loop(count, start, end, body, (dk, dv))
        visited = visited + count
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    if cfg.debug:
        debug_refs[0][...] = visited


def _dq_kernel(
    alpha_ref, q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref, refs: TileInputs,
    row_max_ref, z_mult_ref, z_shift_ref, delta_ref, count_ref, list_ref, *extra_refs,
    cfg: KernelConfig, with_alpha_grad: bool, with_bias_grad: bool,
):
    q_block = pl.program_id(0)
    alpha = alpha_of(cfg, alpha_ref, 0)
    q = q_ref[...]
    do = do_ref[...]
    extra = list(extra_refs)
    if with_bias_grad:
        extra.pop(0)  # the zero-filled input aliased to the bias gradient: active tiles are written over it
    dq_ref = extra.pop(0)
    bias_grad_ref = extra.pop(0) if with_bias_grad else None
    row = RowContext.of_query_block(cfg, q_block, q_len_ref, kv_len_ref, refs)
    row_max, z_mult, z_shift, delta = row_max_ref[...], z_mult_ref[...], z_shift_ref[...], delta_ref[...]
    c0 = 1.0 / (alpha - 1.0)

    def body(t, masked, carry):
        dq, alpha_sum = carry
        j = list_ref[t]
        d, _, k = row.scores(q, k_ref, j, masked)
        z_hat, p, u = gradient_powers(cfg, alpha, d, row_max, z_mult, z_shift)
        v = v_ref[pl.ds(j * cfg.block_k, cfg.block_k), :]
        dp_centred = dot(cfg, do, v, trans_b=True) - delta[:, None]
        ds = u * dp_centred
        dq = dq + dot(cfg, ds.astype(k.dtype), k)
        if with_bias_grad:  # ds is dL/ds for the scaled score s = scale·q·kᵀ + bias
            bias_grad_ref[:, pl.ds(j * cfg.block_k, cfg.block_k)] = ds
        if with_alpha_grad:
            # dL/dα of a row = c0·Σ_j (dP_j − δ)(u_j s_j − p_j log p_j): from dp_j/dα = c0·(u_j(s_j − τ')
            # − p_j log p_j) and Σ dP·u = δ·Σu, the τ' term cancels, so one row sum, no Σu. s = x/(α−1)
            # with x relative to the row max (the sum is shift-invariant); log p = c0·ln ẑ, the lg2
            # the powers take anyway; u and p are exact zeros off the support, so no selects.
            x = tile_x(cfg, alpha, d, row_max)
            term = c0 * (u * x - _LN2 * p * log2_positive(cfg, z_hat))
            alpha_sum = alpha_sum + jnp.sum(dp_centred * term, 1)
        return dq, alpha_sum

    init = (jnp.zeros((cfg.block_q, cfg.head_dim_padded), jnp.float32), jnp.zeros((cfg.block_q,), jnp.float32))
    count = count_ref[...]
    interior = list_slots_below(list_ref[...], count, row.interior_end())
    dq, alpha_sum = split_loop(count, 0, interior, body, init)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)
    if with_alpha_grad:
        extra.pop(0)[...] = c0 * alpha_sum
    if cfg.debug:
        extra.pop(0)[...] = count


def gradient_powers(cfg: KernelConfig, alpha, d, row_max, z_mult, z_shift):
    """(ẑ, p, u) of a raw score tile for the backward: p = z^c0/Σ and u = p^(2−α) = z^c1·Σ^(α−2),
    both exact zeros off the support. With ẑ = z·Σ^(1−α), formed from ``gradient_rows``' constants
    by the fma that forms z, they are p = ẑ^c0 and u = ẑ^c1: the normaliser costs nothing per entry."""
    if cfg.fold_row_max:  # gradient_rows folded the row max into the constants
        z_hat = folded_z(cfg, d, z_mult, z_shift)
    else:
        z_hat = shifted_z(cfg, d, row_max, z_mult, z_shift)
    p, u, _ = powers(cfg, alpha, z_hat, need_c2=False)
    return z_hat, p, u


def gradient_rows(cfg: KernelConfig, alpha, stats, delta):
    """The backward kernels' row inputs [B, N, T]: the row max, ẑ's multiplier (α−1)·scale·Σ^(1−α)
    and shift −τ·Σ^(1−α) (``gradient_powers``), and δ. A row with nothing to attend (Σ = 0) gets
    ẑ = 0; a bad row (Σ NaN) a NaN δ, so its dQ and its share of dK are NaN, as its output is."""
    norm = stats["norm"]
    alpha_rows = jnp.float32(cfg.alpha_static) if cfg.alpha_static is not None else alpha[None, :, None]
    z_scale = jnp.where(norm > 0, jnp.exp((1.0 - alpha_rows) * jnp.log(jnp.where(norm > 0, norm, 1.0))), 0.0)
    delta = jnp.where(jnp.isnan(norm), jnp.nan, delta)
    z_mult, z_shift = x_multiplier(cfg, alpha_rows) * z_scale, -stats["tau"] * z_scale
    if cfg.fold_row_max:
        z_mult, z_shift = fold_row_max(stats["row_max"], z_mult, z_shift)
    return stats["row_max"], z_mult, z_shift, delta


def backward_in_specs(cfg: KernelConfig, sp, grid_over: str, list_width: int):
    """Inputs of both backward kernels: α, lengths, q, k, v, dO, tile inputs, the row inputs
    (``gradient_rows``), count, list."""
    return [sp["alpha"], sp["batch_scalar"], sp["batch_scalar"], sp["q"], sp["kv"], sp["kv"], sp["q"],
            tile_input_specs(cfg, sp, grid_over), *[sp["row"]] * 4, sp["block_scalar"], sp["block_list"](list_width)]


def backward(cfg: KernelConfig, alpha, q_len, kv_len, q, k, v, tile_inputs: TileInputs, stats, out_tilde, d_out,
             with_alpha_grad: bool, with_bias_grad: bool = False):
    """(dK, dV[, dK/dV visits]), (dQ[, bias gradient [B, N, T_pad, S_pad] f32][, α row terms][, dQ visits]),
    and the transposed block lists."""
    B, N, K = q.shape[0], cfg.num_heads, cfg.num_kv_heads
    d_out = d_out.astype(q.dtype)
    # δ_i = dO_i · Õ_i, per row, laid out [B, N, T] like τ.
    delta = jnp.einsum("btnh,btnh->bnt", d_out.astype(jnp.float32), out_tilde)
    row_inputs = gradient_rows(cfg, alpha, stats, delta)

    # dK, dV: grid over key blocks, per kv head, looping over the group's heads' active query blocks.
    kv_counts, kv_lists = active_block_lists(transposed_block_mask(stats["block_mask"], cfg.q_blocks_padded))
    kv_grid_inputs = tile_inputs
    if tile_inputs.kinds is not None:
        kv_grid_inputs = tile_inputs._replace(
            kinds=transposed_kinds(tile_inputs.kinds, cfg.num_kv_blocks, cfg.q_blocks_padded))
    sp = block_specs(cfg, "kv")
    out_specs = [sp["kv_out"], sp["kv_out"]]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    if cfg.debug:
        out_specs.append(pl.BlockSpec((None, None, None), lambda j, b, h: (b, h, j)))
        out_shape.append(jax.ShapeDtypeStruct((B, K, cfg.num_kv_blocks), jnp.int32))
    dkdv = call(
        functools.partial(_dkdv_kernel, cfg=cfg),
        cfg,
        (cfg.num_kv_blocks, B, K),
        backward_in_specs(cfg, sp, "kv", cfg.q_blocks_padded),
        out_specs,
        out_shape,
        "entmax_attention_dkdv",
        "backward",
    )(alpha, q_len, kv_len, q, k, v, d_out, kv_grid_inputs, *row_inputs, kv_counts, kv_lists)

    # dQ (and the α-gradient row terms): grid over query blocks, looping over active key blocks.
    sp = block_specs(cfg, "q")
    in_specs = backward_in_specs(cfg, sp, "q", cfg.kv_blocks_padded)
    inputs = [alpha, q_len, kv_len, q, k, v, d_out, tile_inputs, *row_inputs, stats["q_counts"], stats["q_lists"]]
    out_specs = [sp["q"]]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    aliases = {}
    if with_bias_grad:
        # Inactive tiles get no gradient: the output starts from zeros (an aliased input).
        bias_grad_spec = pl.BlockSpec((None, None, cfg.block_q, cfg.kv_len_padded), lambda i, b, n: (b, n, i, 0))
        bias_grad_shape = (B, N, cfg.q_len_padded, cfg.kv_len_padded)
        aliases = {len(jax.tree.leaves(inputs)): 1}
        in_specs.append(bias_grad_spec)
        inputs.append(jnp.zeros(bias_grad_shape, jnp.float32))
        out_specs.append(bias_grad_spec)
        out_shape.append(jax.ShapeDtypeStruct(bias_grad_shape, jnp.float32))
    if with_alpha_grad:
        out_specs.append(sp["row"])
        out_shape.append(jax.ShapeDtypeStruct((B, N, cfg.q_len_padded), jnp.float32))
    if cfg.debug:
        out_specs.append(sp["block_scalar"])
        out_shape.append(jax.ShapeDtypeStruct((B, N, cfg.num_q_blocks), jnp.int32))
    dq_outs = call(
        functools.partial(_dq_kernel, cfg=cfg, with_alpha_grad=with_alpha_grad, with_bias_grad=with_bias_grad),
        cfg,
        (cfg.num_q_blocks, B, N),
        in_specs,
        out_specs,
        out_shape,
        "entmax_attention_dq",
        "backward",
        input_output_aliases=aliases,
    )(*inputs)
    return dkdv, dq_outs, (kv_counts, kv_lists)


