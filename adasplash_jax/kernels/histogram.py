"""The τ kernel's histogram start, built during the max pass (no pass of its own).

AdaSplash-2 spends a pass after the max pass on a histogram of each row; here the histogram is
kept while the max is still being found, so the first solver pass already starts inside a narrow
bracket. Each row gets a grid of ``BINS`` bins of width ``width`` (in entmax units x), anchored at
the raw score ``anchor`` of the first tile's max and sized from that tile's spread, so rows of
any temperature get bins that resolve them. The histogram covers the ``BINS`` grid bins ending
at the bin of the running max; when the max moves up by s bins the counts shift by s (the grid
never moves, so the shift is exact) and the bins that fall off the bottom, which lie below the
new window, are dropped.

After the pass the counts bound f(τ) = Σ [x − τ]_+^c0 − 1 from both sides: placing every counted
entry at its bin's lower edge (and the uncounted ones at −∞) gives f_low ≤ f, placing them at the
upper edges (capped at the max, and the uncounted ones at the window's bottom) gives f_up ≥ f,
so the roots of the two models bracket τ. Both are solved by bisection on the row vectors alone.

Per tile an entry costs its bin index and a packed count: the four bin counters share an int32 (7
bits each, or 8 for 128-wide tiles: a tile adds at most ``block_k`` to a bin), so one integer row
reduction per tile (tiles of 256 keys and more count each bin on its own).
Four bins rather than eight: in a float32 replay of the solver (normal, tied, clustered, near-uniform
and outlier rows, 64–8192 keys, α = 1.25–2) eight bins saved 0.2 passes per row on average, less
than their second word costs per tile.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

from adasplash_jax.kernels.config import MASKED
from adasplash_jax.kernels.tiles import ceil_multiply_add, product_fraction

BINS = 4  # counters packed in one int32
# Model roots by bisection: 2^-12 of the analytic bracket (≤ 1 wide) is far inside one bin, and
# the bisection runs once per program on row vectors (12 × the model's points).
BISECTIONS = 12
# An entry's grid index is a rounded product, off by up to |index|·2^-23 bins: beyond 2^12 bins
# above the anchor (a max ~1,400 first-tile spreads above the first tile's) the histogram is not
# used and the solver starts from the analytic bracket.
_MAX_TOP = 2.0**12
# The running max's grid index is raised by this fraction of a bin (see update).
_ROUNDING_SHIFT = 2.0**-10
# Slack on the bin edges (relative to the width), well above that and the rounding of u.
_EDGE_SLACK = 2.0**-6


class RowHistogram(NamedTuple):
    """Per row (each [block_q]): the raw score the grid is anchored at, the bin width in x units
    (0 until the row has seen a valid entry) and the grid index per raw score unit
    (x_mult / width; 0 without a grid), the grid index of the running max's bin, and the counts
    of the ``BINS`` bins below it (int32; counts[0] holds the max).

    Grid positions are u = d·scale − origin: the grid's edges lie where u is an integer. Either
    the anchor is an edge (``origin`` = anchor·scale, not stored: 0 here, ``frac`` 0), and an
    entry's index is formed from anchor − d; or (``aligned_grid``) ``origin`` is the integer
    round(anchor·scale) and ``frac`` = anchor·scale − origin ∈ [−½, ½], the anchor's own position,
    exact: the index is then formed from d itself, in one fma with no subtraction."""

    anchor: object
    width: object
    scale: object
    top: object
    counts: tuple
    origin: object
    frac: object

    @classmethod
    def empty(cls, block_q: int):
        # A row without a grid keeps top = BINS: every entry then lands at bin ≥ BINS (uncounted).
        zero = jnp.zeros((block_q,), jnp.float32)
        return cls(zero, zero, zero, jnp.full((block_q,), float(BINS), jnp.float32),
                   (jnp.zeros((block_q,), jnp.int32),) * BINS, zero, zero)


def _any(flags):
    """Whether any row's flag is set, as a scalar (an integer max: Triton has no boolean reduction)."""
    return jnp.max(flags.astype(jnp.int32)) > 0


def _shift_down(counts, shift):
    """counts[k] ← counts[k − shift] (0 below), for a per-row shift ≥ 0, in log2(BINS) + 1 steps."""
    shift = jnp.clip(shift, 0, BINS).astype(jnp.int32)
    step = 1
    while step <= BINS:
        moved = (shift & step) != 0
        counts = tuple(jnp.where(moved, counts[k - step] if k >= step else 0, counts[k]) for k in range(BINS))
        step *= 2
    return counts


# An aligned grid's origin is an integer grid index below this (in magnitude): the fma's addend
# origin + top + 2^23 is then exact, and so is the product d·scale of an entry in the window
# (below 2^23, top ≤ _MAX_TOP) in interpret mode. Rows beyond it (a max ~8·10^6 bin widths from
# 0: near-uniform rows of large scores) get no grid, and start from the analytic bracket.
_MAX_ORIGIN = 2.0**23 - 2.0**13


def update(hist: RowHistogram, d, tile_max, new_max, x_mult, keep=None, ceil_fma=ceil_multiply_add,
           any_start=None, sum_below=True, fraction_fma=product_fraction):
    """The histogram after one score tile ``d`` [block_q, block_k] (raw scores, masked entries at
    MASKED); ``tile_max`` and ``new_max`` are the tile's and the running row max (after it).

    Also returns each row's Σ (anchor − d) over the tile's kept entries (``keep``: the tile's keep
    mask, None when every entry counts), the τ kernel's mean for the Jensen bound: relative to the
    anchor, which never moves once set, so the sum needs no rescaling when the max grows, and the
    offset anchor − d it sums is the one the bin index is formed from (one subtraction per entry
    for both). With ``sum_below=False`` (a kernel without the Jensen bound) no sum (None) and an
    aligned grid (see RowHistogram): the subtraction per entry is gone. ``ceil_fma(a, b, c)`` =
    ⌈a·b + c⌉ per entry for an integer c, the result in [2^23, 2^24) (the kernel's fma rounded up,
    tiles.ceil_fma); ``fraction_fma(a, b, w)`` = a·b − w rounded once (tiles.fraction_fma), for
    an aligned grid's ``frac``. ``any_start``: whether any of ``starting_rows`` holds (a scalar;
    None: reduced here), for a caller that folds it into a block-wide reduction of its own."""
    aligned_grid = not sum_below
    valid_row = tile_max > 0.5 * MASKED
    starts = starting_rows(hist, tile_max)

    def start_grid():
        # The grid of a row's first valid tile: anchored at its max, BINS − 1 bins over its spread,
        # at most 1/BINS wide: entries further than 1 below the max never reach the support, and
        # the BINS bins then cover [max − 1, max] exactly (1/(BINS − 1) wide, one bin lay below
        # it: benchmarks/tau_passes.py, 2026-12-04, took 0–0.6 solver passes more per query block).
        tile_min = jnp.min(jnp.where(d > 0.5 * MASKED, d, -MASKED), axis=1)
        spread = jnp.where(valid_row, tile_max - tile_min, 0.0)
        # The widest spread of the block's rows: a row of the causal diagonal sees few keys there.
        spread = jnp.minimum(jnp.max(spread) * x_mult, (BINS - 1) / BINS)
        width = jnp.maximum(spread, 2.0**-16) * (1.0 / (BINS - 1))
        scale = x_mult / width
        origin, frac = jnp.zeros_like(width), jnp.zeros_like(width)
        if aligned_grid:
            origin = jnp.floor(tile_max * scale + 0.5)  # (Pallas' GPU lowering has no round)
            # Too far out for an exact addend: no grid (scale 0: every entry in bin 0, the
            # histogram unused; the row keeps its width, so it does not start again).
            scale = jnp.where(jnp.abs(origin) < _MAX_ORIGIN, scale, 0.0)
            origin = jnp.where(scale > 0, origin, 0.0)
            frac = jnp.where(scale > 0, fraction_fma(tile_max, scale, origin), 0.0)
        return (jnp.where(starts, tile_max, hist.anchor), jnp.where(starts, width, hist.width),
                jnp.where(starts, scale, hist.scale), jnp.where(starts, origin, hist.origin),
                jnp.where(starts, frac, hist.frac))

    any_start = _any(starts) if any_start is None else any_start
    anchor, width, scale, origin, frac = lax.cond(
        any_start, start_grid, lambda: (hist.anchor, hist.width, hist.scale, hist.origin, hist.frac))
    # The max's bin, raised by ε, far above the rounding of this sum of products (≤ 2^12 bins, see
    # bracket): top ≥ floor(u) of the max as the entries' fma forms it, so every k ≥ 0 (a max within
    # ε below an edge makes top the bin above, where the max counts in bin 1).
    top = jnp.where(width > 0, jnp.floor((new_max - anchor) * scale + frac + _ROUNDING_SHIFT), float(BINS))
    # A row that just started has no counts yet: any shift leaves them zero. No branch: at
    # attention-like scores some row of the block moves its max up a bin on most tiles (44–96% of
    # the max pass's tiles at L = 2048, query scales 0.3–3, α = 1.5: benchmarks/tau_passes.py with
    # the shift under a lax.cond), where a branch would add its block-wide vote and run anyway.
    counts = _shift_down(hist.counts, top - hist.top)
    # Bin of each entry: k = top − floor(u) = top + ⌈−u⌉, read off 2^23 + top + ⌈−u⌉: one fma
    # rounded up (the result lies in [2^23, 2^24), where floats are the integers), whose low
    # mantissa bits hold k: cheaper than a float → int conversion (which Triton clamps to the int32
    # range first). On an aligned grid −u = origin − d·scale: ⌈d·(−scale) + (origin + top + 2^23)⌉,
    # exact on the GPU; otherwise −u = (anchor − d)·scale: ⌈(anchor − d)·scale + (top + 2^23)⌉,
    # exact but for the rounding of anchor − d. An entry exactly on an edge (the anchor itself, on
    # an anchored grid) stays in its bin; k ≥ 0 as top ≥ floor(u) of the max. Masked entries,
    # those below the window and rows without a grid (scale 0, top = BINS) clamp to k = BINS.
    magic = 2.0**23
    tile_below = None
    if aligned_grid:
        k_float = ceil_fma(d, -scale[:, None], (origin + top + magic)[:, None])
    else:
        below_anchor = anchor[:, None] - d
        tile_below = jnp.sum(below_anchor if keep is None else jnp.where(keep, below_anchor, 0.0), axis=1)
        k_float = ceil_fma(below_anchor, scale[:, None], (top + magic)[:, None])
    # The bitcast of the rounded k + 2^23, less that of 2^23: k (times the field width below, in
    # one integer multiply-add).
    k_bits = lax.bitcast_convert_type(jnp.minimum(k_float, magic + BINS), jnp.int32)
    k_offset = int(np.float32(magic).view(np.int32))
    if d.shape[1] >= 256:  # a bin may get 256 entries of one tile: more than 8 bits, count per bin
        k = k_bits - k_offset
        return RowHistogram(anchor, width, scale, top, tuple(
            c + jnp.sum((k == i).astype(jnp.int32), axis=1, dtype=jnp.int32) for i, c in enumerate(counts)),
            origin, frac), tile_below
    # One packed count per entry: bin k adds 1 << (bits·k). With 7-bit fields (block_k < 128) bin
    # BINS lands in the unused top bits, where overflow only wraps; 8-bit fields need a select.
    bits = 7 if d.shape[1] < 128 else 8
    if bits == 7:
        # (k_bits − k_offset)·7 as one multiply-add, with the constant wrapped to int32 as the
        # product of k_bits is: their difference, 7k ∈ [0, 7·BINS], is exact.
        wrapped = int(np.array(k_offset * bits, np.int64).astype(np.int32))
        one = jnp.left_shift(1, k_bits * bits - wrapped)
    else:
        k = k_bits - k_offset
        one = jnp.where(k < BINS, jnp.left_shift(1, (k & (BINS - 1)) * bits), 0)
    packed = jnp.sum(one, axis=1, dtype=jnp.int32)  # (int32 under x64 too: the counts are a loop carry)
    field = (1 << bits) - 1
    counts = tuple(c + (jnp.right_shift(packed, bits * i) & field) for i, c in enumerate(counts))
    return RowHistogram(anchor, width, scale, top, counts, origin, frac), tile_below


def starting_rows(hist: RowHistogram, tile_max):
    """The rows whose grid this tile starts: no grid yet and a valid entry here (a row's first
    valid tile; its running max is then this tile's, so its top relative to it is 0)."""
    return (hist.width == 0) & (tile_max > 0.5 * MASKED)


def grid_started(old: RowHistogram, new: RowHistogram):
    """Whether ``update`` from ``old`` to ``new`` started a row's grid (its one branch, taken on a
    block's first tile with a valid row): a scalar flag, for the debug count of how often a tile
    pays for it."""
    return _any((old.width == 0) & (new.width > 0))


def _model_root(power, points, lo, hi):
    """[lo, hi] around the root of Σ_k n_k·[e_k − t]_+^c0 = 1 (points: ((n_k, e_k), ...)) by bisection."""
    def step(_, bracket):
        lo, hi = bracket
        t = 0.5 * (lo + hi)
        mass = sum(n * power(jnp.maximum(e - t, 0.0)) for n, e in points)
        return jnp.where(mass > 1.0, t, lo), jnp.where(mass > 1.0, hi, t)

    return lax.fori_loop(0, BISECTIONS, step, (lo, hi))


def bracket(hist: RowHistogram, power, row_max, allowed, x_mult, lo, hi):
    """The analytic bracket [lo, hi] of τ (shifted rows: max 0) narrowed by the histogram, where it
    is usable. ``power(z)`` = z^c0 for z ≥ 0; ``allowed``: the entries each row may attend to."""
    usable = (hist.width > 0) & (hist.scale > 0) & (hist.top <= _MAX_TOP)
    width = hist.width
    # Lower edge of bin k in shifted x units: grid index (top − k) relative to the max's, whose
    # grid position is (m − anchor)·scale + frac.
    offset = (row_max - hist.anchor) * x_mult + hist.frac * width
    lower = [(hist.top - k) * width - offset - _EDGE_SLACK * width for k in range(BINS)]
    upper = [jnp.minimum(e + (1.0 + 2.0 * _EDGE_SLACK) * width, 0.0) for e in lower]
    counts = [c.astype(jnp.float32) for c in hist.counts]
    outside = jnp.maximum(allowed - sum(counts), 0.0)
    bottom = lower[-1] + 2.0 * _EDGE_SLACK * width
    low_lo, _ = _model_root(power, list(zip(counts, lower)), lo, hi)
    _, up_hi = _model_root(power, list(zip(counts, upper)) + [(outside, bottom)], lo, hi)
    new_lo = jnp.where(usable, jnp.maximum(lo, low_lo), lo)
    new_hi = jnp.where(usable, jnp.minimum(hi, up_hi), hi)
    return jnp.minimum(new_lo, new_hi), new_hi
