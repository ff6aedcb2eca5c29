"""Fenchel–Young entmax losses against hand-computed values, the PyPI `entmax.losses`
(PyTorch, float64), finite differences and their defining properties."""

import entmax as pypi
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from entmax import losses as pypi_losses
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from adasplash_jax import entmax, entmax_loss, sparsemax_loss


def rand(shape, scale=1.0, seed=0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


@pytest.mark.slow
def test_sparsemax_loss_hand_computed():
    # logits [1, 0], gold 1: p = sparsemax = [1, 0]; L = <θ, p − e_y> + (1 − Σp²)/2 = 1 + 0.
    np.testing.assert_allclose(float(sparsemax_loss(jnp.array([1.0, 0.0]), jnp.array(1))), 1.0, atol=1e-6)
    # logits [1, 0.5, 0], gold 0: p = [.75, .25, 0]; <θ, p − e_0> = −.25 + .125 = −.125;
    # (1 − (.5625 + .0625)) / 2 = .1875 → L = 0.0625.
    np.testing.assert_allclose(float(sparsemax_loss(jnp.array([1.0, 0.5, 0.0]), jnp.array(0))), 0.0625, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "ours, theirs, alpha",
    [
        (lambda x, y: sparsemax_loss(x, y), lambda x, y: pypi_losses.sparsemax_loss(x, y), 2.0),
        (lambda x, y: entmax_loss(x, y, 1.5), lambda x, y: pypi_losses.entmax15_loss(x, y), 1.5),
        (lambda x, y: entmax_loss(x, y, 1.25),
         lambda x, y: pypi_losses.entmax_bisect_loss(x, y, 1.25, 100), 1.25),
    ],
    ids=["sparsemax", "entmax15", "bisect-1.25"],
)
def test_matches_pypi_losses(ours, theirs, alpha):
    x = rand((32, 17), 2.0, seed=1)
    y = np.random.default_rng(2).integers(0, 17, size=32)
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    want = theirs(xt, torch.tensor(y))
    want.sum().backward()
    got, grad = jax.value_and_grad(lambda x: ours(x, jnp.asarray(y)).sum())(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x), jnp.asarray(y))), want.detach().numpy(), atol=2e-5)
    np.testing.assert_allclose(np.asarray(grad), xt.grad.numpy(), atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0])
def test_gradient_is_p_minus_onehot_and_matches_finite_differences(alpha):
    x = rand((4, 9), 1.5, seed=3)
    y = jnp.array([0, 3, 8, 3])
    grad = jax.grad(lambda x: entmax_loss(x, y, alpha).sum())(jnp.asarray(x))
    # p from the PyPI package, independent of the code under test
    t = torch.tensor(x.astype(np.float64))
    p = {1.5: pypi.entmax15, 2.0: pypi.sparsemax}.get(alpha, lambda t, dim: pypi.entmax_bisect(t, alpha, dim, 200))(t, dim=-1)
    np.testing.assert_allclose(np.asarray(grad), p.numpy() - np.eye(9)[np.asarray(y)], atol=2e-6)
    check_grads(lambda x: entmax_loss(x, y, alpha).sum(), (jnp.asarray(x),), order=1, modes=["rev"],
                eps=1e-3, atol=3e-3, rtol=3e-3)


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_zero_at_confident_correct_prediction(alpha):
    x = jnp.array([[20.0, 0.0, -3.0], [0.0, -1.0, 15.0]])
    np.testing.assert_allclose(np.asarray(entmax_loss(x, jnp.array([0, 2]), alpha)), 0.0, atol=1e-6)
    # and positive once the same logits are scored against another label
    assert (np.asarray(entmax_loss(x, jnp.array([1, 0]), alpha)) > 1.0).all()


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.01, 30.0), st.sampled_from([1.25, 1.5, 2.0]))
def test_property_nonnegative(seed, scale, alpha):
    x = rand((4, 6), scale, seed=seed)
    y = np.random.default_rng(seed).integers(0, 6, size=4)
    loss = np.asarray(entmax_loss(jnp.asarray(x), jnp.asarray(y), alpha))
    assert np.isfinite(loss).all() and (loss >= -1e-6).all()
    # zero exactly when the gold class is the one-hot prediction
    p = np.asarray(entmax(x, alpha))
    onehot = np.isclose(p[np.arange(4), y], 1.0)
    assert (loss[onehot] < 1e-5).all() and (loss[~onehot] > 0).all()


@pytest.mark.slow
def test_masked_logits_and_batch_shape():
    x = np.array([[[2.0, -np.inf, 0.5, 0.0]]], np.float32)  # [1, 1, 4]
    y = jnp.array([[2]])
    loss = entmax_loss(jnp.asarray(x), y, 1.5)
    assert loss.shape == (1, 1)
    ref = entmax_loss(jnp.array([[2.0, 0.5, 0.0]]), jnp.array([1]), 1.5)
    np.testing.assert_allclose(np.asarray(loss)[0], np.asarray(ref), rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda x: entmax_loss(x, y, 1.5).sum())(jnp.asarray(x))
    assert bool(jnp.isfinite(g).all()) and float(g[0, 0, 1]) == 0.0


@pytest.mark.slow
def test_jit_and_low_precision():
    x = jnp.asarray(rand((8, 10), 1.0, seed=4))
    y = jnp.arange(8)
    want = np.asarray(entmax_loss(x, y, 1.5))
    np.testing.assert_allclose(np.asarray(jax.jit(lambda x, y: entmax_loss(x, y, 1.5))(x, y)), want, atol=1e-6)
    g = jax.grad(lambda x: sparsemax_loss(x, y).astype(jnp.float32).sum())(x.astype(jnp.bfloat16))
    assert g.dtype == jnp.bfloat16


def test_errors():
    x, y = jnp.ones((3, 4)), jnp.zeros(3, jnp.int32)
    with pytest.raises(ValueError, match="alpha"):
        entmax_loss(x, y, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        entmax_loss(x, y, jnp.full((3,), 1.5))
    with pytest.raises(ValueError, match="`labels`"):
        entmax_loss(x, jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match="`labels`"):
        entmax_loss(x, jnp.zeros(3))
    with pytest.raises(ValueError, match="`logits`"):
        sparsemax_loss(jnp.ones((3, 4), jnp.int32), y)


def test_gold_class_with_minus_inf_logit_has_infinite_loss():
    logits = jnp.array([[2.0, -jnp.inf, 0.5], [2.0, -jnp.inf, 0.5]])
    loss = entmax_loss(logits, jnp.array([1, 0]), alpha=1.5)
    assert loss[0] == jnp.inf
    assert np.isfinite(float(loss[1]))


def test_out_of_range_labels_are_rejected():
    logits = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="labels"):
        entmax_loss(logits, jnp.array([0, 3]))
    with pytest.raises(ValueError, match="labels"):
        sparsemax_loss(logits, jnp.array([-1, 0]))
