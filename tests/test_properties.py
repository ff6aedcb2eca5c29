"""Property-based checks (hypothesis, bounded time) of entmax and entmax attention against a float64 oracle.

Classes covered: score magnitudes up to the float32 range, ties, constant rows, one finite
entry, NaN/inf (one policy: a row holding NaN or +inf is all NaN, like jax.nn.softmax),
α near 1 and 2, traced and per-row α, fully masked rows and batches, dtypes, odd shapes,
and the Pallas kernels (interpret mode) against the dense path on a smaller sweep.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adasplash_jax import ALPHA_MIN, BlockSizes, entmax, entmax_attention

pytestmark = pytest.mark.slow  # hypothesis sweeps, the Pallas one in interpret mode

SETTINGS = dict(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def oracle(x, alpha):
    """float64 α-entmax of each row by bisection on τ (60 halvings: exact to float64)."""
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    for idx in np.ndindex(*x.shape[:-1]):
        row = x[idx]
        finite = row > -np.inf
        if not finite.any():
            continue
        a = float(np.broadcast_to(alpha, x.shape[:-1])[idx]) if np.ndim(alpha) else float(alpha)
        xs = (a - 1.0) * (row[finite] - row[finite].max())
        c0 = 1.0 / (a - 1.0)
        lo, hi = -1.0, 0.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if np.sum(np.maximum(xs - mid, 0.0) ** c0) >= 1.0:
                lo = mid
            else:
                hi = mid
        p = np.maximum(xs - lo, 0.0) ** c0
        out[idx][finite] = p / p.sum()
    return out


def tolerance(alpha):
    """float32 bound: p = z^(1/(α−1)) amplifies z's rounding by 1/(α−1)."""
    return 4e-6 * max(1.0, 1.0 / (float(np.min(alpha)) - 1.0)) ** 0.75 + 2e-6


alphas = st.one_of(st.sampled_from([ALPHA_MIN, 1.01, 1.25, 1.5, 1.75, 1.999, 2.0]),
                   st.floats(ALPHA_MIN, 2.0))
shapes = st.tuples(st.integers(1, 4), st.integers(1, 70))


@st.composite
def rows(draw):
    b, n = draw(shapes)
    kind = draw(st.sampled_from(["normal", "ties", "constant", "one_finite", "masked", "clustered"]))
    scale = draw(st.sampled_from([1e-3, 0.1, 1.0, 10.0, 1e3, 1e6, 1e30]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    x = rng.normal(size=(b, n)) * scale
    if kind == "ties":
        x = np.round(x / scale * 2) * scale / 2  # many exactly equal entries
    elif kind == "constant":
        x = np.full((b, n), rng.normal() * scale)
    elif kind == "one_finite":
        x = np.full((b, n), -np.inf)
        x[:, rng.integers(n)] = rng.normal() * scale
    elif kind == "masked":
        x[rng.random((b, n)) < 0.5] = -np.inf
        x[0] = -np.inf  # a fully masked row
    elif kind == "clustered":
        x = scale * (1.0 + 1e-4 * rng.normal(size=(b, n)))
    return np.clip(x, -3e38, 3e38).astype(np.float32)


@settings(**SETTINGS)
@given(rows(), alphas)
def test_entmax_matches_float64_oracle(x, alpha):
    p = np.asarray(entmax(jnp.asarray(x), alpha))
    want = oracle(x, alpha)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p, want, atol=tolerance(alpha), rtol=0)
    has_any = (x > -np.inf).any(-1)
    np.testing.assert_allclose(p.sum(-1)[has_any], 1.0, atol=4e-6)
    np.testing.assert_array_equal(p[~has_any], 0.0)
    np.testing.assert_array_equal(p[x == -np.inf], 0.0)


@settings(**SETTINGS)
@given(rows(), st.lists(st.floats(ALPHA_MIN, 2.0), min_size=4, max_size=4))
def test_traced_per_row_alpha_matches_oracle(x, alpha_list):
    alpha = np.asarray(alpha_list[: x.shape[0]] + [1.5] * (x.shape[0] - len(alpha_list)), np.float32)
    p = np.asarray(jax.jit(lambda x, a: entmax(x, a))(jnp.asarray(x), jnp.asarray(alpha)))
    want = oracle(x, alpha.astype(np.float64))
    np.testing.assert_allclose(p, want, atol=tolerance(alpha), rtol=0)


@settings(**SETTINGS)
@given(rows(), alphas, st.sampled_from(["nan", "inf"]))
def test_nan_or_inf_in_a_row_gives_a_nan_row(x, alpha, bad):
    row = x.shape[0] - 1
    x = x.copy()
    x[row, x.shape[1] // 2] = np.nan if bad == "nan" else np.inf
    for a in (alpha, jnp.float32(alpha)):
        p = np.asarray(entmax(jnp.asarray(x), a))
        assert np.all(np.isnan(p[row]))
        assert not np.any(np.isnan(p[:row]))


@settings(**SETTINGS)
@given(st.floats(-10.0, 3.0).filter(lambda a: not (ALPHA_MIN <= a <= 2.0)))
def test_out_of_range_traced_alpha_is_nan_not_a_plausible_answer(alpha):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9)), jnp.float32)
    p = np.asarray(jax.jit(lambda x, a: entmax(x, a))(x, jnp.float32(alpha)))
    assert np.all(np.isnan(p))


@settings(**SETTINGS)
@given(rows(), alphas, st.sampled_from([jnp.bfloat16, jnp.float16, jnp.float32]))
def test_low_precision_inputs(x, alpha, dtype):
    xd = jnp.asarray(np.clip(x, -6e4, 6e4)).astype(dtype)  # float16 overflows above 65504
    p = entmax(xd, alpha)
    assert p.dtype == dtype
    want = oracle(np.asarray(xd.astype(jnp.float32)), alpha)
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(np.asarray(p.astype(jnp.float32)), want, atol=max(2 * eps, tolerance(alpha)))


@st.composite
def attention_case(draw):
    B = draw(st.integers(1, 2))
    T = draw(st.integers(1, 40))
    S = draw(st.integers(1, 40))
    K = draw(st.sampled_from([1, 2]))
    N = K * draw(st.sampled_from([1, 2]))
    H = draw(st.sampled_from([8, 16, 24]))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0, 700.0]))
    causal = draw(st.booleans())
    alpha = draw(st.sampled_from([1.25, 1.5, 2.0, "per-head"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    q = rng.normal(size=(B, T, N, H)).astype(np.float32) * np.sqrt(scale)
    k = rng.normal(size=(B, S, K, H)).astype(np.float32) * np.sqrt(scale)
    v = rng.normal(size=(B, S, K, H)).astype(np.float32)
    lengths = rng.integers(0, S + 1, size=(B,)).astype(np.int32)
    if alpha == "per-head":
        alpha = jnp.asarray(rng.uniform(1.1, 2.0, size=(N,)), jnp.float32)
    # The τ max pass with the Jensen sum and an anchored histogram grid, or (the sm_90 default)
    # without it, on an aligned grid.
    jensen_bound = draw(st.booleans())
    return q, k, v, dict(alpha=alpha, is_causal=causal, key_value_seq_lengths=lengths), jensen_bound


@settings(**{**SETTINGS, "max_examples": 12})
@given(attention_case())
def test_pallas_equals_xla(case):
    q, k, v, kw, jensen_bound = case
    block_sizes = dataclasses.replace(BlockSizes.for_head_dim(q.shape[-1]), jensen_bound=jensen_bound)
    ours = np.asarray(entmax_attention(q, k, v, implementation="pallas", block_sizes=block_sizes, **kw))
    ref = np.asarray(entmax_attention(q, k, v, implementation="xla", **kw))
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("jensen_bound", [True, False])
@pytest.mark.parametrize("scale", [1.0, 1e3, 1e5])
def test_pallas_values_and_gradients_at_extreme_scores(scale, jensen_bound):
    # |q|, |k| ≈ 700 with head dim 24: scores of order 1e7 (issue 11, item 1).
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.normal(size=(1, 24, 2, 24)) * np.sqrt(scale), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 24, 2, 24)) * np.sqrt(scale), jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, 24, 2, 24)), jnp.float32)
    alpha = jnp.array([1.5, 2.0])

    # (scores of 1e7: beyond an aligned histogram grid's origin, which then gives up its start)
    block_sizes = dataclasses.replace(BlockSizes.for_head_dim(24), jensen_bound=jensen_bound)

    def loss(impl, q, k, v, alpha):
        kw = dict(block_sizes=block_sizes) if impl == "pallas" else {}
        out = entmax_attention(q, k, v, alpha=alpha, scale=10 / np.sqrt(24), implementation=impl, **kw)
        return jnp.sum(out * jnp.cos(jnp.arange(24.0))[None, None, None, :])

    # Beyond scale 1 every row is one-hot and dq, dk are exactly 0 on the dense path: what the kernels
    # leave is the float32 rounding of terms that cancel (ds = u·(dp − δ), dp and δ dot products
    # reduced in different orders: the order depends on the CPU's vector width, AVX-512 or not), so
    # the tolerance also scales with the size of those terms, scale·|k|·|v| for dq (2e-7 of it
    # measured on AVX-512), scale·|q|·|v| for dk (4e-7).
    s, big = 10 / np.sqrt(24), lambda t: float(np.abs(np.asarray(t)).max())  # noqa: E731
    terms = [s * big(k) * big(v), s * big(q) * big(v), 1.0, big(v)]
    for argnum in range(4):
        got = jax.grad(lambda *a: loss("pallas", *a), argnums=argnum)(q, k, v, alpha)
        want = jax.grad(lambda *a: loss("xla", *a), argnums=argnum)(q, k, v, alpha)
        assert np.all(np.isfinite(np.asarray(got)))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4,
                                   atol=2e-4 * big(want) + 4e-6 * terms[argnum] + 1e-6)
    out = entmax_attention(q, k, v, alpha=alpha, scale=10 / np.sqrt(24), implementation="pallas",
                           block_sizes=block_sizes)
    ref = entmax_attention(q, k, v, alpha=alpha, scale=10 / np.sqrt(24), implementation="xla")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-4)
    assert not np.any(np.all(np.asarray(out) == 0.0, axis=-1))  # no all-zero rows
