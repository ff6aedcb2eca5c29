"""α-entmax: the sparse generalisation of softmax, as pure JAX functions.

For scores ``s`` (one row) and ``1 < α ≤ 2`` let ``x = (α − 1)·s``. Then

    p_j = [x_j − τ]_+ ^ (1/(α−1)),   Σ_j p_j = 1.

The threshold ``τ`` is found by a hybrid Halley–bisection solver (fixed bracket
``[max x − 1, max x − n^(1−α)]``) or, for α = 2 and α = 1.5, exactly by sorting.
The backward pass is closed form (``u = p^(2−α)`` on the support), written with
``jax.custom_vjp``; the gradient with respect to α is available as well, so α may
be learned (per head, per row, ...).

Conventions shared by every solver here:

* work happens on the last axis, in float32, on values shifted so that the row
  maximum is 0 and clamped at ``-2`` (entries below ``max − 1`` are never in the
  support, so the clamp changes nothing and keeps ``±inf`` out of the arithmetic);
* entries equal to ``-inf`` are "masked": they get exactly 0, and a row with no
  finite entry returns all zeros with zero gradient.
"""

from __future__ import annotations

import functools
import numbers
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Solver = Literal["auto", "halley", "bisect", "sort"]

# Shifted, (α−1)-scaled values are clamped here; any value ≤ −1 is outside the support.
_FLOOR = -2.0
# Iteration caps used when ``n_iter`` is None (the solver stops earlier once converged).
_MAX_ITER = {"halley": 30, "bisect": 60}
# Stop once |Σ p − 1| is below this (fp32 sums of long rows cannot do much better).
_TOL = 1e-6


# --------------------------------------------------------------------------- checks


def check_alpha(alpha, name: str = "alpha"):
    """Validates a Python-number α (1 < α ≤ 2). Arrays are checked only for dtype."""
    if isinstance(alpha, bool):
        raise ValueError(f"`{name}` must be a float in (1, 2], got a bool")
    if isinstance(alpha, numbers.Real):
        a = float(alpha)
        if not (a > 1.0 and a <= 2.0):
            raise ValueError(
                f"`{name}` must lie in (1, 2] (α → 1 is softmax, α = 2 is sparsemax), got {a}"
            )
        return a
    arr = jnp.asarray(alpha)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise ValueError(f"`{name}` must be a float or a floating array, got dtype {arr.dtype}")
    return arr


def _static_alpha(alpha) -> float | None:
    return float(alpha) if isinstance(alpha, float) else None


# ------------------------------------------------------------------ threshold solvers


def _powers(alpha_static: float | None, alpha, z):
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


def _bracket(x, alpha):
    """Initial bracket of τ for shifted rows (row max = 0): [−1, −n^(1−α)]."""
    n = jnp.sum(x > _FLOOR, axis=-1, keepdims=True).astype(jnp.float32)
    n = jnp.maximum(n, 1.0)
    lo = jnp.full_like(n, -1.0)
    hi = -jnp.exp((1.0 - alpha) * jnp.log(n))
    return lo, hi


def _threshold_iterative(x, alpha, alpha_static, n_iter, use_halley):
    """τ by hybrid Halley–bisection (or plain bisection) on shifted, scaled rows.

    x: [..., n] float32 with row max 0 and entries ≥ _FLOOR. alpha: [..., 1].
    If n_iter is None, iterate until |Σp − 1| < _TOL (capped), else exactly n_iter times.
    """
    c0 = 1.0 / (alpha - 1.0)
    c1 = c0 - 1.0
    lo, hi = _bracket(x, alpha)
    tau = 0.5 * (lo + hi)

    def step(state):
        tau, lo, hi, _ = state
        z = jnp.maximum(x - tau, 0.0)
        s0, s1, s2 = (jnp.sum(t, axis=-1, keepdims=True) for t in _powers(alpha_static, alpha, z))
        f = s0 - 1.0
        lo = jnp.where(f > 0, tau, lo)
        hi = jnp.where(f < 0, tau, hi)
        mid = 0.5 * (lo + hi)
        if use_halley:
            df = -c0 * s1
            d2f = c0 * c1 * s2
            denom = 2.0 * df * df - f * d2f
            ok = jnp.isfinite(denom) & (denom > 0)
            halley = tau - 2.0 * f * df / jnp.where(ok, denom, 1.0)
            newton = tau - f / jnp.where(df < 0, df, -1.0)
            cand = jnp.where(ok, halley, newton)
            slack = 1e-7 * (hi - lo)
            inside = (cand >= lo - slack) & (cand <= hi + slack) & jnp.isfinite(cand)
            new_tau = jnp.where(inside, cand, mid)
        else:
            new_tau = mid
        new_tau = jnp.where(f == 0, tau, new_tau)
        return new_tau, lo, hi, jnp.max(jnp.abs(f))

    if n_iter is not None:
        tau, lo, hi, _ = jax.lax.fori_loop(
            0, int(n_iter), lambda _, s: step(s), (tau, lo, hi, jnp.float32(jnp.inf))
        )
        return tau

    cap = _MAX_ITER["halley" if use_halley else "bisect"]

    def cond(carry):
        i, state = carry
        return (i < cap) & (state[3] > _TOL)

    def body(carry):
        i, state = carry
        return i + 1, step(state)

    _, (tau, *_rest) = jax.lax.while_loop(
        cond, body, (0, (tau, lo, hi, jnp.float32(jnp.inf)))
    )
    return tau


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


def _choose_solver(solver: str, alpha_static: float | None) -> str:
    if solver == "auto":
        # Sorting is exact, but on accelerators and long rows a few Halley passes are
        # cheaper than a sort; the iterative solver is the default everywhere.
        return "halley"
    if solver == "sort" and alpha_static not in (1.5, 2.0):
        raise ValueError(
            f"`solver='sort'` is exact only for alpha = 1.5 or alpha = 2, got alpha={alpha_static!r}"
        )
    if solver not in ("halley", "bisect", "sort"):
        raise ValueError(
            f"`solver` must be one of 'auto', 'halley', 'bisect', 'sort', got {solver!r}"
        )
    return solver


# ------------------------------------------------------------------- forward / backward


def _prepare(x, alpha):
    """Shifts rows to max 0, scales by (α − 1), clamps; returns (x_scaled, row_has_entries)."""
    x = x.astype(jnp.float32)
    finite = x > -jnp.inf
    has_any = jnp.any(finite, axis=-1, keepdims=True)
    row_max = jnp.max(jnp.where(finite, x, -jnp.inf), axis=-1, keepdims=True)
    row_max = jnp.where(has_any, row_max, 0.0)
    shifted = jnp.where(finite, x - row_max, -jnp.inf)
    scaled = jnp.maximum((alpha - 1.0) * shifted, _FLOOR)
    return scaled, shifted, finite, has_any


def _probabilities(x, alpha, alpha_static, solver, n_iter):
    """Forward on the last axis. Returns p (float32) and the shifted scores."""
    scaled, shifted, finite, has_any = _prepare(x, alpha)
    if solver == "sort":
        tau = _threshold_sort(scaled, alpha_static)
    else:
        tau = _threshold_iterative(scaled, alpha, alpha_static, n_iter, solver == "halley")
    z = jnp.where(finite, jnp.maximum(scaled - tau, 0.0), 0.0)
    p, _, _ = _powers(alpha_static, alpha, z)
    total = jnp.sum(p, axis=-1, keepdims=True)
    p = jnp.where(has_any, p / jnp.where(total > 0, total, 1.0), 0.0)
    return p, shifted


def _support_weights(p, alpha, alpha_static):
    """u = p^(2−α) on the support, 0 elsewhere."""
    pos = p > 0
    if alpha_static == 2.0:
        return pos.astype(p.dtype)
    if alpha_static == 1.5:
        return jnp.sqrt(p)
    log_p = jnp.log(jnp.where(pos, p, 1.0))
    return jnp.where(pos, jnp.exp((2.0 - alpha) * log_p), 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _entmax_last(x, alpha, alpha_static, solver, n_iter):
    p, _ = _probabilities(x, alpha, alpha_static, solver, n_iter)
    return p


def _entmax_last_fwd(x, alpha, alpha_static, solver, n_iter):
    p, shifted = _probabilities(x, alpha, alpha_static, solver, n_iter)
    return p, (p, shifted, alpha)


def _entmax_last_bwd(alpha_static, solver, n_iter, res, g):
    p, shifted, alpha = res
    g = g.astype(jnp.float32)
    u = _support_weights(p, alpha, alpha_static)
    u_sum = jnp.sum(u, axis=-1, keepdims=True)
    u_sum_safe = jnp.where(u_sum > 0, u_sum, 1.0)
    delta = jnp.sum(u * g, axis=-1, keepdims=True) / u_sum_safe
    dx = u * (g - delta)
    if alpha_static is not None:
        d_alpha = jnp.zeros_like(alpha)
    else:
        # p_j(α) = z_j^c0 with z_j = (α−1)s_j − τ(α), c0 = 1/(α−1); differentiating Σp = 1:
        #   dp_j/dα = c0·u_j·(s_j − τ') − c0·p_j·log p_j,  τ' = (Σ u s − Σ p log p) / Σ u.
        # Shift-invariant in s, so the row-max-shifted scores are used (finite on the support).
        pos = p > 0
        s = jnp.where(pos, shifted, 0.0)
        p_log_p = jnp.where(pos, p * jnp.log(jnp.where(pos, p, 1.0)), 0.0)
        tau_prime = (jnp.sum(u * s, axis=-1, keepdims=True) - jnp.sum(p_log_p, axis=-1, keepdims=True)) / u_sum_safe
        c0 = 1.0 / (alpha - 1.0)
        dp_dalpha = c0 * (u * (s - tau_prime) - p_log_p)
        d_alpha = jnp.sum(g * dp_dalpha, axis=-1, keepdims=True)
    return dx, d_alpha


_entmax_last.defvjp(_entmax_last_fwd, _entmax_last_bwd)


# ------------------------------------------------------------------------- public API


def _normalize_axis(axis: int, ndim: int) -> int:
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise ValueError(f"`axis` must be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"`axis` must be in [{-ndim}, {ndim}) for an input of rank {ndim}, got {axis}")
    return axis % ndim


def _validate(x, axis, n_iter, alpha, solver):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"`x` must be a floating array, got dtype {x.dtype}")
    if x.ndim == 0:
        raise ValueError("`x` must have at least one dimension, got a scalar")
    axis = _normalize_axis(axis, x.ndim)
    if n_iter is not None and (
        isinstance(n_iter, bool) or not isinstance(n_iter, (int, np.integer)) or n_iter < 1
    ):
        raise ValueError(f"`n_iter` must be a positive int or None, got {n_iter!r}")
    alpha = check_alpha(alpha)
    alpha_static = _static_alpha(alpha)
    solver = _choose_solver(solver, alpha_static)
    xm = jnp.moveaxis(x, axis, -1)
    row_shape = xm.shape[:-1]
    if alpha_static is not None:
        alpha_rows = jnp.full(row_shape + (1,), alpha_static, jnp.float32)
    else:
        alpha_arr = jnp.asarray(alpha, jnp.float32)
        reduced_shape = x.shape[:axis] + x.shape[axis + 1:]
        try:
            alpha_rows = jnp.broadcast_to(alpha_arr, reduced_shape)
        except ValueError:
            raise ValueError(
                f"`alpha` of shape {alpha_arr.shape} does not broadcast against the input shape "
                f"without axis {axis}, {reduced_shape}"
            ) from None
        alpha_rows = jnp.expand_dims(alpha_rows, -1)
    return x, xm, axis, alpha_rows, alpha_static, solver


def entmax(x, alpha=1.5, axis: int = -1, *, n_iter: int | None = None, solver: Solver = "auto"):
    """α-entmax along ``axis``: a sparse probability distribution (softmax at α → 1).

    Args:
      x: scores, any float dtype (computed in float32; the output has x's dtype).
        Entries equal to ``-inf`` get exactly 0; a row of only ``-inf`` gives zeros.
      alpha: a Python float in (1, 2] (1.5 = entmax15, 2 = sparsemax), or a float
        array broadcastable against ``x`` with ``axis`` removed (e.g. one α per head).
        Array α is differentiable, so it can be learned; its values must lie in (1, 2].
      axis: the axis that sums to one.
      n_iter: iterations of the threshold solver; None iterates until
        ``|Σp − 1| < 1e-6`` (float32 precision), capped.
      solver: "auto" (Halley–bisection), "halley", "bisect" (plain bisection, for
        comparison) or "sort" (exact; α = 1.5 or 2 given as Python floats only).
    """
    x, xm, axis, alpha_rows, alpha_static, solver = _validate(x, axis, n_iter, alpha, solver)
    p = _entmax_last(xm, alpha_rows, alpha_static, solver, n_iter)
    return jnp.moveaxis(p.astype(x.dtype), -1, axis)


def entmax15(x, axis: int = -1, *, solver: Solver = "auto"):
    """1.5-entmax: ``p = [x/2 − τ]_+²``."""
    return entmax(x, 1.5, axis, solver=solver)


def sparsemax(x, axis: int = -1, *, solver: Solver = "auto"):
    """Sparsemax (α = 2): the Euclidean projection of ``x`` onto the simplex."""
    return entmax(x, 2.0, axis, solver=solver)


def entmax_threshold(x, alpha=1.5, axis: int = -1, *, n_iter: int | None = None, solver: Solver = "auto"):
    """The threshold τ of α-entmax in the original units of ``x`` (not differentiable).

    ``p = [(α−1)·x − τ]_+^(1/(α−1))``; returned with ``axis`` kept as a size-1 dim;
    ``+inf`` for rows with no finite entry. Useful for inspection and as a kernel oracle.
    """
    x, xm, axis, alpha_rows, alpha_static, solver = _validate(x, axis, n_iter, alpha, solver)
    xm = xm.astype(jnp.float32)
    scaled, _, finite, has_any = _prepare(xm, alpha_rows)
    if solver == "sort":
        tau = _threshold_sort(scaled, alpha_static)
    else:
        tau = _threshold_iterative(scaled, alpha_rows, alpha_static, n_iter, solver == "halley")
    row_max = jnp.max(jnp.where(finite, xm, -jnp.inf), axis=-1, keepdims=True)
    tau = jnp.where(has_any, tau + (alpha_rows - 1.0) * jnp.where(has_any, row_max, 0.0), jnp.inf)
    return jax.lax.stop_gradient(jnp.moveaxis(tau, -1, axis))
