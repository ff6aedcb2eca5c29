"""α-entmax: simplex/sparsity, solvers against each other and against the PyPI `entmax`
package (PyTorch, float64), gradients (x and α) against finite differences and PyTorch
autograd, masking, dtypes, JAX transformations and argument errors."""

import sys

import chex
import entmax as pypi
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from adasplash_jax import entmax, entmax15, entmax_threshold, sparsemax
from adasplash_jax.solver import solver_step

ALPHAS = [1.25, 1.5, 1.75, 2.0]


def rand(shape, scale=1.0, seed=0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def torch_entmax(x, alpha):
    """The PyPI package in float64: the exact solvers for 1.5 / 2, bisection otherwise."""
    t = torch.tensor(np.asarray(x, np.float64))
    if alpha == 1.5:
        return pypi.entmax15(t, dim=-1).numpy()
    if alpha == 2.0:
        return pypi.sparsemax(t, dim=-1).numpy()
    return pypi.entmax_bisect(t, alpha, dim=-1, n_iter=200).numpy()


# ------------------------------------------------------------------ values


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
def test_matches_pypi_entmax(alpha, scale):
    x = rand((16, 300), scale, seed=1)
    p = np.asarray(entmax(x, alpha))
    np.testing.assert_allclose(p, torch_entmax(x, alpha), atol=2e-6)


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [1.25, 2.0])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_simplex_on_any_axis(alpha, axis):
    x = rand((7, 9, 11), 2.0, seed=2)
    p = np.asarray(entmax(x, alpha, axis=axis))
    assert p.shape == x.shape
    assert (p >= 0).all()
    np.testing.assert_allclose(p.sum(axis=axis), 1.0, atol=1e-5)
    ref = np.moveaxis(torch_entmax(np.moveaxis(x, axis, -1), alpha), -1, axis)
    np.testing.assert_allclose(p, ref, atol=2e-6)


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_hand_computed_sparse_values(alpha):
    # A gap of more than 1/(α−1) between the top score and the rest gives a one-hot.
    chex.assert_trees_all_close(entmax(jnp.array([10.0, 0.0, -1.0]), alpha), jnp.array([1.0, 0.0, 0.0]))
    # Two tied top scores far above the rest split the mass evenly.
    chex.assert_trees_all_close(entmax(jnp.array([5.0, 5.0, -5.0]), alpha), jnp.array([0.5, 0.5, 0.0]), atol=1e-6)
    # sparsemax([1, 0.5, 0]): τ = 0.25, p = [0.75, 0.25, 0]; entmax15 of the same scores:
    # x = s/2 = [.5, .25, 0], all three in the support: Σ(x − τ)² = 1 ⇔ 3τ² − 1.5τ − 0.6875 = 0.
    if alpha == 2.0:
        want = np.array([0.75, 0.25, 0.0])
    else:
        tau = (1.5 - np.sqrt(1.5**2 + 12 * 0.6875)) / 6
        want = np.maximum(np.array([0.5, 0.25, 0.0]) - tau, 0) ** 2
        assert want[2] > 0  # all three in the support for α = 1.5
    np.testing.assert_allclose(np.asarray(entmax(jnp.array([1.0, 0.5, 0.0]), alpha)), want, atol=1e-6)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_sparsity_grows_with_alpha_and_scale(alpha):
    x = rand((32, 256), 1.0, seed=3)
    nnz = [int((np.asarray(entmax(s * x, alpha)) > 0).sum()) for s in (0.5, 2.0, 8.0)]
    assert nnz[0] > nnz[1] > nnz[2] >= 32  # at least the argmax of each row stays
    assert nnz[2] < 32 * 256 // 4


@pytest.mark.slow
def test_softmax_limit():
    x = rand((8, 50), 1.0, seed=4)
    soft = np.asarray(jax.nn.softmax(x, axis=-1))
    errs = [np.abs(np.asarray(entmax(x, a)) - soft).max() for a in (1.5, 1.1, 1.01, 1.001)]
    assert errs[-1] < 2e-3
    assert errs == sorted(errs, reverse=True)


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["halley", "histogram"])
@pytest.mark.parametrize("alpha", [1.5, 2.0])
@pytest.mark.parametrize("scale", [0.05, 1.0, 30.0])
def test_halley_equals_sort(alpha, scale, solver):
    x = rand((64, 1000), scale, seed=5)
    ph = np.asarray(entmax(x, alpha, solver=solver))
    ps = np.asarray(entmax(x, alpha, solver="sort"))
    np.testing.assert_allclose(ph, ps, atol=2e-6)
    th = np.asarray(entmax_threshold(x, alpha, solver=solver))
    ts = np.asarray(entmax_threshold(x, alpha, solver="sort"))
    np.testing.assert_allclose(th, ts, atol=1e-5 * max(1.0, scale), rtol=1e-5)


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from([1, 9, 40]),  # few shapes: each new one compiles
    st.floats(0.01, 50.0),
    st.sampled_from([1.5, 2.0]),
    st.integers(0, 2**31 - 1),
)
def test_property_halley_sort_bisect_agree(n, scale, alpha, seed):
    x = rand((3, n), scale, seed=seed)
    ph = np.asarray(entmax(x, alpha, solver="halley"))
    ps = np.asarray(entmax(x, alpha, solver="sort"))
    pb = np.asarray(entmax(x, alpha, solver="bisect"))
    pk = np.asarray(entmax(x, alpha, solver="histogram"))
    assert (ph >= 0).all() and np.allclose(ph.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(ph, ps, atol=2e-6)
    np.testing.assert_allclose(pk, ps, atol=2e-6)
    np.testing.assert_allclose(pb, ps, atol=2e-5)
    # The argmax is always in the support; entries below max − 1/(α−1) never are.
    assert (ph[np.arange(3), x.argmax(-1)] > 0).all()
    assert (ph[x < x.max(-1, keepdims=True) - 1.0 / (alpha - 1.0)] == 0).all()


@pytest.mark.slow
def test_threshold_gives_probabilities():
    x = rand((8, 40), 3.0, seed=6)
    for alpha in ALPHAS:
        tau = np.asarray(entmax_threshold(x, alpha), np.float64)
        assert tau.shape == (8, 1)
        p = np.maximum((alpha - 1) * x - tau, 0) ** (1 / (alpha - 1))
        np.testing.assert_allclose(p, torch_entmax(x, alpha), atol=1e-5)


@pytest.mark.parametrize("n_iter", [1, 2, 5])
def test_fixed_iterations_still_a_distribution(n_iter):
    x = rand((16, 500), 1.0, seed=7)
    p = np.asarray(entmax(x, 1.5, n_iter=n_iter))
    assert (p >= 0).all()
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    err = np.abs(p - torch_entmax(x, 1.5)).max()
    assert err < (1e-5 if n_iter == 5 else 0.5)


def test_bisect_needs_many_more_iterations_than_halley():
    x = rand((16, 2048), 2.0, seed=8)
    ref = torch_entmax(x, 1.5)
    err = lambda solver, k: np.abs(np.asarray(entmax(x, 1.5, n_iter=k, solver=solver)) - ref).max()  # noqa: E731
    assert err("halley", 4) < 1e-6
    assert err("bisect", 4) > 1e-3


def mass_f64(s, tau, alpha):
    """Σ_j [(α−1)s_j − τ]_+^(1/(α−1)) per row, in float64."""
    z = np.maximum((alpha - 1.0) * s.astype(np.float64) - np.asarray(tau, np.float64), 0.0)
    return np.sum(z ** (1.0 / (alpha - 1.0)), axis=-1)


def root_f64(s, alpha):
    """τ per row by float64 bisection, independent of the solvers under test."""
    x = (alpha - 1.0) * s.astype(np.float64)
    lo, hi = x.max(-1) - 1.0, x.max(-1)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        above = np.sum(np.maximum(x - mid[:, None], 0.0) ** (1.0 / (alpha - 1.0)), -1) > 1.0
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("n", [256, 2048])
@pytest.mark.parametrize("scale", [0.5, 2.0, 8.0])
def test_histogram_start_reaches_float32_in_two_passes(n, scale):
    # Attention-like rows (q·k/√d); the histogram pass plus one Halley pass reach the
    # float32 floor (|Σp − 1| of the float64 root rounded to float32), where the
    # bracket start still needs more.
    rng = np.random.default_rng(11)
    s = (scale * rng.standard_normal((16, 64)) @ rng.standard_normal((64, n)) / 8.0).astype(np.float32)
    floor = np.abs(mass_f64(s, root_f64(s, 1.5).astype(np.float32)[:, None], 1.5) - 1.0).max()
    target = max(1e-6, 2.0 * floor)
    err = {
        solver: np.abs(mass_f64(s, entmax_threshold(s, 1.5, n_iter=2, solver=solver), 1.5) - 1.0).max()
        for solver in ("histogram", "halley")
    }
    assert err["histogram"] < target, err
    assert err["halley"] > err["histogram"], err


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_equal_support_at_both_ends_gives_the_exact_root(alpha):
    # Shifted, scaled row [0, −0.3, −2]: both evaluated points below see the same two
    # entries, so f is one polynomial piece between them and the step lands on the root.
    x = jnp.array([[0.0, -0.3, -2.0]])
    a = jnp.full((1, 1), alpha)
    power_sums = sys.modules["adasplash_jax.solver"]._power_sums
    exact = (-0.3 - 1.0) / 2.0 if alpha == 2.0 else (-0.6 - np.sqrt(0.36 + 8 * 0.91)) / 4.0
    above_point, below_point = (-0.9, -0.5) if alpha == 2.0 else (-0.95, -0.6)
    state = (jnp.full((1, 1), -1.0), jnp.full((1, 1), -0.01))
    support = (jnp.full((1, 1), jnp.inf), jnp.full((1, 1), -1.0))
    tau = jnp.full((1, 1), below_point)
    *_, predicted, support = solver_step(alpha, a, tau, *state, *power_sums(alpha, a, x, tau), support=support)
    assert not bool(predicted[0, 0])  # only one side seen so far
    tau = jnp.full((1, 1), above_point)
    new_tau, _, _, f, _, predicted, support = solver_step(
        alpha, a, tau, *state, *power_sums(alpha, a, x, tau), support=support)
    assert float(f[0, 0]) > 0.05  # far from converged, yet the next τ is exact
    assert bool(predicted[0, 0])
    np.testing.assert_allclose(float(new_tau[0, 0]), exact, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["auto", "histogram", "sort"])
@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_many_rows_solved_in_row_blocks(alpha, solver):
    # 3·200 rows of 2048 exceed one CPU row block (2^20 elements), so the solver runs over
    # two blocks, the second padded; every row must match the PyPI package.
    x = rand((3, 200, 2048), 2.0, seed=12)
    p = np.asarray(entmax(x, alpha, solver=solver))
    np.testing.assert_allclose(p, torch_entmax(x, alpha), atol=2e-6)
    per_head = jnp.asarray([1.3, 1.5, 2.0])[:, None]  # array α goes through the blocks too
    q = np.asarray(entmax(x, per_head))
    for i, a in enumerate([1.3, 1.5, 2.0]):
        np.testing.assert_allclose(q[i], torch_entmax(x[i], a), atol=2e-6)


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["auto", "histogram", "bisect"])
@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0])
def test_slow_rows_among_fast_ones_are_finished_on_their_own(alpha, solver):
    # 120 rows: most are peaked (few passes), every 10th is nearly flat with some −inf
    # (more passes). Once at most 1/8 of the rows are left, those rows are gathered and
    # finished apart, with the fill indices repeating row 0; each row must still match.
    x = rand((120, 300), 6.0, seed=13)
    x[::10] = rand((12, 300), 0.05, seed=14)
    x[::10, ::7] = -np.inf
    p = np.asarray(entmax(x, alpha, solver=solver))
    np.testing.assert_allclose(p, torch_entmax(x, alpha), atol=2e-6)
    # τ itself (not renormalised) has float32 accuracy on every row.
    tau = entmax_threshold(x, alpha, solver=solver)
    assert np.abs(mass_f64(x, tau, alpha) - 1.0).max() < 2e-6


def test_forward_and_backward_export_for_cuda_without_row_blocks():
    # The row blocks are chosen when lowering: a CUDA export from this CPU machine gets the
    # wide solver (its two loops: all rows, then the slow ones), the CPU export one more
    # loop over the blocks.
    def loss(x):
        return jnp.sum(entmax(x, 2.0) * jnp.arange(x.shape[-1], dtype=x.dtype))

    spec = jax.ShapeDtypeStruct((1024, 2048), jnp.float32)
    whiles = {
        platform: jax.export.export(jax.jit(jax.grad(loss)), platforms=[platform])(spec)
        .mlir_module().count("stablehlo.while")
        for platform in ("cuda", "cpu")
    }
    assert whiles == {"cuda": 2, "cpu": 3}, whiles


@pytest.mark.slow
def test_halley_prediction_across_an_entry_is_remeasured():
    # α = 1.9 (c0 = 1/0.9): a shifted row [0, x1] whose entry x1 lies 1e-5 above the root.
    # From τ = x1 (x1 just outside the support, |f| ≈ 1.4e-5 < 1e-4) Halley predicts the
    # root of the one-entry model, τ' ≈ −1, which misses x1's share (≈ 3.6e-6 of Σp).
    # So the mass at a predicted τ is not assumed to be 1; it is measured again.
    alpha, c0 = 1.9, 1.0 / 0.9
    root = -((1.0 - 1e-5**c0) ** (1.0 / c0))  # (−root)^c0 + (x1 − root)^c0 = 1
    x1 = np.float32(root + 1e-5)
    row = jnp.asarray([[0.0, x1]], jnp.float32)
    a = jnp.full((1, 1), alpha)
    tau = jnp.full((1, 1), x1)
    power_sums = sys.modules["adasplash_jax.solver"]._power_sums
    new_tau, *_, predicted, _ = solver_step(alpha, a, tau, jnp.full((1, 1), -1.0), tau,
                                            *power_sums(alpha, a, row, tau))
    assert bool(predicted[0, 0])
    z = np.maximum(np.asarray(row, np.float64) - float(new_tau[0, 0]), 0.0)
    assert np.sum(z**c0) - 1.0 > 2e-6  # the predicted τ's mass is not 1 here
    p = np.asarray(entmax(np.asarray(row) / (alpha - 1.0), alpha))
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=2e-6)


@pytest.mark.slow
def test_array_alpha_2_halley_prediction_is_remeasured():
    # Clustered entries (found by review): an array α = 2 goes through Halley's general
    # step, whose prediction skipped entries near the root; assuming its mass was 1 left
    # Σp = 1 + 1.1e-5. The mass of a predicted τ is measured, so both α forms agree.
    row = np.array([[
        -1.2821072, -1.2484193, -1.2821312, -1.282115, -1.0308912, -0.86421263, -1.2821128, -0.86419773,
        -0.86422127, -1.2484181, -1.2484365, -1.2484261, -1.0309117, -1.2484272, -1.248437, -1.0309085,
        -0.86421448, -1.2821139, -1.2821246, -1.03091, -1.2484413, -1.2484349, -1.2821194, -1.0309017,
        -0.86420834, -1.2484229, -1.2821028, -0.86421853, -1.2821149, -1.2484363, -1.0308988, -1.2484438
    ]], np.float32)
    want = torch_entmax(row, 2.0)
    for alpha in (2.0, jnp.asarray([2.0])):
        p = np.asarray(entmax(row, alpha))
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=2e-6)
        np.testing.assert_allclose(p, want, atol=2e-6)


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["auto", "histogram", "bisect"])
def test_no_rows_and_alpha_near_one(solver):
    # Found by review: an input with no rows must not fail the solver's row reshape; and
    # near α = 1, where Σp is 1/(α−1) times as sensitive to rounding, the output must
    # still sum to one (the solver loop's mass is not reused there).
    assert np.asarray(entmax(np.zeros((0, 5), np.float32), 1.5, solver=solver)).shape == (0, 5)
    x = rand((64, 16), 3.0, seed=16)
    for alpha in (1.001, 1.01):
        np.testing.assert_allclose(np.asarray(entmax(x, alpha, solver=solver)).sum(-1), 1.0, atol=2e-6)


@pytest.mark.slow
def test_rows_stopped_by_the_cap_are_still_normalised(monkeypatch):
    # Σp at the final τ is usually known from the solver's last pass; rows that stop at
    # the iteration cap are measured once more, so the output still sums to one.
    module = sys.modules["adasplash_jax.solver"]
    monkeypatch.setitem(module._MAX_ITER, "halley", 1)
    jax.clear_caches()
    try:
        x = rand((6, 50), 1.0, seed=15)
        p = np.asarray(entmax(x, 1.5))
    finally:
        jax.clear_caches()
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=2e-6)
    assert np.abs(p - torch_entmax(x, 1.5)).max() > 1e-4  # one pass is far from the root


# ------------------------------------------------------------------ array α


@pytest.mark.slow
def test_array_alpha_per_row_matches_float_alpha():
    x = rand((4, 3, 60), 2.0, seed=9)
    alphas = np.array([1.2, 1.5, 1.8], np.float32)  # one per middle index
    p = np.asarray(entmax(x, jnp.asarray(alphas)[None, :], axis=-1))
    for i, a in enumerate(alphas):
        np.testing.assert_allclose(p[:, i], torch_entmax(x[:, i], float(a)), atol=2e-6)
    # broadcasting against a non-last axis: alpha has the shape of x without that axis
    q = np.asarray(entmax(x, jnp.full((4, 60), 1.5), axis=1))
    np.testing.assert_allclose(q, np.asarray(entmax(x, 1.5, axis=1)), atol=2e-6)


# ------------------------------------------------------------------ masking


@pytest.mark.slow
@pytest.mark.parametrize(
    "alpha,solver",
    [(a, s) for a in (1.25, 1.5, 2.0) for s in ("auto", "histogram", "bisect", "sort")
     if not (s == "sort" and a == 1.25)],
)
def test_minus_inf_is_exact_zero_and_fully_masked_row_is_zero(alpha, solver):
    x = rand((4, 30), 2.0, seed=10)
    x[0, :] = -np.inf
    x[1, 10:] = -np.inf
    x[2, ::2] = -np.inf
    p = np.asarray(entmax(x, alpha, solver=solver))
    assert np.isfinite(p).all()
    assert (p[0] == 0).all()
    assert (p[1, 10:] == 0).all() and (p[2, ::2] == 0).all()
    np.testing.assert_allclose(p[1:].sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(p[1, :10], torch_entmax(x[1:2, :10], alpha)[0], atol=2e-6)

    def loss(x, a):
        return jnp.sum(entmax(x, a, solver=solver) * jnp.arange(30.0))

    gx = np.asarray(jax.grad(loss)(jnp.asarray(x), alpha))
    assert np.isfinite(gx).all()
    assert (gx[0] == 0).all() and (gx[1, 10:] == 0).all()
    if solver == "auto":
        ga = np.asarray(jax.grad(loss, argnums=1)(jnp.asarray(x), jnp.full((4,), alpha)))
        assert np.isfinite(ga).all() and ga[0] == 0


def test_single_finite_entry_is_one_hot():
    x = np.full((2, 5), -np.inf, np.float32)
    x[0, 3] = -1e4
    x[1, 0] = 7.0
    np.testing.assert_array_equal(np.asarray(entmax(x, 1.5)), np.eye(5, dtype=np.float32)[[3, 0]])


# ------------------------------------------------------------------ gradients


def _torch_grads(x, alpha, g):
    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    at = torch.tensor(np.asarray(alpha, np.float64), requires_grad=True)
    p = pypi.entmax_bisect(xt, at, dim=-1, n_iter=200)
    p.backward(torch.tensor(np.asarray(g, np.float64)))
    return xt.grad.numpy(), at.grad.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("alpha", ALPHAS)
def test_gradients_match_pypi_autograd(alpha):
    x = rand((6, 40), 2.0, seed=11)
    g = rand((6, 40), 1.0, seed=12)
    a = np.full((6, 1), alpha, np.float32)  # PyPI takes α broadcastable against x
    want_x, want_a = _torch_grads(x, a, g)
    _, vjp = jax.vjp(lambda x, a: entmax(x, a), jnp.asarray(x), jnp.asarray(a[:, 0]))
    got_x, got_a = vjp(jnp.asarray(g))
    np.testing.assert_allclose(np.asarray(got_x), want_x, atol=2e-5)
    np.testing.assert_allclose(np.asarray(got_a), want_a[:, 0], atol=2e-4, rtol=1e-3)
    # a Python-float α goes through the static fast paths; same x gradient
    _, vjp_f = jax.vjp(lambda x: entmax(x, alpha), jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(vjp_f(jnp.asarray(g))[0]), want_x, atol=2e-5)


def _smooth_point(alpha, seed):
    """Scores whose support is stable under a ±1e-2 perturbation (no kink nearby)."""
    x = rand((3, 12), 2.0, seed=seed)
    tau = np.asarray(entmax_threshold(x, alpha))
    gap = np.abs((alpha - 1) * x - tau)
    x = np.where(gap < 0.05, x + np.sign((alpha - 1) * x - tau) * 0.2, x).astype(np.float32)
    return x


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.3])
def test_x_gradient_finite_differences(alpha):
    x = jnp.asarray(_smooth_point(alpha, 13))
    w = jnp.asarray(rand((3, 12), 1.0, seed=14))
    check_grads(lambda x: jnp.sum(w * entmax(x, alpha)), (x,), order=1, modes=["rev"], eps=1e-3, atol=2e-3, rtol=2e-3)


@pytest.mark.slow
def test_alpha_gradient_finite_differences():
    x = jnp.asarray(rand((3, 12), 2.0, seed=15))
    w = jnp.asarray(rand((3, 12), 1.0, seed=16))
    a = jnp.array([1.3, 1.5, 1.7])
    check_grads(lambda a: jnp.sum(w * entmax(x, a)), (a,), order=1, modes=["rev"], eps=1e-3, atol=5e-3, rtol=5e-3)


@pytest.mark.slow
def test_jacobian_rows_sum_to_zero_and_zero_off_support():
    x = jnp.asarray(rand((20,), 3.0, seed=17))
    for alpha in (1.25, 1.5, 2.0):
        jac = np.asarray(jax.jacrev(lambda x: entmax(x, alpha))(x))
        p = np.asarray(entmax(x, alpha))
        np.testing.assert_allclose(jac.sum(0), 0.0, atol=1e-6)
        np.testing.assert_allclose(jac, jac.T, atol=1e-6)
        assert (jac[p == 0] == 0).all()


# ------------------------------------------------------------------ dtypes


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.25])
def test_low_precision(dtype, alpha):
    x = jnp.asarray(rand((8, 128), 2.0, seed=18), dtype)
    p = entmax(x, alpha)
    assert p.dtype == dtype
    ref = torch_entmax(np.asarray(x.astype(jnp.float32)), alpha)
    np.testing.assert_allclose(np.asarray(p.astype(jnp.float32)), ref, atol=1e-2 if dtype == jnp.bfloat16 else 2e-3)
    g = jax.grad(lambda x: jnp.sum(entmax(x, alpha).astype(jnp.float32) * jnp.arange(128.0)))(x)
    assert g.dtype == dtype and bool(jnp.isfinite(g.astype(jnp.float32)).all())


# ------------------------------------------------------------------ transformations


@pytest.mark.slow
def test_jit_vmap_grad_checkpoint_compose():
    x = jnp.asarray(rand((5, 4, 33), 2.0, seed=19))
    w = jnp.asarray(rand((33,), 1.0, seed=20))
    f = lambda x: jnp.sum(entmax(x, 1.5) * w)  # noqa: E731
    eager = np.asarray(jax.vmap(jax.grad(f))(x[:, 0]))
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(jax.grad(f)))(x[:, 0])), eager, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.grad(jax.checkpoint(f))(x[0, 0])), eager[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.vmap(jax.vmap(lambda r: entmax(r, 2.0)))(x)),
                               np.asarray(entmax(x, 2.0)), rtol=1e-5, atol=1e-5)
    # vmap over α too (array α inside a vmapped function)
    alphas = jnp.array([1.2, 1.5, 1.9, 2.0, 1.01])
    pv = jax.vmap(lambda r, a: entmax(r, a))(x[:, 0], alphas)
    for i in range(5):
        np.testing.assert_allclose(np.asarray(pv[i]), torch_entmax(np.asarray(x[i, 0]), float(alphas[i])), atol=3e-6)


@pytest.mark.slow
def test_no_retrace_for_same_shapes():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(x, a):
        return entmax(x, a), entmax15(x), sparsemax(x)

    for seed in range(3):
        f(jnp.asarray(rand((4, 16), 1.0, seed=seed)), jnp.full((4,), 1.5))
    chex.clear_trace_counter()
    # eager calls compile the core once per shape/α/solver, then hit the cache
    from adasplash_jax.entmax import _entmax_last_jit

    before = _entmax_last_jit._cache_size()
    for seed in range(3):
        entmax(jnp.asarray(rand((5, 23), 1.0, seed=seed)), 1.75)
    assert _entmax_last_jit._cache_size() == before + 1


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("alpha", [1.0, 0.5, -2.0, 2.5, True])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        entmax(jnp.ones(3), alpha)


def test_bad_arguments():
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="`x`"):
        entmax(jnp.ones((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="`x`"):
        entmax(jnp.float32(1.0))
    with pytest.raises(ValueError, match="`axis`"):
        entmax(x, axis=2)
    with pytest.raises(ValueError, match="`n_iter`"):
        entmax(x, n_iter=0)
    with pytest.raises(ValueError, match="`solver`"):
        entmax(x, solver="newton")
    with pytest.raises(ValueError, match="solver='sort'"):
        entmax(x, 1.3, solver="sort")
    with pytest.raises(ValueError, match="`alpha`"):
        entmax(x, jnp.ones(4) * 1.5)
    with pytest.raises(ValueError, match="`alpha`"):
        entmax(x, jnp.ones(3, jnp.int32))


@pytest.mark.parametrize("alpha", [1.75, 1.95])
def test_entry_just_above_threshold(alpha):
    # For α > 1.5, f'' = c0·c1·Σ z^(c0−2) blows up when an entry sits just above τ; the
    # solver must still converge (not stall on a vanishing Halley step).
    x = rand((4, 64), 2.0, seed=21).astype(np.float64)
    t = torch.tensor(x)
    p = pypi.entmax_bisect(t, alpha, dim=-1, n_iter=200).numpy()
    # τ in original units from the largest entry: p_max^(α−1) = (α−1)x_max − τ
    tau = (alpha - 1) * x.max(-1) - p.max(-1) ** (alpha - 1)
    x[:, 0] = (tau + 1e-6) / (alpha - 1)  # lands in the support by a hair
    x = x.astype(np.float32)
    np.testing.assert_allclose(np.asarray(entmax(x, alpha)), torch_entmax(x, alpha), atol=2e-6)


@pytest.mark.parametrize("bad", [1.0, 0.5, 2.5])
def test_concrete_alpha_array_outside_range_is_rejected(bad):
    with pytest.raises(ValueError, match="alpha"):
        entmax(jnp.ones((2, 3)), jnp.array([1.5, bad]))
