"""kernels/histogram.py on its own (plain jnp, outside any kernel), against numpy recounts and a
float64 root: the counts after any tile order are those of the final window, and the bracket
holds the exact τ on adversarial rows. Then, through the τ kernel (interpret mode): the histogram
start takes fewer solver passes than the analytic start, at the same accuracy."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adasplash_jax import BlockSizes, entmax_attention
from adasplash_jax.inputs import check_attention_inputs
from adasplash_jax.kernels import histogram
from adasplash_jax.kernels.config import MASKED
from adasplash_jax.kernels.debug import tile_visits
from adasplash_jax.kernels.tiles import ceil_multiply_add, product_fraction
from adasplash_jax.solver import threshold_bracket

BLOCK_K = 16


def test_interpret_mode_fmas_are_exact():
    """tiles.ceil_multiply_add and product_fraction (the interpret-mode stand-ins for fma.rp and
    fma.rn, which plain jnp lacks) give the exactly rounded results, against float64, where the
    product of two float32 is exact: ⌈a·b + c⌉ = c + ⌈a·b⌉ for an integer c, and a·b − round(a·b)
    rounded once — on products of every magnitude up to 2^22, exact integers and ties included."""
    rng = np.random.default_rng(7)
    n = 100_000
    a = (rng.normal(size=n) * 10.0 ** rng.uniform(-4, 4, n)).astype(np.float32)
    b = (rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-4, 3, n)).astype(np.float32)
    a[:2000] = np.arange(-1000, 1000) * 0.25  # products on integers and on halves
    b[:2000] = 2.0
    product = a.astype(np.float64) * b.astype(np.float64)
    keep = np.abs(product) < 2.0**22
    c = (2.0**23 - np.round(product) + rng.integers(0, 4, n)).astype(np.float32)  # results in [2^23, 2^24)
    got = np.asarray(jax.jit(ceil_multiply_add)(jnp.asarray(a), jnp.asarray(b), jnp.asarray(c)), np.float64)
    np.testing.assert_array_equal(got[keep], (c.astype(np.float64) + np.ceil(product))[keep])
    whole = np.round(a * b).astype(np.float32)  # the rounded product's nearest integer, as the kernel forms it
    got = np.asarray(jax.jit(product_fraction)(jnp.asarray(a), jnp.asarray(b), jnp.asarray(whole)))
    np.testing.assert_array_equal(got[keep], (product - whole).astype(np.float32)[keep])


# The two grids (histogram.RowHistogram): anchored at the first tile's max (with the Jensen sum),
# or aligned to an integer grid index (without it: BlockSizes.jensen_bound off).
GRIDS = ["anchored", "aligned"]


@functools.partial(jax.jit, static_argnames=("order", "block_k", "grid"))
def _run_histogram(d, x_mult, order, block_k=BLOCK_K, grid="anchored"):
    R, S = d.shape
    tiles = range(S // block_k) if order is None else order
    hist = histogram.RowHistogram.empty(R)
    row_max = jnp.full((R,), MASKED, jnp.float32)
    for j in tiles:
        tile = d[:, j * block_k:(j + 1) * block_k]
        tile_max = jnp.max(tile, axis=1)
        new_max = jnp.maximum(row_max, tile_max)
        hist, _ = histogram.update(hist, tile, tile_max, new_max, x_mult, sum_below=grid == "anchored")
        row_max = new_max
    return hist, row_max


def run_histogram(d, x_mult, order=None, grid="anchored"):
    """Feed the rows d [R, S] (MASKED = masked) tile by tile as the max pass does (jitted once per
    tile order)."""
    return _run_histogram(jnp.asarray(d, jnp.float32), jnp.float32(x_mult),
                          None if order is None else tuple(int(j) for j in order), grid=grid)


@functools.partial(jax.jit, static_argnames="alpha")
def model_bracket(hist, row_max, allowed, mean, x_mult, alpha):
    lo0, hi0 = threshold_bracket(jnp.zeros_like(row_max), allowed, alpha, row_mean=mean)
    c0 = 1.0 / (alpha - 1.0)
    power = lambda z: jnp.where(z > 0, jnp.exp(c0 * jnp.log(jnp.where(z > 0, z, 1.0))), 0.0)  # noqa: E731
    return (lo0, hi0), histogram.bracket(hist, power, row_max, allowed, x_mult, lo0, hi0)


def recount(d, x_mult, hist):
    """Counts of the final window from scratch (float64 grid positions u of the kernel's grid), and
    per row the entries within 2e-3 bins of an edge, which the kernel may count one bin lower."""
    anchor, width, top, frac = (np.asarray(a, np.float64)[:, None] for a in (hist.anchor, hist.width, hist.top,
                                                                                hist.frac))
    u = (d.astype(np.float32).astype(np.float64) - anchor) * x_mult / width + frac
    k = top - np.floor(u)
    valid = d > MASKED / 2
    counts = np.stack([((k == b) & valid).sum(1) for b in range(histogram.BINS)], 1)
    near_edge = (np.abs(u - np.round(u)) < 2e-3) & valid & (k <= histogram.BINS)
    return counts, near_edge.sum(1)


def exact_tau(x, alpha):
    """τ of shifted rows (max 0) by float64 bisection (masked entries: −inf)."""
    lo, hi = np.full(x.shape[0], -1.0), np.zeros(x.shape[0])
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        f = (np.maximum(x - mid[:, None], 0.0) ** (1.0 / (alpha - 1.0))).sum(1) - 1.0
        lo, hi = np.where(f > 0, mid, lo), np.where(f > 0, hi, mid)
    return 0.5 * (lo + hi)


def adversarial_rows(seed=0, S=128):
    """Named [16, S] score rows: normal, exact ties (some at the top), a narrow cluster, near-uniform,
    one outlier, a large offset, partly masked, and scores that rise tile after tile (the max moves
    up by many bins, shifting the histogram)."""
    rng = np.random.default_rng(seed)
    R = 16
    rows = {
        "normal": rng.normal(size=(R, S)),
        "ties": np.where(rng.random((R, S)) < 0.3, 2.0, rng.normal(size=(R, S))),
        "top_ties": np.where(rng.random((R, S)) < 0.2, rng.normal(size=(R, 1)).max() + 3.0, rng.normal(size=(R, S))),
        "cluster": 1.0 + 1e-3 * rng.normal(size=(R, S)),
        "near_uniform": np.ones((R, S)) + 1e-7 * rng.normal(size=(R, S)),
        "outlier": np.concatenate([np.full((R, 1), 40.0), rng.normal(size=(R, S - 1))], 1),
        "offset": rng.normal(size=(R, S)) + 300.0,
        "rising": rng.normal(size=(R, S)) + np.linspace(0.0, 6.0, S)[None, :],
    }
    masked = rng.normal(size=(R, S))
    masked[rng.random((R, S)) < 0.5] = MASKED
    masked[:, 0] = 0.0  # every row keeps one entry
    rows["half_masked"] = masked
    return rows


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("name", sorted(adversarial_rows()))
@pytest.mark.parametrize("x_mult", [0.005, 0.5, 50.0])
def test_counts_are_those_of_the_final_window_in_any_tile_order(name, x_mult, grid):
    d = adversarial_rows()[name]
    rng = np.random.default_rng(1)
    for order in (None, rng.permutation(d.shape[1] // BLOCK_K)):
        hist, row_max = run_histogram(d, x_mult, order, grid)
        np.testing.assert_array_equal(np.asarray(row_max), d.astype(np.float32).max(1))
        counts = np.stack([np.asarray(c) for c in hist.counts], 1)
        want, near_edge = recount(d, x_mult, hist)
        # An aligned grid gives up (scale 0, the histogram unused) only where its origin, the
        # anchor's grid index, is too large for an exact addend (near-uniform rows around 1 at
        # x_mult = 50: 10^7 bins out); the others are counted as a recount finds them.
        gridded = np.asarray(hist.scale) > 0
        grid_index = np.abs(np.asarray(hist.anchor, np.float64) * x_mult / np.asarray(hist.width, np.float64))
        assert (gridded | (grid_index > 2.0**23 - 2.0**13 - 1)).all()
        assert gridded.all() or (grid == "aligned" and name == "near_uniform")
        assert (np.abs(counts - want).sum(1) <= 2 * near_edge)[gridded].all(), (counts, want)
        # The max is counted in bin 0, or in bin 1 where it lies a hair (ε = 2⁻¹⁰ bins) below the
        # edge above (top is raised by ε for rounding); the window starts at the first tile's max
        # (its anchor).
        u_max = ((np.asarray(row_max, np.float64) - np.asarray(hist.anchor, np.float64)) * x_mult
                 / np.asarray(hist.width, np.float64) + np.asarray(hist.frac, np.float64))
        below_edge = (np.ceil(u_max) - u_max < 2.0**-9) & (np.ceil(u_max) > u_max)
        assert ((counts[:, 0] >= 1) | (below_edge & (counts[:, 1] >= 1)))[gridded].all()
        first = d[:, (order[0] if order is not None else 0) * BLOCK_K:][:, :BLOCK_K].astype(np.float32)
        np.testing.assert_array_equal(np.asarray(hist.anchor), first.max(1))


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("block_k", [64, 128, 256])
def test_wide_tiles_count_a_full_bin(block_k, grid):
    """A tile whose every entry lands in one bin (block_k of them): the packed 7- and 8-bit fields and
    the per-bin count of 256-wide tiles hold it."""
    d = np.zeros((4, 2 * block_k))
    d[:, 0] = 1.0  # the first tile sets a grid; every other entry sits on its own max
    d[:, block_k:] = 1.0
    hist, _ = _run_histogram(jnp.asarray(d, jnp.float32), jnp.float32(0.5), None, block_k, grid)
    counts = np.stack([np.asarray(c) for c in hist.counts], 1)
    np.testing.assert_array_equal(counts.sum(1), 2 * block_k)
    np.testing.assert_array_equal(counts[:, 0], block_k + 1)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("below_edge", [2.0**-14, 2.0**-11, 2.0**-8, 0.0])
def test_a_max_on_or_just_below_a_grid_edge_is_counted(below_edge, grid):
    """A later tile's max a hair below (or on) the next grid edge: every entry still lands in a bin
    (a negative bin index would corrupt the packed counts), and the bracket holds the root. (On an
    aligned grid the edges lie frac below the anchor's grid position.)"""
    rng = np.random.default_rng(3)
    first = rng.normal(size=(16, BLOCK_K))
    hist, _ = run_histogram(first, 0.5, grid=grid)
    steps = rng.integers(1, 6, size=(16, 1))  # the max rises by 1–5 grid bins, minus a hair
    anchor, scale, frac = (np.asarray(a, np.float64)[:, None] for a in (hist.anchor, hist.scale, hist.frac))
    new_max = anchor + (steps - below_edge - frac) / scale
    rest = rng.normal(size=(16, 3 * BLOCK_K))
    rest[:, :1] = new_max
    d = np.concatenate([first, rest], 1)
    hist, row_max = run_histogram(d, 0.5, grid=grid)
    counts = np.stack([np.asarray(c) for c in hist.counts], 1)
    want, near_edge = recount(d, 0.5, hist)
    assert (counts >= 0).all() and (counts.sum(1) >= 1).all()
    assert (np.abs(counts - want).sum(1) <= 2 * near_edge).all(), (counts, want)
    x = (d.astype(np.float32) - np.asarray(row_max)[:, None]) * np.float32(0.5)
    allowed = jnp.full((16,), float(d.shape[1]), jnp.float32)
    mean = jnp.asarray(x.sum(1), jnp.float32) / allowed
    for alpha in (1.5, 2.0):
        _, (lo, hi) = model_bracket(hist, row_max, allowed, mean, jnp.float32(0.5), alpha)
        tau = exact_tau(x.astype(np.float64), alpha)
        assert (np.asarray(lo) <= tau + 1e-6).all() and (tau <= np.asarray(hi) + 1e-6).all()


@pytest.mark.parametrize("offset", [0.0, 1e3, -1e5])
def test_sum_below_the_anchor_over_kept_entries(offset):
    """update's second result, Σ (anchor − d) over each tile's kept entries, summed over the tiles
    (the τ kernel's Jensen mean), against float64 — with a keep mask, a max that rises after the
    first tile (the anchor stays), and scores far from zero."""
    rng = np.random.default_rng(4)
    R, S = 16, 4 * BLOCK_K
    d = (rng.normal(size=(R, S)) + np.linspace(0.0, 3.0, S) + offset).astype(np.float32)
    keep = rng.random((R, S)) < 0.7
    keep[:, 0] = True
    hist, total = histogram.RowHistogram.empty(R), jnp.zeros((R,), jnp.float32)
    row_max = jnp.full((R,), MASKED, jnp.float32)
    masked = jnp.where(jnp.asarray(keep), jnp.asarray(d), MASKED)
    for j in range(S // BLOCK_K):
        cols = slice(j * BLOCK_K, (j + 1) * BLOCK_K)
        tile_max = jnp.max(masked[:, cols], axis=1)
        new_max = jnp.maximum(row_max, tile_max)
        args = (masked[:, cols], tile_max, new_max, jnp.float32(0.5), jnp.asarray(keep[:, cols]))
        assert histogram.update(hist, *args, sum_below=False)[1] is None  # BlockSizes.jensen_bound off
        hist, tile_below = histogram.update(hist, *args)
        total, row_max = total + tile_below, new_max
    anchor = np.where(keep[:, :BLOCK_K], d[:, :BLOCK_K], -np.inf).max(1).astype(np.float64)
    np.testing.assert_array_equal(np.asarray(hist.anchor), anchor)
    want = np.where(keep, anchor[:, None] - d.astype(np.float64), 0.0).sum(1)
    np.testing.assert_allclose(np.asarray(total, np.float64), want, rtol=1e-5, atol=1e-3)
    # The kernel's mean relative to the max, −(Σ/n + (m − anchor)), to float32 accuracy.
    n = keep.sum(1)
    mean = -(np.asarray(total, np.float64) / n + (np.asarray(row_max, np.float64) - anchor))
    want_mean = np.where(keep, d - d.max(1, where=keep, initial=-np.inf)[:, None], 0.0).sum(1) / n
    np.testing.assert_allclose(mean, want_mean, atol=1e-5 * (1.0 + abs(offset)))


@pytest.mark.parametrize("grid", GRIDS)
def test_a_row_without_valid_entries_has_no_grid(grid):
    d = np.full((4, 64), MASKED)
    hist, _ = run_histogram(d, 0.5, grid=grid)
    assert float(jnp.max(hist.width)) == 0.0
    assert float(sum(jnp.sum(c) for c in hist.counts)) == 0.0


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("name", sorted(adversarial_rows()))
@pytest.mark.parametrize("x_mult", [0.005, 0.5, 50.0])
@pytest.mark.parametrize("alpha", [1.25, 1.5, 1.8, 2.0])
def test_bracket_holds_the_exact_tau_and_is_narrower(name, x_mult, alpha, grid):
    d = adversarial_rows()[name].astype(np.float32)
    hist, row_max = run_histogram(d, x_mult, grid=grid)
    valid = d > MASKED / 2
    x = np.where(valid, (d - np.asarray(row_max)[:, None]) * np.float32(x_mult), -np.inf)
    allowed = jnp.asarray(valid.sum(1), jnp.float32)
    mean = jnp.asarray(np.where(valid, x, 0.0).sum(1), jnp.float32) / allowed
    (lo0, hi0), (lo, hi) = model_bracket(hist, row_max, allowed, mean, jnp.float32(x_mult), alpha)
    lo, hi, lo0, hi0 = (np.asarray(a, np.float64) for a in (lo, hi, lo0, hi0))
    tau = exact_tau(x.astype(np.float64), alpha)
    # Holds the root (up to float32 rounding of the row), inside the analytic bracket.
    ulp = 4e-7 * np.maximum(1.0, np.abs(tau))
    assert (lo <= tau + ulp).all() and (tau <= hi + ulp).all(), (lo - tau, hi - tau)
    assert (lo >= lo0).all() and (hi <= hi0).all() and (lo <= hi).all()
    if name in ("normal", "ties", "outlier", "rising", "half_masked"):
        # About one bin of the first tile's spread: far narrower than the analytic bracket.
        assert np.median(hi - lo) <= 0.5 * np.median(hi0 - lo0)


def qkv_of_scores(scores, seed=0):
    """q, k with q·kᵀ = scores exactly (k = identity), one head; scale 1 is passed explicitly."""
    T, S = scores.shape
    q = jnp.asarray(scores, jnp.float32)[None, :, None, :]
    k = jnp.eye(S, dtype=jnp.float32)[None, :, None, :]
    v = jnp.asarray(np.random.default_rng(seed).normal(size=(1, S, 1, S)), jnp.float32)
    return q, k, v


def kernel_passes(q, k, v, alpha, block_sizes, scale):
    inp = check_attention_inputs(q, k, v, alpha=alpha, mask=None, is_causal=False, scale=scale,
                                 query_seq_lengths=None, key_value_seq_lengths=None, segment_ids=None)
    return np.asarray(tile_visits(inp, jnp.zeros_like(q), block_sizes=block_sizes)["tau_passes"])


@pytest.mark.slow
@pytest.mark.parametrize("jensen_bound", [True, False])
@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.25, 1.8])
def test_histogram_start_saves_solver_passes_at_the_same_accuracy(alpha, jensen_bound):
    """Normal scores at three temperatures plus the adversarial rows, 128 keys in 16-wide tiles;
    with the Jensen sum and an anchored grid, or without it and an aligned grid."""
    rows = adversarial_rows(S=128)
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(size=(16, 128)) * s for s in (0.3, 1.0, 3.0)]
                            + [np.where(r > MASKED / 2, r, -30.0) for r in rows.values()])
    q, k, v = qkv_of_scores(scores)
    with_hist = BlockSizes(16, 16, jensen_bound=jensen_bound)
    without = dataclasses.replace(with_hist, histogram_start=False)
    kw = dict(alpha=alpha, scale=1.0)
    p_with, p_without = kernel_passes(q, k, v, alpha, with_hist, 1.0), kernel_passes(q, k, v, alpha, without, 1.0)
    assert p_with.sum() < p_without.sum(), (p_with, p_without)
    assert (p_with <= p_without + 1).all()
    ref = entmax_attention(q, k, v, implementation="xla", **kw)
    for bs in (with_hist, without):
        out = entmax_attention(q, k, v, implementation="pallas", block_sizes=bs, **kw)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.8])
def test_histogram_start_saves_passes_on_attention_like_rows(alpha):
    """Queries and keys with normal entries (head dim 64, causal, 128 keys in 32-wide tiles) at three
    temperatures: the histogram start takes fewer solver passes in total (benchmarks/tau_passes.py
    prints the figures at L = 512)."""
    rng = np.random.default_rng(0)
    with_hist = BlockSizes(32, 32)
    without = dataclasses.replace(with_hist, histogram_start=False)
    totals = np.zeros(2)
    for scale in (0.3, 1.0, 3.0):
        q = jnp.asarray(rng.normal(size=(1, 128, 1, 64)) * scale, jnp.float32)
        k, v = (jnp.asarray(rng.normal(size=(1, 128, 1, 64)), jnp.float32) for _ in range(2))
        for i, bs in enumerate((with_hist, without)):
            inp = check_attention_inputs(q, k, v, alpha=alpha, mask=None, is_causal=True, scale=None,
                                         query_seq_lengths=None, key_value_seq_lengths=None, segment_ids=None)
            totals[i] += np.asarray(tile_visits(inp, jnp.zeros_like(q), block_sizes=bs)["tau_passes"]).sum()
    assert totals[0] < totals[1], totals


def test_grid_starts_once_per_query_block_unless_rows_first_see_keys_later():
    """The max pass's one branch (a row's grid start, which benchmarks/kernel_cost.py charges once per
    query block) runs on the tiles where some row of the block sees its first valid key: causal
    rows all see their diagonal tile, visited first, so once per block; with segments, a block whose
    rows' segments lie in two key tiles starts twice, in whatever order the tiles come."""
    rng = np.random.default_rng(5)
    L, block = 64, 16
    q, k, v = (jnp.asarray(rng.normal(size=(1, L, 1, 16)), jnp.float32) for _ in range(3))
    bs = BlockSizes(block, block)

    def grid_starts(is_causal, segment_ids):
        inp = check_attention_inputs(q, k, v, alpha=1.5, mask=None, is_causal=is_causal, scale=None,
                                     query_seq_lengths=None, key_value_seq_lengths=None, segment_ids=segment_ids)
        visits = tile_visits(inp, jnp.zeros_like(q), block_sizes=bs)
        return np.asarray(visits["tau_grid_starts"])[0, 0], np.asarray(visits["tau"])[0, 0]

    starts, visited = grid_starts(True, None)
    np.testing.assert_array_equal(starts, np.ones(L // block))
    np.testing.assert_array_equal(visited, np.arange(1, L // block + 1))
    # Keys: one segment per key tile (0, 1, 2, 3). Queries: block 1 half in segment 0, half in 3;
    # every other query block in the segment of its own key tile.
    kv_seg = np.repeat(np.arange(L // block), block)
    q_seg = kv_seg.copy()
    q_seg[block:block + block // 2] = 0
    q_seg[block + block // 2:2 * block] = 3
    starts, _ = grid_starts(False, (jnp.asarray(q_seg[None], jnp.int32), jnp.asarray(kv_seg[None], jnp.int32)))
    np.testing.assert_array_equal(starts, [1, 2, 1, 1])
