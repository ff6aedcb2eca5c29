"""1. The τ kernel (grid: query blocks × batch × heads).

Per query row: one pass over the reachable key blocks for the row max, sum and allowed count and
a histogram of the scores below the max (kernels.histogram), which narrows τ's bracket to about a
bin; then Halley–bisection passes (recomputing Q·Kᵀ tiles, never writing scores), each of which
also marks the block mask (a tile is active if it may hold a non-zero probability at the final
τ), so the last solver pass leaves the mask and no extra pass is made. Only the max pass visits
every reachable tile: it also marks the tiles whose top score may reach the support, which the
first solver pass visits, and each later one visits the tiles its predecessor marked, so at high
sparsity a solver pass costs about what the forward does. The normaliser Σp and the non-zero
count are left to the forward kernel, which visits every active tile at the final τ anyway.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from adasplash_jax.kernels import histogram
from adasplash_jax.kernels.config import MASKED, KernelConfig
from adasplash_jax.kernels.mask_info import visible_key_blocks
from adasplash_jax.kernels.specs import block_specs, call, tile_input_specs, visible_block_specs
from adasplash_jax.kernels.tiles import (RowContext, TileInputs, alpha_of, ceil_fma, diagonal_key_block, fma,
                                         fraction_fma, list_slots_below, maximum_keeping_nan, powers,
                                         query_tile, row_max_keeping_nan, split_loop, tile_x, tile_z,
                                         wrapped_down, x_multiplier)
from adasplash_jax.solver import TOL, no_progress, solver_step, threshold_bracket

# Relative slack (x units) of the max pass's tile marks: far above float32 rounding of x.
_MARK_MARGIN = 2.0**-12


def _threshold_kernel(
    alpha_ref, q_len_ref, kv_len_ref, q_ref, k_ref, refs: TileInputs, visible,
    tau_ref, row_max_ref, allowed_ref, block_mask_ref, *debug_refs,
    cfg: KernelConfig,
):
    q_block = pl.program_id(0)
    alpha = alpha_of(cfg, alpha_ref, 0)
    q = query_tile(cfg, q_ref)
    row = RowContext.of_query_block(cfg, q_block, q_len_ref, kv_len_ref, refs)
    first_block, num_blocks = row.key_block_range()
    interior = row.interior_end()
    x_mult = x_multiplier(cfg, alpha)
    if visible is not None:
        # A dense mask: only the reachable key blocks it does not empty, read from their list.
        count_ref, list_ref = visible
        blocks = list_ref[...]
        visible_slots = (list_slots_below(blocks, count_ref[...], first_block),
                         list_slots_below(blocks, count_ref[...], num_blocks))

    diagonal = diagonal_key_block(cfg, row.q_start)

    def key_blocks_from_diagonal(body, carry):
        """body(j, masked, carry) over the reachable key blocks, interior ones without masks
        (a local window starts later and has no interior tiles), from the query block's
        diagonal down (then wrapping around to the top): the blocks nearest a query usually
        hold its max, so it is found early."""
        if visible is not None:
            lo_slot, hi_slot = visible_slots
            first = list_slots_below(blocks, count_ref[...], diagonal + 1) - 1
            return lax.fori_loop(0, hi_slot - lo_slot,
                                 lambda t, c: body(list_ref[wrapped_down(first, lo_slot, hi_slot, t)], True, c), carry)
        if cfg.window is not None:
            return lax.fori_loop(0, num_blocks - first_block,
                                 lambda t, c: body(wrapped_down(diagonal, first_block, num_blocks, t), True, c), carry)
        return split_loop(num_blocks, 0, interior, body, carry, down_from=diagonal)

    # Pass 1: row max m of the raw scores, the row's sum for the Jensen bound (cfg.jensen_bound)
    # and the histogram below the max; `allowed` counts the keys seen so far (a tile's count is
    # only reduced when segments make it irregular). The sum is kept relative to a score of the
    # row, so it stays exact at any score magnitude: with the histogram, Σ(anchor − d) below the
    # histogram's anchor (its first valid tile's max, fixed from then on; histogram.update forms
    # anchor − d for the bin index anyway); without, Σ(d − m) relative to the running max,
    # rescaled as it grows. Without the sum the row max is what catches a NaN score: its max
    # keeps NaN (tiles.row_max_keeping_nan; Pallas' own max drops it on the GPU).
    keep_nan_in_max = cfg.histogram_start and not cfg.jensen_bound
    limit = None if cfg.irregular else row.allowed_keys().astype(jnp.float32)

    block_ids = jnp.arange(cfg.kv_blocks_padded, dtype=jnp.int32)

    def max_pass(j, masked, carry):
        row_max, row_sum, allowed, hist, tile_top, grid_starts = carry
        d, keep, _ = row.scores(q, k_ref, j, masked)
        if keep_nan_in_max:
            tile_max = row_max_keeping_nan(cfg, d)
            new_max = maximum_keeping_nan(cfg, row_max, tile_max)
        else:
            tile_max = jnp.max(d, axis=1)
            new_max = jnp.maximum(row_max, tile_max)
        # The tile's highest score relative to its row's running max (an upper bound of its
        # entries' final d − m, the max only growing), over the rows that have one. A bad row
        # (NaN, or +inf: inf − inf is NaN) has none: its NaN would void the block's reduction
        # (XLA's max keeps NaN) and with it the tile's mark for every other row.
        relative_top = jnp.where((tile_max > 0.5 * MASKED) & (new_max < jnp.inf), tile_max - new_max, MASKED)
        if cfg.histogram_start:
            # One block-wide reduction for the top and the histogram's vote on starting a grid: a
            # starting row's relative top is 0, the highest any row's can be, so it votes 1
            # instead and the top is min(vote, 0) (a reduction costs a barrier round trip).
            vote = jnp.max(jnp.where(histogram.starting_rows(hist, tile_max), 1.0, relative_top))
            top = jnp.minimum(vote, 0.0)
        else:
            top = jnp.max(relative_top)
        tile_top = jnp.where(block_ids == j, top, tile_top)
        if cfg.histogram_start:
            old_hist = hist
            hist, tile_below = histogram.update(hist, d, tile_max, new_max, x_mult, keep if masked else None,
                                                functools.partial(ceil_fma, cfg), any_start=vote > 0.5,
                                                sum_below=cfg.jensen_bound,
                                                fraction_fma=functools.partial(fraction_fma, cfg))
            if cfg.jensen_bound:
                row_sum = row_sum + tile_below
            if cfg.debug:  # counted for kernels.debug only
                grid_starts = grid_starts + histogram.grid_started(old_hist, hist).astype(jnp.int32)
        else:
            shifted = d - new_max[:, None]
            if masked:
                shifted = jnp.where(keep, shifted, 0.0)
            row_sum = row_sum + allowed * (row_max - new_max) + jnp.sum(shifted, 1)
        if not masked:
            allowed = allowed + cfg.block_k
        elif limit is not None:  # the keys of a prefix [0, limit) in this tile
            allowed = allowed + jnp.clip(limit - (j * cfg.block_k).astype(jnp.float32), 0.0, float(cfg.block_k))
        else:
            allowed = allowed + jnp.sum(keep.astype(jnp.float32), axis=1)
        return new_max, row_sum, allowed, hist, tile_top, grid_starts

    zero = jnp.zeros((cfg.block_q,), jnp.float32)
    init = (jnp.full((cfg.block_q,), MASKED, jnp.float32), zero, zero, histogram.RowHistogram.empty(cfg.block_q),
            jnp.full((cfg.kv_blocks_padded,), MASKED, jnp.float32), jnp.int32(0))
    row_max, row_sum, allowed, hist, tile_top, grid_starts = key_blocks_from_diagonal(max_pass, init)
    # τ is solved on x = (α−1)·scale·(d − m), whose max is 0, as on the dense path: (α−1)·s
    # itself loses every digit of z = x − τ once scores reach ~1e7. Rows with nothing to
    # attend to keep τ = 0, far above their masked x.
    # A NaN or +inf score (or a NaN α: out of range) makes the sum or the max NaN or the max
    # +inf; such rows come out NaN (the library's NaN policy), never as a masked row of zeros.
    bad = jnp.isnan(row_sum) | jnp.isnan(row_max) | (row_max == jnp.inf) | jnp.isnan(x_mult)
    # A row whose every score is MASKED-like (a bias of −inf over all its keys) has nothing to
    # attend to either, as on the dense path: a zero row, not a uniform one.
    has_any = (allowed > 0) & ~bad & (row_max > 0.5 * MASKED)
    if not cfg.jensen_bound:
        x_mean = None  # the histogram's bracket alone
    elif cfg.histogram_start:
        # mean(d) − m = −(Σ(anchor − d)/n + (m − anchor)): the two terms may cancel, so the mean
        # is lowered by a bound of their rounding (the tile sums' and the running sum's, 2⁻²⁴
        # relative each, taken ×4): a Jensen bound a rounding above τ would cut the support.
        n = jnp.maximum(allowed, 1.0)
        mean_below, offset = row_sum / n, row_max - hist.anchor
        rounding = (8.0 + n * (1.0 / cfg.block_k)) * 2.0**-22 * (jnp.abs(mean_below) + jnp.abs(offset))
        x_mean = -x_mult * (mean_below + offset + rounding)
    else:
        x_mean = x_mult * row_sum / jnp.maximum(allowed, 1.0)
    lo, hi = threshold_bracket(jnp.zeros_like(row_max), allowed, alpha, row_mean=x_mean)
    if cfg.histogram_start:
        lo, hi = histogram.bracket(hist, lambda z: powers(cfg, alpha, z, need_c2=False)[0], row_max, allowed,
                                   x_mult, lo, hi)
    lo, hi = jnp.where(has_any, lo, 0.0), jnp.where(has_any, hi, 0.0)
    tau = 0.5 * (lo + hi)
    # The first solver pass visits the tiles whose top entry may lie above some row's lo (the
    # others hold no entry above their row's τ at any later pass). The margin covers the
    # rounding of x = (d − m)·(α−1)·scale, which the solver passes recompute per entry.
    # With cfg.fold_row_max the passes round the row constant m·(α−1)·scale once more: the margin
    # grows by that rounding (2⁻²⁴ relative, taken 8× over) of the block's largest.
    lowest = jnp.min(jnp.where(has_any, lo, jnp.inf))
    margin = _MARK_MARGIN * (1.0 + jnp.abs(lowest))
    if cfg.fold_row_max:
        margin = margin + 2.0**-21 * jnp.max(jnp.where(has_any, jnp.abs(row_max * x_mult), 0.0))
    first_marks = (tile_top * x_mult > lowest - margin).astype(jnp.int32)

    def pass_sums(tau, lo, j, masked, acc):
        d, _, _ = row.scores(q, k_ref, j, masked)
        z = tile_z(cfg, alpha, d, tau, row_max)
        t0, t1, t2 = powers(cfg, alpha, z)
        # The tile is active if any entry lies above lo, the bracket's lower end before this pass:
        # f(lo) ≥ 0 and the final τ never leaves the bracket, whose lower end only grows, so
        # final τ ≥ lo and this mask covers the support at the final τ. (The row's top x, from
        # its top raw score: x is monotone in d; with the row max folded, its top z at lo, formed
        # as every kernel forms z, z being monotone in d and in τ.) Compared per row, then reduced
        # as integers: a bad row's NaN never decides for the others (a float max would carry it
        # in interpret mode).
        top_d = jnp.max(d, axis=1)[:, None]
        if cfg.fold_row_max:
            row_above = tile_z(cfg, alpha, top_d, lo, row_max)[:, 0] > 0
        else:  # (ptxas keeps d = 32 sparsemax on sm_80 in registers this way)
            row_above = tile_x(cfg, alpha, top_d, row_max)[:, 0] > lo
        above = jnp.max(row_above.astype(jnp.int32)) > 0
        bits = jnp.where(block_ids == j, above.astype(jnp.int32), acc[3])
        visited = acc[4] + 1 if cfg.debug else acc[4]  # counted for kernels.debug only
        # Σ z^c0 = Σ z^c1·z: per entry (one fma; the rows reduced after the pass) or per tile.
        mass = fma(cfg, t1, z, acc[0]) if cfg.mass_per_entry else acc[0] + jnp.sum(t0, 1)
        return mass, acc[1] + jnp.sum(t1, 1), acc[2] + jnp.sum(t2, 1), bits, visited

    def marked_blocks(marks):
        """Like key_blocks_from_diagonal, in ascending order, over the key blocks marked in
        ``marks`` only (by the max pass, or active at the previous pass's lo). The others hold no
        entry above a lo ≤ this pass's lo ≤ τ, so they add nothing to any power sum here or
        later and stay unmarked. The t-th marked block is read off the marks' running count (no
        branch in the loop, which keeps its software pipelining and registers as in a full pass)."""
        rank = jnp.cumsum(marks) - 1
        count = jnp.sum(marks)

        def block_at(t):
            return jnp.sum(jnp.where((marks > 0) & (rank == t), block_ids, 0))

        def blocks(body, carry):
            if visible is not None or cfg.window is not None:
                return lax.fori_loop(0, count, lambda t, c: body(block_at(t), True, c), carry)
            marked_interior = jnp.sum(jnp.where(block_ids < interior, marks, 0))
            return split_loop(count, 0, marked_interior, lambda t, masked, c: body(block_at(t), masked, c), carry)

        return blocks

    # α = 1.5 and 2: the support sizes at the last points above / below the root (unknown yet).
    # Once equal, no entry lies between them and solver_step solves the piece exactly, as the
    # dense path does: sparsemax rows near uniform otherwise stay 1e-3 off in 6 passes.
    polynomial = cfg.alpha_static in (1.5, 2.0)
    support = (jnp.full_like(tau, jnp.inf), jnp.full_like(tau, -1.0)) if polynomial else None
    no_bits = jnp.zeros((cfg.kv_blocks_padded,), jnp.int32)

    def solver_pass(state):
        """One pass over the key blocks the previous pass marked (the first: those the max pass
        marked): the power sums at τ, the block mask at the bracket's lower end, one safeguarded
        step. Every pass marks the mask, so the last one leaves it."""
        i, (tau, lo, hi, support, marks, visited), _ = state
        zero = jnp.zeros((cfg.block_q,), jnp.float32)
        mass = jnp.zeros((cfg.block_q, cfg.block_k), jnp.float32) if cfg.mass_per_entry else zero
        mass, *sums, bits, visited = marked_blocks(marks)(functools.partial(pass_sums, tau, lo),
                                                          (mass, zero, zero, no_bits, visited))
        sums = (jnp.sum(mass, 1) if cfg.mass_per_entry else mass, *sums)
        new_tau, new_lo, hi, f, newton, predicted, support = solver_step(cfg.alpha_static, alpha, tau, lo, hi,
                                                                         *sums, support=support)
        if cfg.alpha_static == 2.0:
            # f is convex and piecewise linear: a Newton step is a lower bound of the root, exact on
            # the current piece. One that falls below the bracket (the support grows before the
            # root) goes to lo, the best lower bound known (often the root itself: the Jensen
            # bound is exact for rows whose support is every entry), instead of bisecting; from
            # there Newton climbs monotonically, exact once on the root's piece.
            new_tau = jnp.where((f < 0) & (newton < new_lo), new_lo, new_tau)
        new_tau = jnp.where(f == 0, tau, new_tau)
        # A row is done as in the dense solver: converged, no progress left at float32
        # resolution, or a Halley step from a small residual (already at float32 precision).
        done = ~has_any | (jnp.abs(f) < TOL) | no_progress(tau, new_tau, newton) | predicted
        return i + 1, (new_tau, new_lo, hi, support, bits, visited), jnp.min(done.astype(jnp.int32))

    # n_iter passes when fixed; when adaptive, until every row of the block is done, at most n_iter.
    def more(state):
        i, _, all_done = state
        if cfg.adaptive:
            return (i == 0) | ((i < cfg.n_iter) & (all_done == 0))
        return i < cfg.n_iter

    init = (jnp.int32(0), (tau, lo, hi, support, first_marks, jnp.int32(0)), jnp.int32(0))
    passes, (tau, _, _, _, bits, visited), _ = lax.while_loop(more, solver_pass, init)
    tau_ref[...] = tau
    # A bad row gets a NaN shift: the forward kernel turns it into a NaN normaliser (NaN row).
    row_max_ref[...] = jnp.where(bad, jnp.nan, row_max)
    allowed_ref[...] = allowed
    block_mask_ref[...] = bits
    if cfg.debug:  # key blocks the max pass visits, the solver passes made after it and their tile visits,
        # and the max pass's tiles on which the histogram started a grid (its one branch)
        debug_refs[0][...] = visible_slots[1] - visible_slots[0] if visible is not None else num_blocks - first_block
        debug_refs[1][...] = passes
        debug_refs[2][...] = visited
        debug_refs[3][...] = grid_starts


def thresholds(cfg: KernelConfig, alpha, q_len, kv_len, q, k, tile_inputs: TileInputs):
    """τ, the row max and allowed count per row, and the block mask (plus, with cfg.debug, per query
    block: the key blocks the max pass visits, the solver passes made, the tiles they visited and
    the max-pass tiles on which the histogram started a row's grid)."""
    B, N = q.shape[0], cfg.num_heads
    sp = block_specs(cfg, "q")
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    row_shape = f32(B, N, cfg.q_len_padded)
    visible, visible_specs = None, None
    if cfg.mask_layout is not None:
        visible = visible_key_blocks(tile_inputs.kinds, block_q=cfg.block_q, block_k=cfg.block_k,
                                     is_causal=cfg.causal, window=cfg.window)
        visible_specs = visible_block_specs(cfg, cfg.mask_layout)
    out_specs = [sp["row"]] * 3 + [sp["block_list"](cfg.kv_blocks_padded)]
    out_shape = [row_shape] * 3 + [jax.ShapeDtypeStruct((B, N, cfg.num_q_blocks, cfg.kv_blocks_padded), jnp.int32)]
    if cfg.debug:
        out_specs += [sp["block_scalar"]] * 4
        out_shape += [jax.ShapeDtypeStruct((B, N, cfg.num_q_blocks), jnp.int32)] * 4
    outs = call(
        functools.partial(_threshold_kernel, cfg=cfg),
        cfg,
        (cfg.num_q_blocks, B, N),
        [sp["alpha"], sp["batch_scalar"], sp["batch_scalar"], sp["q"], sp["kv"], tile_input_specs(cfg, sp, "q"),
         visible_specs],
        out_specs,
        out_shape,
        "entmax_threshold",
        "tau",
    )(alpha, q_len, kv_len, q, k, tile_inputs, visible)
    tau, row_max, allowed, block_mask, *debug = outs
    return tau, row_max, allowed, block_mask[..., : cfg.num_kv_blocks], debug


