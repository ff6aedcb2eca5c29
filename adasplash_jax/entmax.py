"""α-entmax: the sparse generalisation of softmax, as pure JAX functions.

For scores ``s`` (one row) and ``1 < α ≤ 2`` let ``x = (α − 1)·s``. Then

    p_j = [x_j − τ]_+ ^ (1/(α−1)),   Σ_j p_j = 1.

The threshold ``τ`` is found by a hybrid Halley–bisection solver (bracket
``[max x − 1, max x − n^(1−α)]``, tightened by the Newton lower bound at every
evaluation; Newton for α = 2), optionally started from a histogram of the row
(AdaSplash-2), or, for α = 2 and α = 1.5, exactly by sorting.
The backward pass is closed form (``u = p^(2−α)`` on the support), written with
``jax.custom_vjp``; the gradient with respect to α is available as well, so α may
be learned (per head, per row, ...).

Conventions shared by every solver here:

* work happens on the last axis, in float32, on values shifted so that the row
  maximum is 0; ``-inf`` entries stay ``-inf`` and contribute ``[−inf − τ]_+ = 0``
  (the sort solver clamps at ``-2`` instead: entries below ``max − 1`` are never in
  the support);
* each solver iteration is one read of the row (power sums at one τ; the histogram
  pass evaluates them at 17 points); on the CPU the passes run over blocks of rows
  that stay in cache (`_row_wise`);
* entries equal to ``-inf`` are "masked": they get exactly 0, and a row with no
  finite entry returns all zeros with zero gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from adasplash_jax.inputs import ALPHA_MIN, alpha_or_nan, check_alpha
from adasplash_jax.solver import Solver, choose_solver, powers, solve_threshold

__all__ = ["entmax", "entmax15", "sparsemax", "entmax_threshold", "check_alpha", "ALPHA_MIN"]


def _compute_dtype(x):
    """float64 for float64 input (with jax_enable_x64), float32 for every other float dtype."""
    return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


def _static_alpha(alpha) -> float | None:
    return float(alpha) if isinstance(alpha, float) else None


# ------------------------------------------------------------------------ row blocks

# On the CPU every solver pass is a read of the whole input; done over blocks of about
# 4 MiB of float32 rows, the passes of a block hit the cache instead of memory (at
# 2048×2048 the τ solve ~3× faster, forward+backward 15–60%; benchmarks/entmax_cpu.py).
# 4 MiB beat 2 MiB by 4–14% in forward+backward (α = 1.5 and 2) once slow rows are
# finished apart. GPUs want the opposite, one wide op.
_CPU_BLOCK_ELEMENTS = 1 << 20


def _in_row_blocks(fn, *arrays):
    """fn(*arrays) computed over blocks of rows (a sequential `lax.map`).

    Every array is [R, k] (k = the row length or 1) and fn is row-wise: row r of each
    output depends only on row r of the inputs. Rows are padded with zeros to a whole
    number of blocks; padded rows are dropped from the outputs.
    """
    rows, n = arrays[0].shape
    per_block = max(1, _CPU_BLOCK_ELEMENTS // max(n, 1))
    if rows <= per_block:
        return fn(*arrays)
    blocks = -(-rows // per_block)
    pad = blocks * per_block - rows
    blocked = [jnp.pad(a, ((0, pad), (0, 0))).reshape(blocks, per_block, a.shape[1]) for a in arrays]
    out = jax.lax.map(lambda args: fn(*args), blocked)
    return jax.tree.map(lambda o: o.reshape((blocks * per_block,) + o.shape[2:])[:rows], out)


def _row_wise(fn, *arrays):
    """fn(*arrays) for row-wise fn on [..., k] arrays: in row blocks on the CPU, whole elsewhere.

    The choice is made when lowering (`lax.platform_dependent`), so a program exported
    for CUDA from a CPU machine still gets the single wide computation.
    """
    lead = arrays[0].shape[:-1]
    flat = [a.reshape((-1, a.shape[-1])) for a in arrays]
    if flat[0].shape[0] == 0:
        out = fn(*flat)
    else:
        out = jax.lax.platform_dependent(
            *flat, cpu=lambda *a: _in_row_blocks(fn, *a), default=fn)
    return jax.tree.map(lambda o: o.reshape(lead + o.shape[1:]), out)


# ------------------------------------------------------------------- forward / backward


def _shift_scale(x, row_max, alpha):
    """(α − 1)·(x − row max): the values τ is solved on (−inf stays −inf)."""
    return (alpha - 1.0) * (x - row_max)


def _prepare(x, alpha):
    """Shifts rows to max 0 and scales by (α − 1).

    Returns (scaled, has_any, bad, row_max, alpha): ``scaled`` is −inf exactly where ``x``
    is −inf (fully masked rows are shifted by 0, so they stay −inf and never make NaN).
    ``bad`` marks rows that hold NaN or +inf, or whose α is NaN (out of range): they are
    solved as a harmless zero row with α = 1.5 and come out as NaN (the NaN policy: like
    ``jax.nn.softmax``, such a row is NaN, never mistaken for a masked row of zeros).
    """
    row_max = jnp.max(x, axis=-1, keepdims=True)
    bad = jnp.isnan(row_max) | (row_max == jnp.inf) | jnp.isnan(alpha)
    has_any = (row_max > -jnp.inf) & ~bad
    row_max = jnp.where(has_any, row_max, 0.0)
    alpha = jnp.where(bad, 1.5, alpha)
    scaled = jnp.where(bad, 0.0, _shift_scale(x, row_max, alpha))
    return scaled, has_any, bad, row_max, alpha


def _row_statistics(x, alpha, alpha_static, solver, n_iter):
    """Row max, τ and the normaliser 1/Σp of each row (row-wise, so it runs in row blocks)."""
    scaled, has_any, bad, row_max, alpha = _prepare(x, alpha)
    tau, mass = solve_threshold(scaled, alpha, alpha_static, solver, n_iter)

    def measure(mass):
        p, _, _ = powers(alpha_static, alpha, jnp.maximum(scaled - tau, 0.0))
        return jnp.where(jnp.isnan(mass), jnp.sum(p, axis=-1, keepdims=True), mass)

    # For sparsemax every row's mass is usually known from the solver's last pass. Rows
    # whose τ is a Halley prediction (most at α = 1.5), other α, rows that hit the cap,
    # fixed n_iter and the sort solver cost one more read.
    total = jax.lax.cond(jnp.any(jnp.isnan(mass)), measure, lambda m: m, mass)
    scale = jnp.where(has_any & (total > 0), 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
    return row_max, tau, jnp.where(bad, jnp.nan, scale)


def _probabilities(x, alpha, alpha_static, solver, n_iter):
    """Forward on the last axis. Returns p (float32) and the row max.

    The solver's passes run per row block (`_row_wise`); p itself is one elementwise
    pass over the whole input.
    """
    row_max, tau, scale = _row_thresholds(x, alpha, alpha_static, solver, n_iter)
    z = jnp.maximum(_shift_scale(x, row_max, alpha) - tau, 0.0)
    p, _, _ = powers(alpha_static, alpha, z)
    return p * scale, row_max


# Shifted scores below this are outside any support; clamping keeps (x − m)·dα finite
# where x = −inf (a −inf times a zero tangent would be NaN under second derivatives).
_SHIFT_FLOOR = -1e30


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _row_thresholds(x, alpha, alpha_static, solver, n_iter):
    """(row max m, τ, 1/Σp) of each row; τ is that of the shifted rows (α−1)(x − m).

    m carries no derivative (entmax is shift-invariant). τ's derivative follows from
    Σ_j z_j^c0 = 1 with z = (α−1)(x − m) − τ (jvp below); the normaliser's is 0 (Σp = 1).
    The solver itself is never differentiated.
    """
    stats = functools.partial(_row_statistics, alpha_static=alpha_static, solver=solver, n_iter=n_iter)
    return _row_wise(stats, x, alpha)


def _row_sum(t):
    return jnp.sum(t, axis=-1, keepdims=True)


def _shifted_powers(x, alpha, alpha_static, solver, n_iter):
    """The row statistics, x − m (clamped), z = (α−1)(x − m) − τ and (z^c0, z^c1), all
    differentiable (τ through its jvp): what both tangent rules are written with."""
    stats = _row_thresholds(x, alpha, alpha_static, solver, n_iter)
    row_max, tau, _ = stats
    shifted = jnp.maximum(x - row_max, _SHIFT_FLOOR)
    z = jnp.maximum((alpha - 1.0) * shifted - tau, 0.0)
    p0, p1, _ = powers(alpha_static, alpha, z)
    return stats, shifted, z, p0, p1


@_row_thresholds.defjvp
def _row_thresholds_jvp(alpha_static, solver, n_iter, primals, tangents):
    x, alpha = primals
    dx, d_alpha = tangents
    (row_max, tau, scale), shifted, z, p0, p1 = _shifted_powers(x, alpha, alpha_static, solver, n_iter)
    s1 = _row_sum(p1)
    w = p1 / jnp.where(s1 > 0, s1, 1.0)
    # c0·Σ z^c1·((α−1)dx + (x − m)dα − dτ) + Σ z^c0·log z·dc0 = 0, with dc0 = −dα/(α−1)².
    d_tau = (alpha - 1.0) * _row_sum(w * dx)
    if alpha_static is None:
        on = z > 0
        z_log_z = jnp.where(on, p0 * jnp.log(jnp.where(on, z, 1.0)), 0.0)
        d_tau = d_tau + d_alpha * (_row_sum(w * jnp.where(on, shifted, 0.0))
                                   - _row_sum(z_log_z) / ((alpha - 1.0) * jnp.where(s1 > 0, s1, 1.0)))
    return (row_max, tau, scale), (jnp.zeros_like(row_max), d_tau, jnp.zeros_like(scale))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _entmax_last(x, alpha, alpha_static, solver, n_iter):
    p, _ = _probabilities(x, alpha, alpha_static, solver, n_iter)
    return p


@_entmax_last.defjvp
def _entmax_last_jvp(alpha_static, solver, n_iter, primals, tangents):
    """dp = u ⊙ (dx − δ) + dα·∂p/∂α with u = p^(2−α) on the support, δ = Σu·dx / Σu.

    Linear in the tangents, so reverse mode comes from transposing it (residual: u, as
    the closed-form backward needs). The primal quantities are written through the
    differentiable τ of `_row_thresholds` and safe powers of z, so their own derivatives
    (jax.hessian, reverse-over-reverse) are finite: u = z^c1·(1/Σ)^(2−α), never √p at 0.
    """
    x, alpha = primals
    dx, d_alpha = tangents
    (_, _, scale), shifted, z, p0, p1 = _shifted_powers(x, alpha, alpha_static, solver, n_iter)
    p = p0 * scale
    if alpha_static == 2.0:
        u = p1
    else:  # p^(2−α) = z^c1 · scale^(2−α); bad rows (scale NaN) stay NaN
        safe_scale = jnp.where(scale > 0, scale, 1.0)
        u = p1 * jnp.where(scale > 0, jnp.exp((2.0 - alpha) * jnp.log(safe_scale)), scale)
    u_sum = _row_sum(u)
    u_sum_safe = jnp.where(u_sum > 0, u_sum, 1.0)
    dp = u * (dx - _row_sum(u * dx) / u_sum_safe)
    if alpha_static is not None:
        return p, dp
    # p_j(α) = z_j^c0, c0 = 1/(α−1): dp_j/dα = c0·(u_j(s_j − τ') − p_j log p_j) with
    # τ' = (Σus − Σ p log p)/Σu (the dQ kernel uses the contracted form, where τ' cancels).
    on = p > 0
    s = jnp.where(on, shifted, 0.0)
    p_log_p = jnp.where(on, p * jnp.log(jnp.where(on, p, 1.0)), 0.0)
    tau_prime = (_row_sum(u * s) - _row_sum(p_log_p)) / u_sum_safe
    dp = dp + d_alpha * (u * (s - tau_prime) - p_log_p) / (alpha - 1.0)
    return p, dp


# One compiled program per (shape, α, solver) in eager use; a plain nested call under jit.
_entmax_last_jit = jax.jit(_entmax_last, static_argnums=(2, 3, 4))


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
    solver = choose_solver(solver, alpha_static)
    xm = jnp.moveaxis(x, axis, -1)
    row_shape = xm.shape[:-1]
    if alpha_static is not None:
        alpha_rows = jnp.full(row_shape + (1,), alpha_static, _compute_dtype(x))
    else:
        alpha_arr = alpha_or_nan(alpha)
        reduced_shape = x.shape[:axis] + x.shape[axis + 1:]
        try:
            alpha_rows = jnp.broadcast_to(alpha_arr, reduced_shape)
        except ValueError:
            raise ValueError(
                f"`alpha` of shape {alpha_arr.shape} does not broadcast against the input shape "
                f"without axis {axis}, {reduced_shape}"
            ) from None
        alpha_rows = jnp.expand_dims(alpha_rows, -1).astype(_compute_dtype(x))
    return x, xm, axis, alpha_rows, alpha_static, solver


def entmax(x, alpha=1.5, axis: int = -1, *, n_iter: int | None = None, solver: Solver = "auto"):
    """α-entmax along ``axis``: a sparse probability distribution (softmax at α → 1).

    Args:
      x: scores, any float dtype (computed in float32, float64 for float64 input; the output has x's dtype).
        Entries equal to ``-inf`` get exactly 0; a row of only ``-inf`` gives zeros.
      alpha: a Python float in [1.001, 2] (1.5 = entmax15, 2 = sparsemax; see ALPHA_MIN), or a float
        array broadcastable against ``x`` with ``axis`` removed (e.g. one α per head).
        Array α is differentiable, so it can be learned; its values must lie in [1.001, 2]
        (checked when concrete; a traced α outside that range gives NaN).
      axis: the axis that sums to one.
      n_iter: iterations of the threshold solver; None iterates until
        ``|Σp − 1| < 1e-6`` (float32 precision), capped.
      solver: "auto" (Halley–bisection), "halley" (Halley–bisection from the middle of
        the analytic bracket), "histogram" (Halley–bisection whose first pass is a
        histogram of the row: 1–2 passes instead of 3–4, but that pass evaluates 17
        points, so it pays only where a pass costs memory traffic, not arithmetic),
        "bisect" (plain bisection, for comparison) or "sort" (exact; α = 1.5 or 2
        given as Python floats only).
    """
    x, xm, axis, alpha_rows, alpha_static, solver = _validate(x, axis, n_iter, alpha, solver)
    if x.size == 0:  # no rows, or rows of no entries: an empty result, like jax.nn.softmax
        return jnp.zeros_like(x)
    # float32 inside (float64 for float64 input): autodiff casts the tangents back.
    p = _entmax_last_jit(xm.astype(_compute_dtype(x)), alpha_rows, alpha_static, solver, n_iter)
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
    if x.size == 0:  # rows of no entries have no threshold: +inf, as for fully masked rows
        return jnp.full(x.shape[:axis] + (1,) + x.shape[axis + 1:], jnp.inf, _compute_dtype(x))
    tau = _threshold_jit(xm.astype(_compute_dtype(x)), alpha_rows, alpha_static, solver, n_iter)
    return jax.lax.stop_gradient(jnp.moveaxis(tau, -1, axis))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _threshold_jit(xm, alpha_rows, alpha_static, solver, n_iter):
    def rows(x, alpha):
        scaled, has_any, bad, row_max, safe_alpha = _prepare(x, alpha)
        tau, _ = solve_threshold(scaled, safe_alpha, alpha_static, solver, n_iter)
        tau = jnp.where(has_any, tau + (alpha - 1.0) * row_max, jnp.inf)
        return jnp.where(bad, jnp.nan, tau)

    return _row_wise(rows, xm, alpha_rows)
