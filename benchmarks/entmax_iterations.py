"""Iterations of the τ solver to reach |Σp − 1| < tol: Halley–bisection vs plain bisection.

Rows are attention-like: s = scale · q·k/√d for Gaussian q, k (d = 64), one block of
``--rows`` query rows per setting. For k = 1, 2, ... the threshold is computed with exactly
k solver iterations (``entmax_threshold(..., n_iter=k)``, float32), and the unnormalised
mass Σ_j [(α−1)s_j − τ]_+^(1/(α−1)) of every row is evaluated in float64 with numpy.
A setting counts as reached at the first k for which every row is within the tolerance.

Columns, all counted in passes over the row after the max pass:

* bisect: plain bisection on the analytic bracket [max − 1, max − n^(1−α)];
* halley: Halley–bisection started at the middle of that bracket (``solver="halley"``,
  the default): one τ per pass;
* histogram: Halley–bisection whose first pass is a histogram of the row
  (``solver="histogram"``); that first pass counts as one pass, but it evaluates the
  power sums at 17 points, so in arithmetic it costs about as much as 17 passes. It
  pays where a pass is memory traffic (a GPU re-reading the scores, a kernel
  recomputing Q·Kᵀ), not where arithmetic bounds it (see benchmarks/entmax_cpu.py).

float32 floor: a float32 τ cannot do better than the float64 root rounded to float32; the
column ``fp32 floor`` is the worst row's |Σp − 1| at that rounded root. Where the floor
is above the tolerance, the target is max(tol, 2 × floor) for both solvers (marked *).

    python benchmarks/entmax_iterations.py                       # n = 256 ... 16384
    python benchmarks/entmax_iterations.py --lengths 256 1024 --rows 8   # quick
"""

from __future__ import annotations

import argparse
import functools


import jax
import numpy as np

from adasplash_jax.entmax import entmax_threshold


def mass_f64(s, tau, alpha):
    """Σ_j [(α−1)s_j − τ]_+^(1/(α−1)) per row, in float64."""
    z = np.maximum((alpha - 1.0) * s.astype(np.float64) - tau.astype(np.float64), 0.0)
    return np.sum(z ** (1.0 / (alpha - 1.0)), axis=-1)


def root_f64(s, alpha, iters=200):
    """τ per row by float64 bisection (independent of the code under test)."""
    x = (alpha - 1.0) * s.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lo, hi = m - 1.0, m
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        f = np.sum(np.maximum(x - mid, 0.0) ** (1.0 / (alpha - 1.0)), -1, keepdims=True) - 1.0
        lo = np.where(f > 0, mid, lo)
        hi = np.where(f > 0, hi, mid)
    return 0.5 * (lo + hi)


@functools.lru_cache(maxsize=None)
def solver_fn(alpha, solver, k):
    return jax.jit(lambda s: entmax_threshold(s, alpha, n_iter=k, solver=solver))


def iterations_to(s, alpha, solver, target, cap):
    for k in range(1, cap + 1):
        tau = np.asarray(solver_fn(alpha, solver, k)(s))
        err = np.max(np.abs(mass_f64(s, tau, alpha) - 1.0))
        if err < target:
            return k, err
    return None, err


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    ap.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0, 8.0])
    ap.add_argument("--alphas", type=float, nargs="+", default=[1.5])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--cap", type=int, default=60)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__}; {args.rows} attention-like rows per setting, d = {args.head_dim}, "
          f"tol = {args.tol:g}; iterations until every row has |sum p - 1| < target")
    print()
    print("| alpha | n | scale | fp32 floor | bisect | halley | histogram | bisect / halley | "
          "bisect / histogram |")
    print("|---|---|---|---|---|---|---|---|---|")
    ratios = {"halley": [], "histogram": []}
    totals = {"bisect": 0, "halley": 0, "histogram": 0}
    for alpha in args.alphas:
        for n in args.lengths:
            q = rng.standard_normal((args.rows, args.head_dim))
            kmat = rng.standard_normal((n, args.head_dim))
            base = (q @ kmat.T) / np.sqrt(args.head_dim)
            for scale in args.scales:
                s = (scale * base).astype(np.float32)
                tau64 = root_f64(s, alpha)
                floor = np.max(np.abs(mass_f64(s, tau64.astype(np.float32), alpha) - 1.0))
                target = args.tol if 2 * floor < args.tol else 2 * floor
                mark = "" if target == args.tol else "*"
                passes = {solver: iterations_to(s, alpha, solver, target, args.cap)[0]
                          for solver in ("bisect", "halley", "histogram")}
                cells = []
                for solver in ("halley", "histogram"):
                    kb, k = passes["bisect"], passes[solver]
                    if kb and k:
                        ratios[solver].append(kb / k)
                        cells.append(f"{kb / k:.1f}x")
                    else:
                        cells.append("-")
                for solver, k in passes.items():
                    totals[solver] += k or args.cap
                fmt = lambda k: str(k) if k else f"> {args.cap}"  # noqa: E731
                print(f"| {alpha:g} | {n} | {scale:g} | {floor:.1e}{mark} | {fmt(passes['bisect'])} | "
                      f"{fmt(passes['halley'])} | {fmt(passes['histogram'])} | {cells[0]} | {cells[1]} |")
    print()
    for solver, r in ratios.items():
        if r:
            print(f"bisect / {solver} passes: min {min(r):.1f}x, median {np.median(r):.1f}x, "
                  f"max {max(r):.1f}x over {len(r)} settings; totals {totals['bisect']} / "
                  f"{totals[solver]} = {totals['bisect'] / totals[solver]:.1f}x")


if __name__ == "__main__":
    main()
