"""shard_attention: attention under shard_map over batch (and heads) equals the unsharded function."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from adasplash_jax import entmax_attention
from adasplash_jax.sharding import shard_attention


def mesh_of(shape, names):
    n = int(np.prod(shape))
    assert len(jax.devices()) >= n, "conftest provides 8 CPU devices"
    return Mesh(np.asarray(jax.devices()[:n]).reshape(shape), names)


def qkv(b=8, t=16, h=4, d=8, kv_heads=None):
    ks = jax.random.split(jax.random.key(0), 3)
    kvh = kv_heads or h
    return (jax.random.normal(ks[0], (b, t, h, d)), jax.random.normal(ks[1], (b, t, kvh, d)),
            jax.random.normal(ks[2], (b, t, kvh, d)))


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape, names, batch_axes, head_axis", [
    ((2, 4), ("data", "fsdp"), ("data", "fsdp"), None),
    ((2, 4), ("data", "heads"), ("data",), "heads"),
])
def test_matches_unsharded_forward_and_grad(mesh_shape, names, batch_axes, head_axis):
    mesh = mesh_of(mesh_shape, names)
    q, k, v = qkv()
    alpha = jnp.array([1.2, 1.5, 1.8, 2.0])  # one α per head: sliced per head shard
    lengths = jnp.array([16, 3, 9, 16, 1, 12, 7, 16])
    kw = dict(alpha=alpha, is_causal=True, key_value_seq_lengths=lengths)
    f = shard_attention(entmax_attention, mesh, batch_axes=batch_axes, head_axis=head_axis)
    ref = jax.jit(lambda q, k, v: entmax_attention(q, k, v, **kw))(q, k, v)
    out = jax.jit(lambda q, k, v, a: f(q, k, v, **{**kw, "alpha": a}))(q, k, v, alpha)
    np.testing.assert_allclose(out, ref, atol=1e-5)

    def loss(fn, q, k, v, a):
        return (fn(q, k, v, **{**kw, "alpha": a}) ** 2).sum()

    g_ref = jax.jit(jax.grad(lambda *x: loss(entmax_attention, *x), argnums=(0, 1, 2, 3)))(q, k, v, alpha)
    g = jax.jit(jax.grad(lambda *x: loss(f, *x), argnums=(0, 1, 2, 3)))(q, k, v, alpha)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.slow
def test_mask_scalar_alpha_gqa_and_fallback():
    mesh = mesh_of((4, 2), ("data", "fsdp"))
    f = shard_attention(entmax_attention, mesh)
    q, k, v = qkv(h=4, kv_heads=2)
    mask = jax.random.bernoulli(jax.random.key(1), 0.7, (8, 1, 16, 16))
    a = jnp.float32(1.5)
    ref = jax.jit(lambda a: entmax_attention(q, k, v, alpha=a, mask=mask))(a)
    np.testing.assert_allclose(jax.jit(lambda a: f(q, k, v, alpha=a, mask=mask))(a), ref, atol=1e-5)
    # a batch of 2 cannot be split 8 ways: computed unsplit, still correct
    q2, k2, v2 = (x[:2] for x in (q, k, v))
    out2 = jax.jit(lambda q, k, v: f(q, k, v, alpha=1.5))(q2, k2, v2)
    np.testing.assert_allclose(out2, jax.jit(
        lambda q, k, v: entmax_attention(q, k, v, alpha=1.5))(q2, k2, v2), atol=1e-5)


def test_one_device_mesh_returns_the_function():
    mesh = mesh_of((1, 1), ("data", "fsdp"))
    assert shard_attention(entmax_attention, mesh) is entmax_attention


@pytest.mark.slow
def test_pallas_kernel_under_shard_map():
    """The AdaSplash Pallas kernel (interpret mode on CPU) per batch shard."""
    mesh = mesh_of((2,), ("data",))
    q, k, v = qkv(b=2, t=32, h=2, d=16)
    f = shard_attention(lambda *a, **kw: entmax_attention(*a, implementation="pallas", **kw), mesh)
    out = jax.jit(lambda q, k, v: f(q, k, v, alpha=1.5, is_causal=True))(q, k, v)
    ref = entmax_attention(q, k, v, alpha=1.5, is_causal=True, implementation="xla")
    np.testing.assert_allclose(out, ref, atol=1e-4)


@pytest.mark.slow
def test_per_head_alpha_tuple_is_sliced_per_head_shard():
    mesh = mesh_of((2, 2), ("data", "heads"))
    f = shard_attention(entmax_attention, mesh, batch_axes=("data",), head_axis="heads")
    q, k, v = qkv()
    alpha = (1.2, 1.5, 1.8, 2.0)
    ref = entmax_attention(q, k, v, alpha=jnp.array(alpha), is_causal=True)
    out = jax.jit(lambda q, k, v: f(q, k, v, alpha=alpha, is_causal=True))(q, k, v)
    np.testing.assert_allclose(out, ref, atol=1e-5)
