"""3. The forward kernel: loops over each query block's active key blocks only.

The loop bound is the block's count and each key block index is read from its list, so a
skipped tile costs no K/V load and no matmul. When differentiated it also accumulates
Õ = Σ U·V / Σ U with U = P^(2−α), which the backward needs for δ.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from adasplash_jax.kernels.config import KernelConfig
from adasplash_jax.kernels.specs import block_specs, call, segment_specs
from adasplash_jax.kernels.threshold import thresholds
from adasplash_jax.kernels.tiles import RowContext, alpha_of, dot, load_segment, tile_powers
from adasplash_jax.tiling import active_block_lists, pad_axis


def _forward_kernel(
    alpha_ref, q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, q_segment_ref, kv_segment_ref,
    tau_ref, row_max_ref, inv_norm_ref, count_ref, list_ref,
    out_ref, *extra_refs,
    cfg: KernelConfig, with_residual: bool,
):
    q_block = pl.program_id(0)
    alpha = alpha_of(cfg, alpha_ref, 0)
    q = q_ref[...]
    row = RowContext(cfg, q_block, q_len_ref[...], kv_len_ref[...],
                     load_segment(q_segment_ref, q_block * cfg.block_q, cfg.block_q))
    tau, row_max = tau_ref[...], row_max_ref[...]
    hp = cfg.head_dim_padded

    def body(t, carry):
        acc, acc_u, u_sum = carry
        j = list_ref[t]
        s, _, _ = row.scores(q, k_ref, j, kv_segment_ref)
        _, p0, p1 = tile_powers(cfg, alpha, s, tau, row_max)
        v = v_ref[pl.ds(j * cfg.block_k, cfg.block_k), :]
        acc = acc + dot(cfg, p0.astype(v.dtype), v)
        if with_residual:
            acc_u = acc_u + dot(cfg, p1.astype(v.dtype), v)
            u_sum = u_sum + jnp.sum(p1, 1)
        return acc, acc_u, u_sum

    zeros = jnp.zeros((cfg.block_q, hp), jnp.float32)
    init = (zeros, zeros, jnp.zeros((cfg.block_q,), jnp.float32))
    count = count_ref[...]
    acc, acc_u, u_sum = lax.fori_loop(0, count, body, init)
    out_ref[...] = (acc * inv_norm_ref[...][:, None]).astype(out_ref.dtype)
    extra = list(extra_refs)
    if with_residual:
        out_tilde_ref = extra.pop(0)
        out_tilde_ref[...] = acc_u / jnp.where(u_sum > 0, u_sum, 1.0)[:, None]
    if cfg.debug:
        extra.pop(0)[...] = count  # tiles visited by this program (the loop ran `count` times)


def forward(cfg: KernelConfig, alpha, q_len, kv_len, q, k, v, q_seg, kv_seg, with_residual: bool):
    B, N = q.shape[0], cfg.num_heads
    tau, row_max, norm, nonzero, allowed, block_mask = thresholds(cfg, alpha, q_len, kv_len, q, k, q_seg, kv_seg)
    inv_norm = jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), jnp.where(jnp.isnan(norm), jnp.nan, 0.0))
    q_counts, q_lists = active_block_lists(pad_axis(block_mask, -1, cfg.kv_blocks_padded))
    sp = block_specs(cfg, "q")
    out_specs = [sp["q"]]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
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
         *segment_specs(cfg, sp), sp["row"], sp["row"], sp["row"], sp["block_scalar"],
         sp["block_list"](cfg.kv_blocks_padded)],
        out_specs,
        out_shape,
        "entmax_attention_forward",
    )(alpha, q_len, kv_len, q, k, v, q_seg, kv_seg, tau, row_max, inv_norm, q_counts, q_lists)
    stats = dict(tau=tau, row_max=row_max, norm=norm, inv_norm=inv_norm, nonzero=nonzero, allowed=allowed,
                 block_mask=block_mask, q_counts=q_counts, q_lists=q_lists)
    return outs, stats


