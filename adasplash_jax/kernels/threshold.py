"""1. The τ kernel (grid: query blocks × batch × heads).

Per query row: the row max, sum and allowed count in one pass over the reachable key
blocks, then Halley–bisection passes (recomputing Q·Kᵀ tiles, never writing scores) and a
final pass for the normaliser Σp, the non-zero count and the block mask (a tile is active
if any probability in it is non-zero).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from adasplash_jax.kernels.config import MASKED, KernelConfig
from adasplash_jax.kernels.specs import block_specs, call, segment_specs
from adasplash_jax.kernels.tiles import RowContext, alpha_of, load_segment, tile_powers
from adasplash_jax.solver import TOL, no_progress, powers, solver_step, threshold_bracket


def _threshold_kernel(
    alpha_ref, q_len_ref, kv_len_ref, q_ref, k_ref, q_segment_ref, kv_segment_ref,
    tau_ref, row_max_ref, norm_ref, nonzero_ref, allowed_ref, block_mask_ref,
    *, cfg: KernelConfig,
):
    q_block = pl.program_id(0)
    alpha = alpha_of(cfg, alpha_ref, 0)
    q = q_ref[...]
    row = RowContext(cfg, q_block, q_len_ref[...], kv_len_ref[...],
                     load_segment(q_segment_ref, q_block * cfg.block_q, cfg.block_q))
    first_block, num_blocks = row.key_block_range()
    x_scale = alpha - 1.0

    # Pass 1: row max m of the scores, the allowed count, and Σ(s − m) for the Jensen
    # bound (kept relative to the running max, so it stays exact at any score magnitude).
    def max_pass(j, carry):
        row_max, row_sum, allowed = carry
        s, keep, _ = row.scores(q, k_ref, j, kv_segment_ref)
        new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
        row_sum = row_sum + allowed * (row_max - new_max) + jnp.sum(jnp.where(keep, s - new_max[:, None], 0.0), 1)
        allowed = allowed + jnp.sum(keep.astype(jnp.float32), axis=1)
        return new_max, row_sum, allowed

    zero = jnp.zeros((cfg.block_q,), jnp.float32)
    init = (jnp.full((cfg.block_q,), MASKED, jnp.float32), zero, zero)
    row_max, row_sum, allowed = lax.fori_loop(first_block, num_blocks, max_pass, init)
    # τ is solved on x = (α−1)(s − m), whose max is 0, as on the dense path: (α−1)·s itself
    # loses every digit of z = x − τ once scores reach ~1e7. Rows with nothing to attend
    # to keep τ = 0, far above their masked x.
    # A NaN or +inf score (or a NaN α: out of range) makes Σ(s − m) NaN; such rows come
    # out NaN (the library's NaN policy), never as a masked row of zeros.
    bad = jnp.isnan(row_sum) | jnp.isnan(x_scale)
    has_any = (allowed > 0) & ~bad
    x_mean = x_scale * row_sum / jnp.maximum(allowed, 1.0)
    lo, hi = threshold_bracket(jnp.zeros_like(row_max), allowed, alpha, row_mean=x_mean)
    lo, hi = jnp.where(has_any, lo, 0.0), jnp.where(has_any, hi, 0.0)
    tau = 0.5 * (lo + hi)

    def solver_iteration(carry):
        i, tau, lo, hi, _ = carry

        def sums(j, acc):
            s, _, _ = row.scores(q, k_ref, j, kv_segment_ref)
            z = jnp.maximum(x_scale * (s - row_max[:, None]) - tau[:, None], 0.0)
            t0, t1, t2 = powers(cfg.alpha_static, alpha, z)
            return acc[0] + jnp.sum(t0, 1), acc[1] + jnp.sum(t1, 1), acc[2] + jnp.sum(t2, 1)

        zero = jnp.zeros((cfg.block_q,), jnp.float32)
        s0, s1, s2 = lax.fori_loop(first_block, num_blocks, sums, (zero, zero, zero))
        new_tau, lo, hi, f, newton, predicted, _ = solver_step(cfg.alpha_static, alpha, tau, lo, hi, s0, s1, s2)
        new_tau = jnp.where(f == 0, tau, new_tau)
        # A row is done as in the dense solver: converged, no float32 progress left, or a
        # Halley step from a small residual (already at float32 precision).
        done = ~has_any | (jnp.abs(f) < TOL) | no_progress(tau, new_tau, newton) | predicted
        return i + 1, new_tau, lo, hi, jnp.min(done.astype(jnp.int32))

    def keep_going(carry):
        i, *_, all_done = carry
        return (i < cfg.n_iter) & (all_done == 0) if cfg.adaptive else i < cfg.n_iter

    _, tau, lo, hi, _ = lax.while_loop(keep_going, solver_iteration, (0, tau, lo, hi, jnp.int32(0)))

    def final_pass(j, carry):
        norm, nonzero, bits = carry
        s, _, _ = row.scores(q, k_ref, j, kv_segment_ref)
        z, p0, _ = tile_powers(cfg, alpha, s, tau, row_max)
        support = (z > 0).astype(jnp.float32)
        active = jnp.max(support).astype(jnp.int32)
        bits = jnp.where(jnp.arange(cfg.kv_blocks_padded) == j, active, bits)
        return norm + jnp.sum(p0, 1), nonzero + jnp.sum(support, 1), bits

    zero = jnp.zeros((cfg.block_q,), jnp.float32)
    norm, nonzero, bits = lax.fori_loop(
        first_block, num_blocks, final_pass, (zero, zero, jnp.zeros((cfg.kv_blocks_padded,), jnp.int32))
    )
    norm = jnp.where(bad, jnp.nan, norm)
    tau_ref[...] = tau
    row_max_ref[...] = row_max
    norm_ref[...] = norm
    nonzero_ref[...] = nonzero
    allowed_ref[...] = allowed
    block_mask_ref[...] = bits


def thresholds(cfg: KernelConfig, alpha, q_len, kv_len, q, k, q_seg, kv_seg):
    B, N = q.shape[0], cfg.num_heads
    sp = block_specs(cfg, "q")
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    row_shape = f32(B, N, cfg.q_len_padded)
    outs = call(
        functools.partial(_threshold_kernel, cfg=cfg),
        cfg,
        (cfg.num_q_blocks, B, N),
        [sp["alpha"], sp["batch_scalar"], sp["batch_scalar"], sp["q"], sp["kv"], *segment_specs(cfg, sp)],
        [sp["row"]] * 5 + [sp["block_list"](cfg.kv_blocks_padded)],
        [row_shape] * 5 + [jax.ShapeDtypeStruct((B, N, cfg.num_q_blocks, cfg.kv_blocks_padded), jnp.int32)],
        "entmax_threshold",
    )(alpha, q_len, kv_len, q, k, q_seg, kv_seg)
    tau, row_max, norm, nonzero, allowed, block_mask = outs
    return tau, row_max, norm, nonzero, allowed, block_mask[..., : cfg.num_kv_blocks]


