"""The α-entmax threshold τ: power sums, the safeguarded Halley step, and the solvers.

For one row of (α−1)-scaled scores x, τ solves f(τ) = Σ_j [x_j − τ]_+^(1/(α−1)) − 1 = 0.
Everything here works on the last axis in float32. The dense path (``entmax.py``)
iterates on whole rows; the τ kernel accumulates the same power sums over key blocks
and calls the same ``solver_step`` and ``threshold_bracket``.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

Solver = Literal["auto", "halley", "histogram", "bisect", "sort"]

# Shifted, (α−1)-scaled values are clamped here; any value ≤ −1 is outside the support.
_FLOOR = -2.0
# Iteration caps used when ``n_iter`` is None (the solver stops earlier once converged).
_MAX_ITER = {"halley": 30, "bisect": 60}
# Stop once |Σ p − 1| is below this (fp32 sums of long rows cannot do much better).
TOL = 1e-6
# Smallest z whose powers are taken (z = 0 is masked out by sign(z) instead).
_TINY = 1e-30
# A Halley step from a residual |Σp − 1| below this ends the iteration (see below).
_PREDICT = 1e-4
# Bins of the histogram start (``solver="histogram"``): one pass evaluates bins + 1 points.
_HISTOGRAM_BINS = 16



# ------------------------------------------------------------------ threshold solvers


def powers(alpha_static: float | None, alpha, z):
    """Returns (z^c0, z^c1, z^c2) for z ≥ 0, with exact zeros where z = 0.

    c0 = 1/(α−1), c1 = c0 − 1, c2 = c0 − 2. Powers are never taken of a non-positive
    number (safe-where), so neither values nor gradients produce NaN.
    """
    pos = z > 0
    if alpha_static == 2.0:
        one = pos.astype(z.dtype)
        return z, one, jnp.zeros_like(z)
    if alpha_static == 1.5:
        return z * z, z, pos.astype(z.dtype)
    c0 = 1.0 / (alpha - 1.0)
    log_z = jnp.log(jnp.where(pos, z, 1.0))
    p0 = jnp.where(pos, jnp.exp(c0 * log_z), 0.0)
    p1 = jnp.where(pos, jnp.exp((c0 - 1.0) * log_z), 0.0)
    p2 = jnp.where(pos, jnp.exp((c0 - 2.0) * log_z), 0.0)
    return p0, p1, p2


def threshold_bracket(row_max, count, alpha, row_mean=None):
    """Bracket [lo, hi] of τ for (α−1)-scaled rows with this max and number of entries.

    hi = max − n^(1−α) (all n entries equal); lo = max − 1 (the max alone reaches 1). With
    the row mean, lo is raised to mean − n^(1−α): t ↦ [t]_+^(1/(α−1)) is convex and
    increasing, so by Jensen Σ[x − τ]_+^c0 ≥ n·[mean − τ]_+^c0, which is ≥ 1 at
    τ = mean − n^(1−α); tight for near-uniform rows, where max − 1 is far off.
    ``count`` may overestimate the entries (a static row length over masked entries):
    hi then stays valid (f(hi) ≤ 0), only a little looser. Shared by the dense solver
    (rows shifted to max 0, static n) and the τ kernel (running max, sum and count).
    """
    n = jnp.maximum(count, 1.0)
    spread = jnp.exp((1.0 - alpha) * jnp.log(n))
    hi = row_max - spread
    lo = row_max - 1.0
    if row_mean is not None:
        lo = jnp.maximum(lo, row_mean - spread)
    return jnp.minimum(lo, hi), hi


def _bracket(n: int, alpha):
    """The bracket of rows shifted to max 0 whose static length n bounds the entry count."""
    return threshold_bracket(jnp.zeros_like(alpha), jnp.asarray(max(n, 1), alpha.dtype), alpha)


def _power_sums(alpha_static: float | None, alpha, x, tau):
    """(Σ z^c0, Σ z^c1, Σ z^c2) with z = [x − τ]_+ over the last axis, one pass each.

    Every sum is its own reduction of an elementwise expression of ``x``: XLA fuses each
    into a single read of ``x`` and never materialises ``z``.
    """
    z = jnp.maximum(x - tau, 0.0)
    # sign(z) ∈ {0, 1} counts the support; (a select on a comparison here makes XLA:CPU's
    # fused multi-output reduction an order of magnitude slower).
    on = jnp.sign(z)
    count = jnp.sum(on, axis=-1, keepdims=True)
    if alpha_static == 2.0:
        return jnp.sum(z, axis=-1, keepdims=True), count, None
    if alpha_static == 1.5:
        return jnp.sum(z * z, axis=-1, keepdims=True), jnp.sum(z, axis=-1, keepdims=True), count
    # z^c1 with c1 = c0 − 1 ≥ 0; the log is of a positive number, and `on` zeroes z = 0.
    zc = jnp.maximum(z, _TINY)
    c1 = 1.0 / (alpha - 1.0) - 1.0
    p1 = on * jnp.exp(c1 * jnp.log(zc))
    return (jnp.sum(p1 * z, axis=-1, keepdims=True), jnp.sum(p1, axis=-1, keepdims=True),
            jnp.sum(p1 / zc, axis=-1, keepdims=True))


def no_progress(tau, new_tau, newton):
    """Rows with no progress left at τ's precision: the step and f/f' both below its resolution."""
    ulps = 2.0**-22 if tau.dtype != jnp.float64 else 2.0**-50
    resolution = ulps * (jnp.abs(tau) + ulps)
    return (jnp.abs(new_tau - tau) <= resolution) & (jnp.abs(newton - tau) <= resolution)


def solver_step(alpha_static: float | None, alpha, tau, lo, hi, s0, s1, s2, *, use_halley: bool = True,
                support=None):
    """One safeguarded step of the τ solver, given the power sums at τ (one pass over the row).

    s0, s1, s2 = Σ z^c0, Σ z^c1, Σ z^c2 with z = [x − τ]_+ (s2 unused for α = 2). Shared by
    the dense solver here and the blockwise τ kernel, which accumulates the sums over key
    blocks. Returns (next τ, lo, hi, f(τ), Newton point, predicted, support) where
    ``predicted`` marks rows whose next τ is already at float32 precision.

    ``support`` (α = 1.5 and 2 only) is (count_above, count_below): the support sizes at
    the last evaluated τ with f > 0 and with f < 0 (None or mismatched sentinels while
    unknown). When they are equal no entry lies between those two points, so f is one
    polynomial piece around the root and its exact root (the Newton step for α = 2, the
    quadratic's root for α = 1.5) is taken and predicted.
    """
    f = s0 - 1.0
    if not use_halley:
        lo = jnp.where(f > 0, tau, lo)
        hi = jnp.where(f < 0, tau, hi)
        return 0.5 * (lo + hi), lo, hi, f, tau, jnp.zeros(f.shape, jnp.bool_), support
    c0 = 1.0 / (alpha - 1.0)
    # f is convex and decreasing (α ≤ 2), so the Newton point is a lower bound of the
    # root from either side; for α = 1.5, from the left, the root of the current
    # piece's quadratic Σ_S (z − δ)² = 1 is an upper bound (Σ_S (z − δ)² ≥ f + 1).
    df = -c0 * s1
    newton = tau - f / jnp.where(df < 0, df, -1.0)
    newton = jnp.where(df < 0, newton, tau)
    lo = jnp.maximum(jnp.where(f > 0, tau, lo), jnp.minimum(newton, hi))
    hi = jnp.where(f < 0, tau, hi)
    if alpha_static == 1.5:
        disc = s1 * s1 - s2 * f
        den = s1 + jnp.sqrt(jnp.maximum(disc, 0.0))
        quad = tau + f / jnp.where(den > 0, den, 1.0)
        hi = jnp.where((f > 0) & (disc >= 0) & (den > 0), jnp.clip(quad, lo, hi), hi)
    mid = 0.5 * (lo + hi)
    if alpha_static == 2.0:
        # f'' = 0 on every piece: the Newton step, exact on the current piece.
        cand = newton
    else:
        d2f = c0 * (c0 - 1.0) * s2
        denom = 2.0 * df * df - f * d2f
        ok = denom > 0
        cand = jnp.where(ok, tau - 2.0 * f * df / jnp.where(ok, denom, 1.0), jnp.inf)
        # A huge f'' (an entry just above τ when α > 1.5) shrinks Halley's step to
        # nothing; bisect instead of crawling.
        crawl = jnp.abs(cand - tau) < 1e-3 * jnp.abs(newton - tau)
        cand = jnp.where(crawl, jnp.inf, cand)
    exact = jnp.zeros(f.shape, jnp.bool_)
    if support is not None and alpha_static in (1.5, 2.0):
        count = s1 if alpha_static == 2.0 else s2
        above, below = support
        above = jnp.where(f > 0, count, above)
        below = jnp.where(f < 0, count, below)
        support = (above, below)
        exact = (above == below) & (count > 0)
        if alpha_static == 1.5:
            exact = exact & (disc >= 0) & (den > 0)
        cand = jnp.where(exact, quad if alpha_static == 1.5 else newton, cand)
    slack = 1e-6 * (hi - lo)
    inside = (cand >= lo - slack) & (cand <= hi + slack)
    new_tau = jnp.where(inside, jnp.clip(cand, lo, hi), mid)
    # Halley converges cubically, so from a small |f| its step lands below float32
    # resolution on the smooth part of f and needs no check pass. What the step cannot
    # see are entries between τ and the root (kinks): each adds up to δ^c0 to Σp, with
    # δ = |f / f'| ≤ |f| / c0, so callers measure Σp at a predicted τ again.
    bar = _PREDICT if f.dtype != jnp.float64 else 1e-9  # a Halley step from |f| ≤ bar lands below the dtype's resolution
    predicted = inside & (jnp.abs(f) <= bar) if alpha_static != 2.0 else jnp.zeros_like(inside)
    return new_tau, lo, hi, f, newton, predicted | (inside & exact), support


def _piece_root(alpha_static: float, top, masses, b):
    """Root t ≤ b of  top(t) + Σ_i w_i·[ξ_i − t]_+^c0 = 1  on the piece where every ξ_i ≥ t.

    ``top`` = (Σ (x − b)^c0, Σ (x − b)^c1, Σ (x − b)^c2) over the entries above ``b``; for
    c0 = 2 (α = 1.5) and c0 = 1 (α = 2) the equation is a polynomial in δ = b − t:
    α = 1.5: N δ² + 2 M δ + Q = 1;  α = 2: N δ + Q = 1. Returns NaN where there is no root
    (the caller checks that the root lies on its piece).
    """
    s0, s1, s2 = top
    if alpha_static == 2.0:
        n, q = s1, s0
        for w, xi in masses:
            n, q = n + w, q + w * (xi - b)
        return b - (1.0 - q) / jnp.where(n > 0, n, jnp.nan)
    n, m, q = s2, s1, s0
    for w, xi in masses:
        n, m, q = n + w, m + w * (xi - b), q + w * (xi - b) ** 2
    disc = m * m - n * (q - 1.0)
    delta = (jnp.sqrt(jnp.where(disc >= 0, disc, jnp.nan)) - m) / jnp.where(n > 0, n, jnp.nan)
    return b - delta


def _histogram_start(x, alpha, alpha_static, bins: int = _HISTOGRAM_BINS):
    """Start of the τ iteration from one histogram pass (AdaSplash-2's initialisation).

    x: [..., n] shifted, scaled rows (max 0). The power sums are evaluated at the
    ``bins + 1`` equally spaced edges of the bracket [−1, −n^(1−α)] in a single read of
    ``x``; f(edge) = Σ p − 1 is exact there, so the bin [a, b] holding the root is known.
    Inside it, the differences of the sums at a and b give the moments of the entries in
    the bin. For α = 1.5 and α = 2 they are replaced by two point masses with the same
    count, mean and variance, and the resulting piecewise polynomial is solved exactly.
    That is exact when the bin holds at most two entries, and otherwise close enough that
    one or two more Halley (Newton) steps reach float32 precision.
    Other α take the safeguarded Halley step from the bin end with the smaller |f|.

    Returns (τ, lo, hi, support, exact): the start, the bin as bracket, the support sizes
    at its ends (see `solver_step`) and the rows whose bin holds no entry, where the start
    is the root. (Where the bin holds one or two entries the model is exact too, but its
    moments come from differences of float32 sums, so those rows are still checked.)
    """
    lo0, hi0 = _bracket(x.shape[-1], alpha)
    steps = jnp.arange(bins + 1, dtype=x.dtype) / bins
    edges = lo0 + (hi0 - lo0) * steps  # [..., bins + 1]
    # For α = 2 the α = 1.5 sums (Σ z², Σ z, count) hold f and, with Σ z², the bin variance.
    polynomial = alpha_static in (1.5, 2.0)
    sums = _power_sums(1.5 if polynomial else alpha_static, alpha[..., None], x[..., None, :],
                       edges[..., None])
    sums = [s[..., 0] for s in sums]  # each [..., bins + 1]
    f = sums[1 if alpha_static == 2.0 else 0] - 1.0
    k = jnp.clip(jnp.sum(f >= 0, axis=-1, keepdims=True) - 1, 0, bins - 1)
    at = lambda s, i: jnp.take_along_axis(s, i, axis=-1)  # noqa: E731
    a, b = at(edges, k), at(edges, k + 1)
    sums_a, sums_b = [at(s, k) for s in sums], [at(s, k + 1) for s in sums]
    if polynomial:
        # Count, Σ (x − a) and Σ (x − a)² of the entries with a < x ≤ b, from both edges.
        h = b - a
        second_b, first_b, count_b = sums_b
        count = sums_a[2] - count_b
        first = sums_a[1] - (first_b + h * count_b)
        second = sums_a[0] - (second_b + 2.0 * h * first_b + h * h * count_b)
        safe = jnp.maximum(count, 1.0)
        mean = first / safe
        spread = jnp.sqrt(jnp.maximum(second / safe - mean * mean, 0.0))
        masses = [(0.5 * count, a + mean + spread), (0.5 * count, a + mean - spread)]
        top = (first_b, count_b, None) if alpha_static == 2.0 else sums_b
        # Walk the pieces from the top: above every mass, then adding one mass at a time.
        tau = jnp.full_like(a, jnp.nan)
        piece_hi = b
        for i in range(len(masses) + 1):
            piece_lo = jnp.maximum(masses[i][1], a) if i < len(masses) else a
            root = _piece_root(alpha_static, top, masses[:i], b)
            on_piece = (root >= piece_lo) & (root <= piece_hi) & jnp.isnan(tau)
            tau = jnp.where(on_piece, root, tau)
            piece_hi = jnp.minimum(piece_hi, piece_lo)
        tau = jnp.where(jnp.isnan(tau), 0.5 * (a + b), jnp.clip(tau, a, b))
        # With no entry inside the bin the model is exact: f is one piece on [a, b].
        support = (sums_a[2], count_b)
        return tau, a, b, support, count < 0.5
    # General α: Halley from the end of the bin whose f is closer to 0.
    from_a = solver_step(alpha_static, alpha, a, a, b, *sums_a)
    from_b = solver_step(alpha_static, alpha, b, a, b, *sums_b)
    closer_a = jnp.abs(from_a[3]) <= jnp.abs(from_b[3])
    tau = jnp.where(closer_a, from_a[0], from_b[0])
    lo = jnp.maximum(from_a[1], from_b[1])
    hi = jnp.minimum(from_a[2], from_b[2])
    return jnp.clip(tau, lo, hi), lo, hi, None, jnp.zeros(tau.shape, jnp.bool_)


def _threshold_iterative(x, alpha, alpha_static, n_iter, solver):
    """τ by a safeguarded root finder on shifted, scaled rows.

    x: [..., n] float32 with row max 0 (entries may be −inf). alpha: [..., 1].

    ``solver="bisect"`` is plain bisection. Otherwise each iteration evaluates the power
    sums at τ once (one read of x), shrinks the bracket, and proposes Halley's step
    (for α = 2, where f'' = 0 on every piece, the Newton step, exact on the current
    piece). A proposal outside the bracket is replaced by the midpoint, so the iteration
    never leaves the bracket. "halley" starts from the middle of the analytic bracket;
    "histogram" spends its first pass on `_histogram_start` instead.

    If n_iter is None, a row stops once |Σp − 1| < TOL or the step is below float32
    resolution of τ; the loop ends when every row has stopped (or at the cap).
    Otherwise exactly n_iter passes are made (the histogram pass counts as one).

    Returns (τ, mass): mass is Σp at τ where the solver knows it without another pass
    (measured at τ, or 1 where τ is a predicted or certified root), NaN elsewhere.
    """
    use_halley = solver != "bisect"
    polynomial = use_halley and alpha_static in (1.5, 2.0)
    if solver == "histogram":
        tau, lo, hi, support, done = _histogram_start(x, alpha, alpha_static)
        passes = 1
    else:
        lo, hi = _bracket(x.shape[-1], alpha)
        tau = 0.5 * (lo + hi)
        # Support sizes at the last points above / below the root: unknown yet.
        support = (jnp.full_like(tau, jnp.inf), jnp.full_like(tau, -1.0)) if polynomial else None
        done = jnp.zeros(tau.shape, jnp.bool_)
        passes = 0

    def propose(x, alpha, tau, lo, hi, support):
        return solver_step(alpha_static, alpha, tau, lo, hi, *_power_sums(alpha_static, alpha, x, tau),
                           use_halley=use_halley, support=support)

    if n_iter is not None:
        def fixed(_, state):
            tau, lo, hi, support = state
            new_tau, lo, hi, f, _, _, support = propose(x, alpha, tau, lo, hi, support)
            return jnp.where(f == 0, tau, new_tau), lo, hi, support

        tau, *_ = jax.lax.fori_loop(0, int(n_iter) - passes, fixed, (tau, lo, hi, support))
        return tau, jnp.full_like(tau, jnp.nan)

    cap = _MAX_ITER["halley" if use_halley else "bisect"]
    def iterate(x, alpha, i, state, go_on):
        """Passes over the rows of x while go_on(done) holds, up to the cap."""
        def body(carry):
            i, (tau, lo, hi, support, mass, done) = carry
            new_tau, lo, hi, f, newton, predicted, support = propose(x, alpha, tau, lo, hi, support)
            converged = jnp.abs(f) < (TOL if x.dtype != jnp.float64 else 1e-13)
            stalled = no_progress(tau, new_tau, newton)
            # A converged or stalled row keeps the τ its mass f + 1 was measured at. A
            # predicted one moves on: its mass is 1 for a static α = 2, whose predictions
            # are certified exact roots, and unknown (measured later) for a Halley step.
            stays = ~done & (converged | stalled)
            tau = jnp.where(done | stays, tau, new_tau)
            exact = predicted if alpha_static == 2.0 else jnp.zeros_like(predicted)
            mass = jnp.where(stays, f + 1.0, jnp.where(done, mass, jnp.where(exact, 1.0, jnp.nan)))
            return i + 1, (tau, lo, hi, support, mass, done | stays | predicted)

        return jax.lax.while_loop(lambda carry: (carry[0] < cap) & go_on(carry[1][-1]), body, (i, state))

    # Rows need different numbers of passes (at 2048 columns and α = 2: most 2–3, a few
    # 5), and every pass reads every row. So once at most 1/8 of the rows are left, they
    # are gathered and finished on their own (padded with copies of row 0 up to 1/8).
    shape, rows = tau.shape, math.prod(x.shape[:-1])
    x, alpha = x.reshape(rows, x.shape[-1]), alpha.reshape(rows, 1)
    state = (tau, lo, hi, support, jnp.where(done, 1.0, jnp.nan), done)
    state = jax.tree.map(lambda a: a.reshape(rows, 1), state)
    stragglers = rows // 8
    if stragglers < 8:
        _, state = iterate(x, alpha, 0, state, lambda done: ~jnp.all(done))
    else:
        i, state = iterate(x, alpha, 0, state, lambda done: jnp.sum(~done) > stragglers)
        (left,) = jnp.nonzero(~state[-1][:, 0], size=stragglers, fill_value=0)
        _, finished = iterate(x[left], alpha[left], i, jax.tree.map(lambda a: a[left], state),
                              lambda done: ~jnp.all(done))
        state = jax.tree.map(lambda a, b: a.at[left].set(b), state, finished)
    tau, _, _, _, mass, _ = state
    if alpha_static not in (1.5, 2.0):
        # Σp is c0 = 1/(α−1) times as sensitive to z as z is to rounding, and the final
        # p is computed in another fusion than the loop's z (a last-ulp difference): near
        # α = 1 the loop's mass is off by 1e-5. Only α = 1.5 and 2 (c0 ≤ 2) reuse it.
        mass = jnp.full_like(mass, jnp.nan)
    return tau.reshape(shape), mass.reshape(shape)


def _threshold_sort(x, alpha_static):
    """Exact τ for α = 2 (sparsemax) or α = 1.5 (entmax15) by sorting shifted, scaled rows."""
    n = x.shape[-1]
    xs = -jnp.sort(-x, axis=-1)  # descending
    k = jnp.arange(1, n + 1, dtype=x.dtype)
    cs = jnp.cumsum(xs, axis=-1)
    if alpha_static == 2.0:
        tau_k = (cs - 1.0) / k
    else:
        mean = cs / k
        mean_sq = jnp.cumsum(xs * xs, axis=-1) / k
        spread = k * (mean_sq - mean * mean)
        tau_k = mean - jnp.sqrt(jnp.maximum((1.0 - spread) / k, 0.0))
    support = jnp.sum(tau_k < xs, axis=-1, keepdims=True)
    support = jnp.maximum(support, 1)
    return jnp.take_along_axis(tau_k, support - 1, axis=-1)


def choose_solver(solver: str, alpha_static: float | None) -> str:
    if solver == "auto":
        # On the CPU (2048×2048 forward+backward, benchmarks/entmax_cpu.py) sorting is
        # 23–26× slower than Halley for α = 1.5 and 2, and the histogram start ~4× slower:
        # its pass evaluates 17 points, and arithmetic, not memory, bounds a pass there.
        # Not yet measured on GPU: revisit there.
        return "halley"
    if solver == "sort" and alpha_static not in (1.5, 2.0):
        raise ValueError(
            f"`solver='sort'` is exact only for alpha = 1.5 or alpha = 2, got alpha={alpha_static!r}"
        )
    if solver not in ("halley", "histogram", "bisect", "sort"):
        raise ValueError(
            f"`solver` must be one of 'auto', 'halley', 'histogram', 'bisect', 'sort', got {solver!r}"
        )
    return solver


def solve_threshold(scaled, alpha, alpha_static, solver, n_iter):
    """(τ, Σp at τ) per row of shifted, scaled rows; the mass is NaN where the solver does not know it."""
    if solver == "sort":
        # Sorting needs finite keys: entries ≤ −1 are never in the support, so clamp.
        tau = _threshold_sort(jnp.maximum(scaled, _FLOOR), alpha_static)
        return tau, jnp.full_like(tau, jnp.nan)
    return _threshold_iterative(scaled, alpha, alpha_static, n_iter, solver)
