"""entmax_attention against jax.nn.dot_product_attention, on the cases jax's own tests cover:
mask modes, bias, causal, sequence lengths, GQA, local windows, dtypes, rank 3.

At α = ALPHA_MIN entmax is within ~1e-2 of softmax, so outputs are compared with jax's
directly; at α = 1.5 the comparison is structural (the same keep pattern: a query with a
single allowed key returns that key's value, masked keys get exactly zero weight).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adasplash_jax import ALPHA_MIN, entmax_attention, entmax_attention_with_stats

B, T, S, N, K, H = 2, 12, 12, 4, 2, 16


def qkv(T=T, S=S, N=N, K=K, seed=0, dtype=jnp.float32, batch=True):
    r = np.random.default_rng(seed)
    lead = (B,) if batch else ()
    return (jnp.asarray(r.normal(size=lead + (T, N, H)), dtype), jnp.asarray(r.normal(size=lead + (S, K, H)), dtype),
            jnp.asarray(r.normal(size=lead + (S, K, H)), dtype))


def jax_reference(q, k, v, **kw):
    return jax.nn.dot_product_attention(q, k, v, implementation="xla", **kw)


def near_softmax(q, k, v, impl="xla", **kw):
    return entmax_attention(q, k, v, alpha=ALPHA_MIN, implementation=impl, **kw)


CASES = {
    "plain": {},
    "causal": dict(is_causal=True),
    "mask": dict(mask=np.random.default_rng(1).random((B, 1, T, S)) < 0.7),
    "bias": dict(bias=jnp.asarray(np.random.default_rng(2).normal(size=(1, N, T, S)), jnp.float32)),
    "lengths": dict(query_seq_lengths=jnp.array([12, 7]), key_value_seq_lengths=jnp.array([9, 12])),
    "window": dict(local_window_size=(3, 2)),
    "window_int": dict(local_window_size=2),
    "causal_window": dict(is_causal=True, local_window_size=(4, 0)),
    "scale": dict(scale=0.3),
    "array_scale": dict(scale=np.float32(0.3)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_near_softmax_equals_jax(name):
    q, k, v = qkv(seed=3)
    kw = dict(CASES[name])
    if "mask" in kw:
        kw["mask"] = jnp.asarray(kw["mask"])
        kw["mask"] = kw["mask"].at[..., 0].set(True)  # every query keeps a key: jax averages empty rows
    ours = near_softmax(q, k, v, **kw)
    theirs = jax_reference(q, k, v, **kw)
    if "query_seq_lengths" in kw:  # jax leaves padded queries unspecified; ours are zero rows
        keep = np.arange(T)[None, :] < np.asarray(kw["query_seq_lengths"])[:, None]
        ours, theirs = np.asarray(ours)[keep], np.asarray(theirs)[keep]
    np.testing.assert_allclose(ours, theirs, atol=2e-2)


def numpy_keep(name):
    """The keep pattern [B, T, S] of a case, written independently in numpy."""
    i, j = np.arange(T)[:, None], np.arange(S)[None, :]
    keep = np.ones((B, T, S), bool)
    kw = CASES[name]
    if kw.get("is_causal"):
        keep &= j <= i
    if "local_window_size" in kw:
        w = kw["local_window_size"]
        left, right = (w, w) if isinstance(w, int) else w
        keep &= (j >= i - left) & (j <= i + right)
    if "mask" in kw:
        keep &= np.asarray(kw["mask"])[:, 0]
    if "key_value_seq_lengths" in kw:
        keep &= j[None] < np.asarray(kw["key_value_seq_lengths"])[:, None, None]
        keep &= i[None] < np.asarray(kw["query_seq_lengths"])[:, None, None]
    return keep


@pytest.mark.parametrize("name", ["causal", "mask", "window", "causal_window", "lengths"])
def test_structure_at_alpha_15(name):
    from adasplash_jax.dense import dense_attention
    from adasplash_jax.inputs import check_attention_inputs

    q, k, v = qkv(seed=4)
    kw = dict(alpha=1.5, scale=None, is_causal=False, query_seq_lengths=None, key_value_seq_lengths=None,
              segment_ids=None, mask=None)
    kw.update({key: (jnp.asarray(val) if key == "mask" else val) for key, val in CASES[name].items()})
    _, probs = dense_attention(check_attention_inputs(q, k, v, **kw), return_probabilities=True)
    keep = numpy_keep(name)[:, None]
    probs = np.asarray(probs)
    np.testing.assert_array_equal(probs[~np.broadcast_to(keep, probs.shape)], 0.0)  # masked keys: exact zeros
    rows = keep.any(-1)
    np.testing.assert_allclose(probs.sum(-1)[np.broadcast_to(rows, probs.shape[:-1])], 1.0, atol=1e-5)
    assert np.any(probs[np.broadcast_to(keep, probs.shape)] == 0.0)  # and entmax adds zeros of its own


def test_gqa_and_dtypes_against_jax():
    for dtype, tol in ((jnp.float32, 2e-2), (jnp.bfloat16, 6e-2), (jnp.float16, 3e-2)):
        q, k, v = qkv(seed=5, dtype=dtype)
        ours = near_softmax(q, k, v, is_causal=True)
        assert ours.dtype == dtype
        theirs = jax_reference(q, k, v, is_causal=True)
        np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(theirs, np.float32), atol=tol)


@pytest.mark.slow
def test_rank_3_inputs_like_jax():
    q, k, v = qkv(seed=6, batch=False)
    ours = near_softmax(q, k, v, is_causal=True)
    assert ours.shape == q.shape
    np.testing.assert_allclose(ours, jax_reference(q, k, v, is_causal=True), atol=2e-2)


def test_positional_bias_and_mask_in_jax_order():
    q, k, v = qkv(seed=7)
    bias = jnp.asarray(np.random.default_rng(8).normal(size=(B, N, T, S)), jnp.float32)
    mask = jnp.asarray(np.tril(np.ones((T, S), bool)))[None, None]
    np.testing.assert_allclose(entmax_attention(q, k, v, bias, mask, alpha=1.5),
                               entmax_attention(q, k, v, bias=bias, mask=mask, alpha=1.5), atol=0)


@pytest.mark.slow
def test_bias_gradient_equals_jax_near_softmax():
    q, k, v = qkv(seed=9)
    bias = jnp.asarray(np.random.default_rng(10).normal(size=(1, N, T, S)), jnp.float32)
    ours = jax.grad(lambda b: jnp.sum(near_softmax(q, k, v, bias=b) ** 2))(bias)
    theirs = jax.grad(lambda b: jnp.sum(jax_reference(q, k, v, bias=b) ** 2))(bias)
    np.testing.assert_allclose(ours, theirs, rtol=1e-2, atol=2e-2)  # entmax at α = 1.001 is ~0.3% off softmax


def test_alibi_slopes_equal_an_explicit_bias():
    q, k, v = qkv(seed=11)
    slopes = jnp.array([0.5, 0.25, 0.125, 0.0625])
    bias = -slopes[None, :, None, None] * jnp.abs(jnp.arange(T)[:, None] - jnp.arange(S)[None, :])
    for alpha in (1.5, 2.0):
        np.testing.assert_allclose(entmax_attention(q, k, v, alpha=alpha, alibi_slopes=slopes),
                                   entmax_attention(q, k, v, bias, alpha=alpha), atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(local_window_size=(3, 1)), dict(local_window_size=2, is_causal=True)])
def test_window_pallas_equals_xla_values_and_gradients(kw):
    q, k, v = qkv(T=40, S=40, seed=12)

    def loss(impl, q, k, v):
        out = entmax_attention(q, k, v, alpha=1.5, implementation=impl, **kw)
        return jnp.sum(out * jnp.sin(jnp.arange(H, dtype=jnp.float32)))

    for argnum in range(3):
        got = jax.grad(lambda *a: loss("pallas", *a), argnums=argnum)(q, k, v)
        want = jax.grad(lambda *a: loss("xla", *a), argnums=argnum)(q, k, v)
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(entmax_attention(q, k, v, alpha=1.5, implementation="pallas", **kw),
                               entmax_attention(q, k, v, alpha=1.5, implementation="xla", **kw), atol=2e-5)


def test_none_takes_a_bias_as_xla_does():
    q, k, v = qkv(seed=13)
    bias = jnp.asarray(np.random.default_rng(13).normal(size=(1, N, T, S)), jnp.float32)
    # implementation=None never refuses what "xla" accepts
    np.testing.assert_allclose(entmax_attention(q, k, v, bias), entmax_attention(q, k, v, bias, implementation="xla"))


@pytest.mark.parametrize("bad", [dict(local_window_size=-1), dict(local_window_size=(1, 2, 3)),
                                 dict(local_window_size=1.5), dict(bias=jnp.zeros((3, N, T, S))),
                                 dict(bias=jnp.zeros((1, N, T, S), jnp.int32)), dict(alibi_slopes=jnp.ones(3)),
                                 dict(scale=jnp.ones(2))])
def test_bad_new_arguments_name_themselves(bad):
    q, k, v = qkv(seed=14)
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        entmax_attention(q, k, v, **bad)


@pytest.mark.slow
def test_window_tiles_outside_the_band_are_never_visited():
    from adasplash_jax import BlockSizes
    from adasplash_jax.inputs import check_attention_inputs
    from adasplash_jax.kernels.debug import tile_visits
    from adasplash_jax.masking import reachable_tiles

    L, block = 128, 16
    q, k, v = qkv(T=L, S=L, N=2, K=2, seed=15)
    inp = check_attention_inputs(q, k, v, alpha=1.5, mask=None, is_causal=False, scale=None, query_seq_lengths=None,
                                 key_value_seq_lengths=None, segment_ids=None, local_window_size=(8, 8))
    visits = tile_visits(inp, jnp.ones_like(q), block_sizes=BlockSizes(block, block, 4, 1))
    band = np.asarray(reachable_tiles(L // block, L // block, block, block, is_causal=False, window=(8, 8)))
    mask = np.asarray(visits["block_mask"])
    assert band.sum() == 3 * (L // block) - 2  # the tridiagonal band: linear in L
    assert not np.any(mask[..., ~band])  # no active tile outside the window
    np.testing.assert_array_equal(visits["forward"], mask.sum(-1))  # and each kernel visits the active ones only
    np.testing.assert_array_equal(visits["dq"], mask.sum(-1))
    np.testing.assert_array_equal(visits["dkdv"], mask.sum(-2))


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
def test_alibi_pallas_equals_xla_values_and_gradients(causal):
    q, k, v = qkv(T=40, S=40, N=4, K=2, seed=16)
    slopes = jnp.array([0.5, 0.25, 0.125, 0.0625])

    def loss(impl, q, k, v):
        out = entmax_attention(q, k, v, alpha=1.5, is_causal=causal, alibi_slopes=slopes, implementation=impl)
        return jnp.sum(out * jnp.cos(jnp.arange(H, dtype=jnp.float32)))

    for argnum in range(3):
        got = jax.grad(lambda *a: loss("pallas", *a), argnums=argnum)(q, k, v)
        want = jax.grad(lambda *a: loss("xla", *a), argnums=argnum)(q, k, v)
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    ours = entmax_attention(q, k, v, alpha=1.5, is_causal=causal, alibi_slopes=slopes, implementation="pallas")
    ref = entmax_attention(q, k, v, alpha=1.5, is_causal=causal, alibi_slopes=slopes, implementation="xla")
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    assert not np.allclose(ref, entmax_attention(q, k, v, alpha=1.5, is_causal=causal, implementation="xla"), atol=1e-3)


@pytest.mark.parametrize("kw", [dict(local_window_size=(64, 0), is_causal=True),
                                dict(alibi_slopes=jnp.array([0.5, 0.25, 0.125, 0.0625]))])
def test_new_kernel_variants_lower_for_cuda(kw):
    """The window and ALiBi variants of the four kernels lower to Triton for CUDA (no GPU needed)."""
    structs = [jax.ShapeDtypeStruct((1, 256, 4, 64), jnp.bfloat16)] * 3

    def loss(q, k, v):
        out = entmax_attention(q, k, v, alpha=1.5, implementation="pallas", interpret=False, **kw)
        return out.astype(jnp.float32).sum()

    exported = jax.export.export(
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*structs)
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 4  # τ, forward, dK/dV, dQ
