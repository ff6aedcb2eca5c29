"""3. The forward kernel: loops over each query block's active key blocks only.

The loop bound is the block's count and each key block index is read from its list, so a
skipped tile costs no K/V load and no matmul. When differentiated it also accumulates
Õ = Σ U·V / Σ U with U = P^(2−α), which the backward needs for δ.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from adasplash_jax.kernels.config import KernelConfig
from adasplash_jax.kernels.specs import block_specs, call, tile_input_specs
from adasplash_jax.kernels.threshold import thresholds
from adasplash_jax.kernels.tiles import (RowContext, TileInputs, alpha_of, dot, list_slots_below, query_tile,
                                         split_loop, tile_powers)
from adasplash_jax.tiling import active_block_lists, pad_axis


def _forward_kernel(
    alpha_ref, q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, refs: TileInputs,
    tau_ref, row_max_ref, count_ref, list_ref,
    out_ref, norm_ref, *extra_refs,
    cfg: KernelConfig, with_residual: bool,
):
    q_block = pl.program_id(0)
    alpha = alpha_of(cfg, alpha_ref, 0)
    q = query_tile(cfg, q_ref)
    row = RowContext.of_query_block(cfg, q_block, q_len_ref, kv_len_ref, refs)
    tau, row_max = tau_ref[...], row_max_ref[...]
    hp = cfg.head_dim_padded

    def body(t, masked, carry):
        acc, acc_u, norm, u_sum, nonzero = carry
        j = list_ref[t]
        d, _, _ = row.scores(q, k_ref, j, masked)
        z, p0, p1 = tile_powers(cfg, alpha, d, tau, row_max)
        v = v_ref[pl.ds(j * cfg.block_k, cfg.block_k), :]
        acc = acc + dot(cfg, p0.astype(v.dtype), v)
        # The normaliser Σp at the final τ: every tile holding a non-zero is visited here.
        norm = norm + jnp.sum(p0, 1)
        if with_residual:
            acc_u = acc_u + dot(cfg, p1.astype(v.dtype), v)
            u_sum = u_sum + jnp.sum(p1, 1)
        if cfg.count_nonzero:
            nonzero = nonzero + jnp.sum((z > 0).astype(jnp.float32), 1)
        return acc, acc_u, norm, u_sum, nonzero

    zeros = jnp.zeros((cfg.block_q, hp), jnp.float32)
    zero = jnp.zeros((cfg.block_q,), jnp.float32)
    count = count_ref[...]
    # The list is ascending: its interior key blocks (no mask needed) come first.
    interior = list_slots_below(list_ref[...], count, row.interior_end())
    acc, acc_u, norm, u_sum, nonzero = split_loop(count, 0, interior, body, (zeros, zeros, zero, zero, zero))
    # A row the τ kernel found bad (NaN shift) comes out NaN; a row with nothing to attend, zero.
    norm = jnp.where(jnp.isnan(row_max), jnp.nan, norm)
    inv_norm = jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), jnp.where(jnp.isnan(norm), jnp.nan, 0.0))
    out_ref[...] = (acc * inv_norm[:, None]).astype(out_ref.dtype)
    norm_ref[...] = norm
    extra = list(extra_refs)
    if cfg.count_nonzero:
        extra.pop(0)[...] = nonzero
    if with_residual:
        out_tilde_ref = extra.pop(0)
        out_tilde_ref[...] = acc_u / jnp.where(u_sum > 0, u_sum, 1.0)[:, None]
    if cfg.debug:
        extra.pop(0)[...] = count  # tiles visited by this program (the loop ran `count` times)


def forward(cfg: KernelConfig, alpha, q_len, kv_len, q, k, v, tile_inputs: TileInputs, with_residual: bool):
    B, N = q.shape[0], cfg.num_heads
    tau, row_max, allowed, block_mask, tau_debug = thresholds(cfg, alpha, q_len, kv_len, q, k, tile_inputs)
    q_counts, q_lists = active_block_lists(pad_axis(block_mask, -1, cfg.kv_blocks_padded))
    sp = block_specs(cfg, "q")
    row_shape = jax.ShapeDtypeStruct((B, N, cfg.q_len_padded), jnp.float32)
    out_specs = [sp["q"], sp["row"]]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), row_shape]
    if cfg.count_nonzero:
        out_specs.append(sp["row"])
        out_shape.append(row_shape)
    if with_residual:
        out_specs.append(sp["q"])
        out_shape.append(jax.ShapeDtypeStruct(q.shape, jnp.float32))
    if cfg.debug:
        out_specs.append(sp["block_scalar"])
        out_shape.append(jax.ShapeDtypeStruct((B, N, cfg.num_q_blocks), jnp.int32))
    outs = call(
        functools.partial(_forward_kernel, cfg=cfg, with_residual=with_residual),
        cfg,
        (cfg.num_q_blocks, B, N),
        [sp["alpha"], sp["batch_scalar"], sp["batch_scalar"], sp["q"], sp["kv"], sp["kv"],
         tile_input_specs(cfg, sp, "q"), sp["row"], sp["row"], sp["block_scalar"],
         sp["block_list"](cfg.kv_blocks_padded)],
        out_specs,
        out_shape,
        "entmax_attention_forward",
        "forward",
    )(alpha, q_len, kv_len, q, k, v, tile_inputs, tau, row_max, q_counts, q_lists)
    out, norm, *outs = outs
    nonzero = outs.pop(0) if cfg.count_nonzero else jnp.zeros_like(allowed)
    outs = [out, *outs, *tau_debug]
    inv_norm = jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), jnp.where(jnp.isnan(norm), jnp.nan, 0.0))
    stats = dict(tau=tau, row_max=row_max, norm=norm, inv_norm=inv_norm, nonzero=nonzero, allowed=allowed,
                 block_mask=block_mask, q_counts=q_counts, q_lists=q_lists)
    return outs, stats


