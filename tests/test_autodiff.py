"""Forward mode, Hessians and reverse-over-reverse of entmax and the dense attention built on it,
checked against finite differences (float64 central differences of the float32 function
are too noisy, so the reference is the float64 function itself, with jax_enable_x64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adasplash_jax import entmax, entmax_attention

ALPHAS = [1.25, 1.5, 1.75, 2.0]


def rand(shape, seed, scale=1.0):
    return np.random.default_rng(seed).normal(size=shape) * scale


def central_difference(f, x, dx, h=1e-6):
    return (f(x + h * dx) - f(x - h * dx)) / (2 * h)


@pytest.mark.slow
@pytest.mark.parametrize("alpha", ALPHAS)
def test_jvp_and_linearize_equal_finite_differences(alpha, x64):
    x = jnp.asarray(rand((3, 7), 0, 2.0))  # float64: the finite differences are exact enough
    dx = jnp.asarray(rand((3, 7), 1))
    f = lambda x: entmax(x, alpha)  # noqa: E731
    _, t = jax.jvp(f, (x,), (dx,))
    np.testing.assert_allclose(t, central_difference(f, x, dx), atol=1e-6)
    _, lin = jax.linearize(f, x)
    np.testing.assert_allclose(lin(dx), t, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("alpha", ALPHAS)
def test_hessian_is_finite_and_equals_differences_of_the_gradient(alpha, x64):
    x = jnp.asarray(rand((6,), 2, 2.0))
    w = jnp.asarray(rand((6,), 3))
    f = lambda x: jnp.sum(entmax(x, alpha) * w)  # noqa: E731
    p = entmax(x, alpha)
    assert np.any(np.asarray(p) == 0), "the row must have entries off the support"
    h = np.asarray(jax.hessian(f)(x))
    assert np.all(np.isfinite(h))
    g = jax.grad(f)
    for i in range(6):
        e = jnp.zeros(6).at[i].set(1.0)
        np.testing.assert_allclose(h[:, i], central_difference(g, x, e), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [1.5, 1.75])
def test_reverse_over_reverse_and_alpha_derivatives(alpha, x64):
    x = jnp.asarray(rand((2, 5), 4, 2.0))
    w = jnp.asarray(rand((2, 5), 5))
    f = lambda x, a: jnp.sum(entmax(x, a) * w)  # noqa: E731
    a = jnp.full((2,), alpha)
    rr = jax.grad(lambda x: jnp.sum(jax.grad(f)(x, a) ** 2))(x)
    assert np.all(np.isfinite(np.asarray(rr)))
    # ∂/∂α and ∂²/∂α² against differences of the float64 function
    fa = lambda s: f(x, jnp.full((2,), s))  # noqa: E731
    np.testing.assert_allclose(jax.grad(fa)(alpha), central_difference(fa, alpha, 1.0, 1e-5), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(jax.grad(jax.grad(fa))(alpha),
                               central_difference(jax.grad(fa), alpha, 1.0, 1e-5), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_dense_attention_forward_mode():
    q, k, v = (jnp.asarray(rand((1, 6, 2, 8), s), jnp.float32) for s in (6, 7, 8))
    f = lambda q: entmax_attention(q, k, v, is_causal=True, implementation="xla")  # noqa: E731
    dq = jnp.asarray(rand(q.shape, 9), jnp.float32)
    _, t = jax.jvp(f, (q,), (dq,))
    vjp = jax.vjp(f, q)[1]
    # ⟨J dq, ct⟩ = ⟨dq, Jᵀ ct⟩: forward and reverse mode agree
    ct = jnp.asarray(rand(q.shape, 10), jnp.float32)
    np.testing.assert_allclose(jnp.vdot(t, ct), jnp.vdot(dq, vjp(ct)[0]), rtol=1e-4)


@pytest.mark.slow
def test_pallas_forward_mode_is_a_clear_error():
    q = jnp.asarray(rand((1, 16, 1, 16), 11), jnp.float32)
    with pytest.raises(Exception, match="xla"):
        jax.jvp(lambda q: entmax_attention(q, q, q, implementation="pallas"), (q,), (q,))


@pytest.mark.slow
def test_float64_computes_in_float64(x64):
    x = jnp.asarray(rand((2, 9), 12, 3.0))
    p = entmax(x, 1.5)
    assert p.dtype == jnp.float64
    assert abs(float(p.sum(-1)[0]) - 1.0) < 1e-12
    assert entmax(x.astype(jnp.float32), 1.5).dtype == jnp.float32
    q = jnp.asarray(rand((1, 5, 2, 4), 13), jnp.float32)
    for impl in ("xla", "pallas"):
        assert entmax_attention(q, q, q, implementation=impl).dtype == jnp.float32
    assert entmax_attention(q.astype(jnp.float64), q.astype(jnp.float64), q.astype(jnp.float64),
                            implementation="xla").dtype == jnp.float64
