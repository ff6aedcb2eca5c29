"""Dense (XLA) entmax attention against an independent float64 reference: numpy scores,
keep masks built entry by entry in Python, and the PyPI `entmax` package for the rows."""

import entmax as pypi
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

from adasplash_jax import entmax_attention


def rand(shape, seed, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def qkv(B=2, T=6, S=7, N=4, K=2, H=8, seed=0, scale=2.0):
    return rand((B, T, N, H), seed, scale), rand((B, S, K, H), seed + 1, scale), rand((B, S, K, H), seed + 2)


def reference(q, k, v, alpha=1.5, *, mask=None, is_causal=False, q_len=None, kv_len=None,
              q_seg=None, kv_seg=None, scale=None):
    """float64; K/V heads repeated explicitly; the keep mask written out entry by entry."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    scale = 1.0 / np.sqrt(H) if scale is None else scale
    user = np.ones((B, N, T, S), bool) if mask is None else np.broadcast_to(mask, (B, N, T, S))
    alphas = np.broadcast_to(np.asarray(alpha, np.float64), (N,))
    out = np.zeros((B, T, N, H))
    for b in range(B):
        for n in range(N):
            s = (q[b, :, n].astype(np.float64) @ k[b, :, n // G].T.astype(np.float64)) * scale
            keep = np.zeros((T, S), bool)
            for t in range(T):
                for j in range(S):
                    ok = bool(user[b, n, t, j])
                    ok &= not (is_causal and j > t)
                    ok &= q_len is None or t < q_len[b]
                    ok &= kv_len is None or j < kv_len[b]
                    ok &= q_seg is None or q_seg[b, t] == kv_seg[b, j]
                    keep[t, j] = ok
            rows = torch.tensor(np.where(keep, s, -1e9))
            a = float(alphas[n])
            if a == 1.5:
                p = pypi.entmax15(rows, dim=-1)
            elif a == 2.0:
                p = pypi.sparsemax(rows, dim=-1)
            else:
                p = pypi.entmax_bisect(rows, a, dim=-1, n_iter=200)
            p = np.where(keep.any(-1, keepdims=True), p.numpy(), 0.0)
            out[b, :, n] = p @ v[b, :, n // G].astype(np.float64)
    return out


def attn(q, k, v, **kw):
    return np.asarray(entmax_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), implementation="xla", **kw))


@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.25])
@pytest.mark.parametrize("N,K", [(4, 4), (4, 2), (4, 1)])
def test_plain_and_gqa(alpha, N, K):
    q, k, v = qkv(N=N, K=K)
    np.testing.assert_allclose(attn(q, k, v, alpha=alpha), reference(q, k, v, alpha), atol=2e-5)


@pytest.mark.slow
def test_gqa_equals_repeated_kv():
    q, k, v = qkv(N=6, K=2, seed=3)
    G = 3
    rep = lambda t: np.repeat(t, G, axis=2)  # noqa: E731  query head n uses kv head n // G
    for kw in ({}, {"is_causal": True}, {"alpha": jnp.array([1.2, 1.5, 2.0, 1.7, 1.5, 1.1])}):
        np.testing.assert_allclose(attn(q, k, v, **kw), attn(q, rep(k), rep(v), **kw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,S", [(6, 6), (4, 9), (9, 4)])
def test_causal_top_left(T, S):
    q, k, v = qkv(T=T, S=S, seed=5)
    np.testing.assert_allclose(attn(q, k, v, is_causal=True), reference(q, k, v, is_causal=True), atol=2e-5)


def test_causal_mask_agrees_with_jax_dot_product_attention():
    # Same keep pattern as jax.nn.dot_product_attention: a query attending to a single key
    # gives that key's value under any normaliser, so compare the first row (only key 0).
    q, k, v = qkv(T=5, S=8, N=2, K=2, seed=6)
    ours = attn(q, k, v, is_causal=True)
    theirs = np.asarray(jax.nn.dot_product_attention(q, k, v, is_causal=True))
    np.testing.assert_allclose(ours[:, 0], theirs[:, 0], atol=1e-6)
    np.testing.assert_allclose(ours[:, 0], v[:, 0], atol=1e-6)


def test_lengths():
    q, k, v = qkv(B=3, T=6, S=7, seed=7)
    ql, kl = np.array([6, 3, 1]), np.array([7, 2, 5])
    got = attn(q, k, v, query_seq_lengths=jnp.asarray(ql), key_value_seq_lengths=jnp.asarray(kl))
    want = reference(q, k, v, q_len=ql, kv_len=kl)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert (got[1, 3:] == 0).all() and (got[2, 1:] == 0).all()  # padded queries give zero rows
    got_c = attn(q, k, v, is_causal=True, key_value_seq_lengths=jnp.asarray(kl))
    np.testing.assert_allclose(got_c, reference(q, k, v, is_causal=True, kv_len=kl), atol=2e-5)


@pytest.mark.slow
def test_segment_ids():
    q, k, v = qkv(B=2, T=7, S=7, seed=8)
    seg = np.array([[0, 0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 3]])
    got = attn(q, k, v, segment_ids=jnp.asarray(seg), is_causal=True)
    np.testing.assert_allclose(got, reference(q, k, v, q_seg=seg, kv_seg=seg, is_causal=True), atol=2e-5)
    # a (query ids, kv ids) pair with q_len != kv_len; id 9 matches no key → zero row
    q2, k2, v2 = qkv(B=2, T=3, S=5, seed=9)
    qs, ks = np.array([[0, 1, 9], [2, 2, 2]]), np.array([[0, 0, 1, 1, 1], [2, 0, 2, 0, 2]])
    got2 = attn(q2, k2, v2, segment_ids=(jnp.asarray(qs), jnp.asarray(ks)))
    np.testing.assert_allclose(got2, reference(q2, k2, v2, q_seg=qs, kv_seg=ks), atol=2e-5)
    assert (got2[0, 2] == 0).all()


@pytest.mark.parametrize("mask_shape", [(6, 7), (2, 1, 6, 7), (2, 4, 6, 7), (1, 4, 1, 7)])
def test_user_mask_broadcasting(mask_shape):
    q, k, v = qkv(seed=10)
    mask = np.random.default_rng(11).random(mask_shape) > 0.4
    got = attn(q, k, v, mask=jnp.asarray(mask), is_causal=True)
    np.testing.assert_allclose(got, reference(q, k, v, mask=mask, is_causal=True), atol=2e-5)


def test_per_head_alpha():
    q, k, v = qkv(N=4, K=2, seed=12)
    alpha = np.array([1.5, 2.0, 1.25, 1.75], np.float32)
    got = attn(q, k, v, alpha=jnp.asarray(alpha), is_causal=True)
    np.testing.assert_allclose(got, reference(q, k, v, alpha, is_causal=True), atol=2e-5)
    # a scalar array α is broadcast to every head
    np.testing.assert_allclose(attn(q, k, v, alpha=jnp.float32(2.0)), reference(q, k, v, 2.0), atol=2e-5)


@pytest.mark.slow
def test_fully_masked_rows_zero_output_and_finite_gradients():
    q, k, v = qkv(seed=13)
    mask = np.ones((2, 4, 6, 7), bool)
    mask[:, :, 2] = False  # query 2 attends to nothing
    mask[1] = False  # whole batch row masked
    got = attn(q, k, v, mask=jnp.asarray(mask))
    assert (got[:, 2] == 0).all() and (got[1] == 0).all()

    def loss(q, k, v, a):
        out = entmax_attention(q, k, v, alpha=a, mask=jnp.asarray(mask), implementation="xla")
        return jnp.sum(out * jnp.arange(8.0))

    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.full((4,), 1.5))
    for g in grads:
        assert bool(jnp.isfinite(g).all())
    assert float(jnp.abs(grads[0][1]).max()) == 0.0 and float(jnp.abs(grads[0][:, 2]).max()) == 0.0


@pytest.mark.slow
def test_gradients_finite_differences():
    q, k, v = qkv(B=1, T=4, S=5, N=2, K=1, H=4, seed=14, scale=1.0)
    f = lambda q, k, v: entmax_attention(q, k, v, is_causal=True, implementation="xla")  # noqa: E731
    check_grads(f, (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)), order=1, modes=["rev"],
                eps=1e-3, atol=3e-3, rtol=3e-3)
    g = lambda a: entmax_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), alpha=a, implementation="xla")  # noqa: E731
    check_grads(g, (jnp.array([1.3, 1.6]),), order=1, modes=["rev"], eps=1e-3, atol=5e-3, rtol=5e-3)


@pytest.mark.slow
def test_jit_vmap_low_precision():
    q, k, v = qkv(seed=15)
    want = attn(q, k, v, is_causal=True)
    f = jax.jit(lambda q, k, v: entmax_attention(q, k, v, is_causal=True, implementation="xla"))
    np.testing.assert_allclose(np.asarray(f(q, k, v)), want, rtol=1e-5, atol=1e-5)
    per_example = jax.vmap(lambda q, k, v: f(q[None], k[None], v[None])[0])(q, k, v)
    np.testing.assert_allclose(np.asarray(per_example), want, rtol=1e-5, atol=1e-5)
    for dtype, tol in ((jnp.bfloat16, 5e-2), (jnp.float16, 5e-3)):
        out = entmax_attention(*(jnp.asarray(t, dtype) for t in (q, k, v)), is_causal=True, implementation="xla")
        assert out.dtype == dtype
        np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), want, atol=tol)


def test_scale_argument():
    q, k, v = qkv(seed=16)
    np.testing.assert_allclose(attn(q, k, v, scale=0.7), reference(q, k, v, scale=0.7), atol=2e-5)


# ------------------------------------------------------------------ errors


def _bad(match, *, q=None, k=None, v=None, **kw):
    q0, k0, v0 = qkv()
    with pytest.raises(ValueError, match=match):
        entmax_attention(q0 if q is None else q, k0 if k is None else k, v0 if v is None else v, **kw)


def test_bad_shapes_and_dtypes():
    q, k, v = qkv()
    _bad("`query`.*rank 4", q=q[0])
    _bad("`key`.*rank 4", k=k[..., 0])
    _bad("`value`.*rank 4", v=v[None])
    _bad("batch", k=np.concatenate([k, k]), v=np.concatenate([v, v]))
    _bad("head_dim", k=k[..., :4], v=v[..., :4])
    _bad("`value`", v=v[:, :3])
    _bad("multiple of `key`/`value` heads", q=q[:, :, :3])
    _bad("share a dtype", q=q.astype(np.float16))
    _bad("`query`.*floating", q=q.astype(np.int32))


def test_bad_arguments():
    _bad("`alpha`", alpha=1.0)
    _bad("`alpha`", alpha=2.5)
    _bad("`alpha`.*num_heads", alpha=jnp.full((3,), 1.5))
    _bad("`alpha`", alpha=jnp.array([1.5, 1.5, 0.9, 1.5]))
    _bad("`mask`.*broadcastable", mask=jnp.ones((6, 8), bool))
    _bad("`mask`.*broadcastable", mask=jnp.ones((3, 4, 6, 7), bool))
    _bad("`mask`.*boolean", mask=jnp.ones((6, 7)))
    _bad("`query_seq_lengths`", query_seq_lengths=jnp.array([1, 2, 3]))
    _bad("`query_seq_lengths`", query_seq_lengths=jnp.array([1.0, 2.0]))
    _bad("`key_value_seq_lengths`", key_value_seq_lengths=jnp.array([[1, 2]]))
    _bad("`segment_ids`", segment_ids=jnp.zeros((2, 5), jnp.int32))
    _bad("q_len == kv_len", segment_ids=jnp.zeros((2, 6), jnp.int32))
    _bad(r"`segment_ids\[1\]`", segment_ids=(jnp.zeros((2, 6), jnp.int32), jnp.zeros((2, 6), jnp.int32)))
    _bad("`segment_ids`", segment_ids=(jnp.zeros((2, 6), jnp.int32),))
    _bad("`scale`", scale=jnp.ones(2))  # an array scalar is fine, a vector is not
    _bad("`scale`", scale="0.5")
    _bad("`is_causal`", is_causal=1)
    _bad("`implementation`", implementation="cudnn")
