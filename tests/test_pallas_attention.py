"""The Pallas kernels against the dense XLA path (their reference), in interpret mode on CPU,
plus CUDA cross-lowering of every kernel, proof that zero tiles are skipped, and GPU runs."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from adasplash_jax import BlockSizes, entmax_attention, entmax_attention_with_stats
from adasplash_jax.dense import dense_attention, dense_sparsity_stats
from adasplash_jax.inputs import check_attention_inputs
from adasplash_jax.kernels.config import make_config
from adasplash_jax.kernels.debug import tile_visits

SMALL = BlockSizes(block_q=16, block_k=16)
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2, jnp.float16: 5e-3}


def make_qkv(B, T, S, N, K, H, dtype=jnp.float32, scale=1.5, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = (jax.random.normal(kq, (B, T, N, H)) * scale).astype(dtype)
    k = (jax.random.normal(kk, (B, S, K, H)) * scale).astype(dtype)
    v = jax.random.normal(kv, (B, S, K, H)).astype(dtype)
    return q, k, v


def run(impl, q, k, v, **kw):
    if impl == "pallas":
        return entmax_attention(q, k, v, implementation="pallas", block_sizes=kw.pop("block_sizes", SMALL), **kw)
    kw.pop("block_sizes", None)
    return entmax_attention(q, k, v, implementation="xla", **kw)


def loss_and_grads(impl, q, k, v, **kw):
    """Output and (dq, dk, dv) of a weighted sum of the output, compiled in one jit."""
    weights = jnp.cos(jnp.arange(q.shape[-1], dtype=jnp.float32))

    def loss(q, k, v):
        out = run(impl, q, k, v, **dict(kw))
        return jnp.sum(out.astype(jnp.float32) * weights), out

    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, out), grads = grad_fn(q, k, v)
    return out, grads


def assert_close(actual, expected, dtype, what):
    actual = np.asarray(actual, np.float32)
    expected = np.asarray(expected, np.float32)
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    scale = max(float(np.abs(expected).max()), 1e-6)
    err = float(np.abs(actual - expected).max()) / scale
    assert err <= TOL[dtype], f"{what}: relative error {err:.2e} > {TOL[dtype]:.0e}"


CASES = {
    # name: (B, T, S, N, K, H, kwargs). Lengths are deliberately not multiples of the 16-wide tiles.
    "plain_unaligned": (2, 50, 50, 2, 2, 24, {}),
    "gqa_group_of_3_causal": (1, 33, 45, 3, 1, 16, dict(is_causal=True)),
    "gqa_causal_q_shorter": (2, 20, 70, 4, 2, 32, dict(is_causal=True)),
    "q_longer_than_kv_scale": (1, 64, 24, 2, 2, 16, dict(scale=0.7)),
    # A negative scale flips which key is each row's best (the kernels' row max is of q·kᵀ).
    "negative_scale_causal_alibi": (1, 40, 40, 2, 2, 16, dict(scale=-0.4, is_causal=True,
                                                              alibi_slopes=jnp.array([0.1, 0.3]))),
    "lengths": (2, 40, 48, 2, 1, 16, dict(query_seq_lengths=jnp.array([40, 17]),
                                            key_value_seq_lengths=jnp.array([9, 48]))),
    "segments_self_causal": (2, 48, 48, 2, 2, 16, dict(segment_ids=jnp.array([[0] * 10 + [1] * 30 + [2] * 8,
                                                                             [5] * 48]), is_causal=True)),
    "segments_pair": (1, 20, 36, 2, 2, 16, dict(segment_ids=(jnp.array([[0] * 12 + [1] * 8]),
                                                             jnp.array([[0] * 30 + [1] * 6])))),
    "sparsemax_causal": (1, 40, 40, 2, 2, 16, dict(alpha=2.0, is_causal=True)),
    "alpha_1_25": (1, 40, 40, 2, 2, 16, dict(alpha=1.25)),
    "head_dim_256": (1, 20, 20, 1, 1, 256, dict(is_causal=True)),
    # The query tile read from memory at every key tile (the default at d = 256 and sparsemax d ≤ 32).
    "reload_query_sparsemax_gqa_causal": (1, 40, 40, 2, 1, 32, dict(alpha=2.0, is_causal=True, block_sizes=BlockSizes(
        block_q=16, block_k=16, reload_query=True))),
    "reload_query_lengths": (2, 40, 48, 2, 2, 16, dict(key_value_seq_lengths=jnp.array([9, 48]),
                                                         block_sizes=BlockSizes(block_q=16, block_k=16,
                                                                                reload_query=True))),
    "head_dim_100": (1, 24, 24, 1, 1, 100, {}),
    "decode_one_query": (2, 1, 37, 2, 1, 16, dict(key_value_seq_lengths=jnp.array([37, 20]))),
    "key_padding_mask_left": (2, 30, 30, 2, 2, 16, dict(is_causal=True, mask=(jnp.arange(30) >= jnp.array(
        [[7], [0]]))[:, None, None, :])),
    "query_mask_with_segments": (1, 40, 40, 2, 1, 16, dict(mask=(jnp.arange(40) % 3 != 0)[None, None, :, None],
                                                            segment_ids=jnp.array([[0] * 25 + [1] * 15]))),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_dense_fp32(name):
    B, T, S, N, K, H, kw = CASES[name]
    q, k, v = make_qkv(B, T, S, N, K, H)
    out, grads = loss_and_grads("pallas", q, k, v, **kw)
    ref_out, ref_grads = loss_and_grads("xla", q, k, v, **kw)
    chex.assert_shape(out, (B, T, N, H))
    assert_close(out, ref_out, jnp.float32, "output")
    for what, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        chex.assert_equal_shape([g, r])
        assert_close(g, r, jnp.float32, what)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_matches_dense_half_precision(dtype):
    q, k, v = make_qkv(2, 40, 40, 4, 2, 32, dtype=dtype)
    out, grads = loss_and_grads("pallas", q, k, v, is_causal=True)
    # Reference: the dense path on the same (rounded) inputs, computed in float32.
    ref_out, ref_grads = loss_and_grads("xla", *(t.astype(jnp.float32) for t in (q, k, v)), is_causal=True)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_close(out, ref_out, dtype, "output")
    for what, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, r, dtype, what)


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.8])
def test_half_precision_row_max_folded_or_not_at_large_scores_and_empty_rows(alpha, fold):
    # bf16 kernels fold the row max into the fma's addend (BlockSizes.fold_row_max, the default but
    # where ptxas would spill) or subtract it per entry: scores of ~1e3 (m·(α−1)·scale ~ 1e2) match
    # the dense path either way, and a sequence with no keys at all (m MASKED) comes out zero. (On
    # the GPU the single-rounding fma would leave the rounding of MASKED·mult, ~1e21, for such rows
    # without their zero shift; interpret mode's multiply and add cancel exactly, so here this
    # checks the path, not that guard.)
    q, k, v = make_qkv(2, 40, 40, 2, 2, 32, dtype=jnp.bfloat16, scale=6.0)
    blocks = dataclasses.replace(SMALL, fold_row_max=fold)
    kw = dict(alpha=alpha, is_causal=True, key_value_seq_lengths=jnp.array([40, 0]))
    inp = check_attention_inputs(q, k, v, mask=None, scale=None, query_seq_lengths=None, segment_ids=None, **kw)
    assert make_config(inp, blocks, None).fold_row_max == fold
    out, grads = loss_and_grads("pallas", q, k, v, block_sizes=blocks, **kw)
    ref_out, ref_grads = loss_and_grads("xla", *(t.astype(jnp.float32) for t in (q, k, v)), **kw)
    np.testing.assert_array_equal(np.asarray(out[1], np.float32), 0.0)
    assert_close(out, ref_out, jnp.bfloat16, "output")
    for what, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, r, jnp.bfloat16, what)


def test_row_max_fold_follows_the_gpu():
    # Folded by default; kept as a subtraction only where folding spills on sm_80 (or an unknown
    # GPU), never for fp32 inputs.
    for_head_dim = BlockSizes.for_head_dim
    assert for_head_dim(64, 1.5, 80).fold_row_max and for_head_dim(128, 2.0, 80).fold_row_max
    assert not for_head_dim(32, 1.5, 80).fold_row_max and not for_head_dim(32, 2.0, None).fold_row_max
    assert for_head_dim(32, 2.0, 90).fold_row_max and for_head_dim(64, 2.0, None).fold_row_max
    q, k, v = make_qkv(1, 16, 16, 1, 1, 16)
    inp = check_attention_inputs(q, k, v, mask=None, scale=None, query_seq_lengths=None, segment_ids=None,
                                 key_value_seq_lengths=None, alpha=1.5, is_causal=False)
    assert not make_config(inp, SMALL, None).fold_row_max  # fp32


def assert_matches_dense_with(blocks, field, q, k, v, where="", **kw):
    """The output and (dq, dk, dv) with these block sizes equal the dense path's, and the kernels'
    config keeps ``blocks.<field>`` as set."""
    inp = check_attention_inputs(q, k, v, mask=None, scale=None, query_seq_lengths=None, segment_ids=None, **kw)
    assert getattr(make_config(inp, blocks, None), field) == getattr(blocks, field)
    out, grads = loss_and_grads("pallas", q, k, v, block_sizes=blocks, **kw)
    ref_out, ref_grads = loss_and_grads("xla", q, k, v, **kw)
    assert_close(out, ref_out, jnp.float32, "output" + where)
    for what, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, r, jnp.float32, what + where)


@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.8])
@pytest.mark.parametrize("mass_per_entry", [True, False])
def test_tau_mass_summed_per_entry_or_per_tile_matches_dense(alpha, mass_per_entry):
    # The τ solver's Σ z^c0 kept per entry across the key loop (BlockSizes.mass_per_entry, the sm_90
    # default up to d = 128) or reduced per tile: the same answer as the dense path, on causal rows
    # with a short sequence (boundary tiles) at a temperature where many rows are near one-hot.
    q, k, v = make_qkv(2, 48, 48, 2, 2, 16, scale=2.5, seed=3)
    assert_matches_dense_with(dataclasses.replace(SMALL, mass_per_entry=mass_per_entry), "mass_per_entry", q, k, v,
                              alpha=alpha, is_causal=True, key_value_seq_lengths=jnp.array([48, 21]))


def test_tau_mass_per_entry_follows_the_gpu():
    # Per entry on sm_90 and later up to d = 128; per tile where its accumulators spill (d = 256 on
    # sm_90, sm_80) and on an unknown GPU.
    for_head_dim = BlockSizes.for_head_dim
    assert all(for_head_dim(d, a, 90).mass_per_entry for d in (32, 64, 128) for a in (1.5, 2.0, 1.8, None))
    assert not for_head_dim(256, 1.5, 90).mass_per_entry
    assert not any(for_head_dim(d, 1.5, cc).mass_per_entry for d in (32, 64, 128) for cc in (80, None))
    assert not BlockSizes().mass_per_entry


@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.8])
@pytest.mark.parametrize("jensen_bound", [True, False])
def test_tau_with_or_without_the_jensen_sum_matches_dense(alpha, jensen_bound):
    # The τ max pass with the row sum for the Jensen bound, or without (BlockSizes.jensen_bound off,
    # the sm_90 default up to d = 128: the histogram's bracket alone): the same answer as the dense
    # path, on rows from near-uniform (a low temperature, where the Jensen bound is tight) to
    # near one-hot, with boundary tiles.
    for scale in (0.05, 2.5):
        q, k, v = make_qkv(2, 48, 48, 2, 2, 16, scale=scale, seed=5)
        assert_matches_dense_with(dataclasses.replace(SMALL, jensen_bound=jensen_bound), "jensen_bound", q, k, v,
                                  f" at scale {scale}", alpha=alpha, is_causal=True,
                                  key_value_seq_lengths=jnp.array([48, 29]))


def test_jensen_sum_follows_the_gpu():
    # Off up to d = 128 on sm_90 and later, and on sm_80 without a dense mask or bias; kept where the
    # τ kernel spills without it (d = 256 on sm_90, a dense input on sm_80), on an unknown GPU, and
    # always without the histogram start (the bound is then the solver's start).
    for_head_dim = BlockSizes.for_head_dim
    alphas = (1.5, 2.0, 1.8, None)
    assert not any(for_head_dim(d, a, cc, dense_inputs=dense).jensen_bound
                   for d in (32, 64, 128) for a in alphas for dense in (False, True) for cc in (90, 100))
    assert not any(for_head_dim(d, a, 80).jensen_bound for d in (32, 64, 128) for a in alphas)
    assert all(for_head_dim(d, a, 80, dense_inputs=True).jensen_bound for d in (32, 64, 128) for a in alphas)
    assert all(for_head_dim(256, a, cc).jensen_bound for a in alphas for cc in (80, 90))
    assert all(for_head_dim(d, 1.5, None).jensen_bound for d in (32, 64, 128, 256))
    assert BlockSizes().jensen_bound
    q, k, v = make_qkv(1, 16, 16, 1, 1, 16)
    inp = check_attention_inputs(q, k, v, mask=None, scale=None, query_seq_lengths=None, segment_ids=None,
                                 key_value_seq_lengths=None, alpha=1.5, is_causal=False)
    no_histogram = dataclasses.replace(SMALL, histogram_start=False, jensen_bound=False)
    assert make_config(inp, no_histogram, None).jensen_bound


@pytest.mark.slow
def test_per_head_alpha_matches_dense_including_alpha_gradient():
    q, k, v = make_qkv(2, 36, 36, 4, 2, 16)
    weights = jnp.sin(jnp.arange(16.0))

    def grads(impl):
        def loss(q, k, v, alpha):
            return jnp.sum(run(impl, q, k, v, alpha=alpha, is_causal=True) * weights)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, jnp.array([1.2, 1.5, 1.8, 2.0]))

    *got, got_alpha = grads("pallas")
    *want, want_alpha = grads("xla")
    for what, g, r in zip(("dq", "dk", "dv"), got, want):
        assert_close(g, r, jnp.float32, what)
    assert np.all(np.abs(np.asarray(want_alpha)) > 1e-3), "the reference α gradient should be non-trivial"
    np.testing.assert_allclose(got_alpha, want_alpha, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_rows_with_nothing_to_attend_are_zero_with_zero_grads():
    q, k, v = make_qkv(2, 24, 24, 2, 2, 16)
    lengths = jnp.array([0, 24])
    out, grads = loss_and_grads("pallas", q, k, v, key_value_seq_lengths=lengths)
    np.testing.assert_array_equal(out[0], 0.0)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
        np.testing.assert_array_equal(g[0], 0.0)
    ref_out, _ = loss_and_grads("xla", q, k, v, key_value_seq_lengths=lengths)
    assert_close(out, ref_out, jnp.float32, "output")


@pytest.mark.slow
@pytest.mark.parametrize("jensen_bound", [True, False])
@pytest.mark.parametrize("bad_value", [jnp.nan, jnp.inf])
def test_a_nan_query_row_spoils_only_its_own_output_and_dq_row(bad_value, jensen_bound):
    """The NaN policy through the τ kernel and the backward: the bad row's output and dQ row are NaN
    (the backward gives bad rows a NaN δ); the other rows of its query block keep their answer (a
    NaN in the τ kernel's per-tile mark reduction once emptied the whole block's mask), equal to the
    dense path's. A NaN query entry makes the row's scores NaN, an infinite one ±inf (and NaN where
    a key entry is 0); the τ kernel detects it through the Jensen row sum or, without it, the row max."""
    q, k, v = make_qkv(1, 24, 24, 2, 2, 16)
    q = q.at[0, 5, 1, 3].set(bad_value)
    blocks = dataclasses.replace(SMALL, jensen_bound=jensen_bound)
    out, (dq, _, _) = loss_and_grads("pallas", q, k, v, block_sizes=blocks)
    ref_out, (ref_dq, _, _) = loss_and_grads("xla", q, k, v)
    bad = np.zeros((1, 24, 2), bool)
    bad[0, 5, 1] = True
    out, dq = np.asarray(out), np.asarray(dq)
    assert np.all(np.isnan(out[bad])) and np.all(np.isnan(dq[bad]))
    assert_close(out[~bad], np.asarray(ref_out)[~bad], jnp.float32, "output of the other rows")
    assert_close(dq[~bad], np.asarray(ref_dq)[~bad], jnp.float32, "dq of the other rows")


def block_diagonal_qkv(B, L, N, H, block, strength=12.0):
    """Queries and keys whose position-block b points along direction b: each query's
    probability mass stays inside its own block, so the block mask is the diagonal."""
    directions = jnp.eye(H)[jnp.arange(L) // block % H]  # [L, H]
    noise = jax.random.normal(jax.random.key(1), (B, L, N, H)) * 0.1
    q = strength * directions[None, :, None, :] + noise
    k = strength * directions[None, :, None, :] + noise[:, ::-1]
    v = jax.random.normal(jax.random.key(2), (B, L, N, H))
    return q, k[:, :, :1], v[:, :, :1]  # one kv head shared by the N query heads (GQA)


@pytest.mark.slow
def test_skipping_is_real_at_high_sparsity():
    B, L, N, H, block = 1, 96, 2, 16, 16
    q, k, v = block_diagonal_qkv(B, L, N, H, block)

    @jax.jit
    def visits_of(q, k, v):
        inp = check_attention_inputs(q, k, v, alpha=1.5, mask=None, is_causal=False, scale=None,
                                     query_seq_lengths=None, key_value_seq_lengths=None, segment_ids=None)
        return tile_visits(inp, jnp.ones_like(q), block_sizes=SMALL)

    visits = visits_of(q, k, v)
    mask = np.asarray(visits["block_mask"])  # [B, N, nq, nk]
    nq = L // block
    # The construction makes the block mask exactly diagonal: 6 of 36 tiles per head.
    np.testing.assert_array_equal(mask, np.broadcast_to(np.eye(nq, dtype=mask.dtype), mask.shape))
    # The τ kernel's max pass visits every reachable tile (non-causal: all 6); each solver pass
    # visits the tiles marked before it (by the max pass, then by the pass before), here the
    # diagonal one.
    passes = np.asarray(visits["tau_passes"])
    np.testing.assert_array_equal(visits["tau"], nq)
    np.testing.assert_array_equal(visits["tau_solver"], passes * mask.sum(-1))
    # Every kernel visited exactly the active tiles, no more.
    np.testing.assert_array_equal(visits["forward"], mask.sum(-1))
    np.testing.assert_array_equal(visits["dq"], mask.sum(-1))
    np.testing.assert_array_equal(visits["dkdv"], mask.sum(-2).sum(1, keepdims=True))
    # ... and skipping lost nothing.
    out, grads = loss_and_grads("pallas", q, k, v)
    ref_out, ref_grads = loss_and_grads("xla", q, k, v)
    assert_close(out, ref_out, jnp.float32, "output")
    for what, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, r, jnp.float32, what)


@pytest.mark.slow
def test_sparsity_stats_match_dense_probabilities():
    q, k, v = make_qkv(2, 50, 50, 2, 1, 16, scale=3.0)
    out, stats = entmax_attention_with_stats(q, k, v, is_causal=True, implementation="pallas", block_sizes=SMALL)
    inp = check_attention_inputs(q, k, v, alpha=1.5, mask=None, is_causal=True, scale=None,
                                 query_seq_lengths=None, key_value_seq_lengths=None, segment_ids=None)
    _, probs = dense_attention(inp, return_probabilities=True)
    ref = dense_sparsity_stats(inp, probs, block_q=16, block_k=16)
    # Independent count of the non-zero fraction: numpy over the dense probabilities.
    p = np.asarray(probs)
    allowed = np.tril(np.ones((50, 50), bool))
    want = np.array([(p[:, n][:, allowed] > 0).mean() for n in range(2)])
    np.testing.assert_allclose(stats.nonzero_fraction, want, rtol=1e-6)
    np.testing.assert_allclose(stats.active_tile_fraction, ref.active_tile_fraction, rtol=1e-6)
    assert np.all(np.asarray(stats.active_tile_fraction) <= 1.0)


def test_jit_does_not_retrace():
    q, k, v = make_qkv(1, 32, 32, 2, 2, 16)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(q, k, v):
        return entmax_attention(q, k, v, implementation="pallas", block_sizes=SMALL, is_causal=True)

    a = f(q, k, v)
    b = f(q + 1.0, k, v)
    assert a.shape == b.shape


def test_bad_input_errors():
    q, k, v = make_qkv(1, 16, 16, 2, 2, 16)
    with pytest.raises(ValueError, match="mask"):
        entmax_attention(q, k, v, mask=jnp.ones((1, 3, 16, 16), bool), implementation="pallas")
    with pytest.raises(ValueError, match="bias"):
        entmax_attention(q, k, v, jnp.ones((2, 1, 16, 16)), implementation="pallas")
    big = jnp.zeros((1, 16, 1, 512))
    with pytest.raises(ValueError, match="head_dim"):
        entmax_attention(big, big, big, implementation="pallas")
    with pytest.raises(ValueError, match="block_q"):
        BlockSizes(block_q=24)
    with pytest.raises(ValueError, match="implementation"):
        entmax_attention(q, k, v, implementation="triton")
    with pytest.raises(ValueError, match="key"):
        entmax_attention(q, k[:, :, :, :8], v, implementation="pallas")


# ------------------------------------------------------------------ CUDA cross-lowering


def export_for_cuda(f, *structs):
    return jax.export.export(
        jax.jit(f),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*structs)


@pytest.mark.parametrize("L,H,causal,heads", [(1024, 64, True, (4, 4)), (4096, 64, False, (4, 2)),
                                               (700, 128, True, (6, 2)), (700, 64, False, (2, 2)),
                                               (300, 256, True, (2, 2))])
def test_kernels_lower_for_cuda(L, H, causal, heads):
    N, K = heads
    structs = [jax.ShapeDtypeStruct((2, L, n, H), jnp.bfloat16) for n in (N, K, K)]
    forward = functools.partial(entmax_attention, is_causal=causal, implementation="pallas", interpret=False)
    exported = export_for_cuda(forward, *structs)
    # τ kernel + forward kernel.
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 2

    def loss(q, k, v):
        return forward(q, k, v).astype(jnp.float32).sum()

    exported = export_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), *structs)
    # τ, forward (with Õ), dK/dV and dQ kernels.
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 4


@pytest.mark.parametrize("alpha", [1.5, 1.8])
def test_cuda_lowering_with_the_tau_mass_per_entry(alpha):
    # The sm_90 defaults (BlockSizes.mass_per_entry on, jensen_bound off: the NaN-keeping row max),
    # which lowering without a GPU does not pick.
    blocks = BlockSizes.for_head_dim(64, alpha, 90)
    assert blocks.mass_per_entry and not blocks.jensen_bound
    structs = [jax.ShapeDtypeStruct((1, 512, 2, 64), jnp.bfloat16)] * 3
    forward = functools.partial(entmax_attention, alpha=alpha, is_causal=True, implementation="pallas",
                                interpret=False, block_sizes=blocks)
    exported = export_for_cuda(lambda q, k, v: forward(q, k, v).astype(jnp.float32).sum(), *structs)
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 2


def test_cuda_lowering_with_per_head_alpha_lengths_and_segments():
    B, L, N, H = 2, 300, 4, 32
    structs = [jax.ShapeDtypeStruct((B, L, N, H), jnp.float16)] * 3 + [
        jax.ShapeDtypeStruct((N,), jnp.float32), jax.ShapeDtypeStruct((B,), jnp.int32),
        jax.ShapeDtypeStruct((B, L), jnp.int32)]

    def loss(q, k, v, alpha, lengths, segments):
        out = entmax_attention(q, k, v, alpha=alpha, key_value_seq_lengths=lengths, segment_ids=segments,
                               implementation="pallas", interpret=False)
        return out.astype(jnp.float32).sum()

    exported = export_for_cuda(jax.grad(loss, argnums=(0, 1, 2, 3)), *structs)
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 4


def test_cuda_lowering_check_catches_a_bad_kernel():
    """Negative control: a kernel Triton cannot lower (a 3-element block) must fail the same check."""

    def bad_kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 2.0

    def f(x):
        return pl.pallas_call(
            bad_kernel,
            out_shape=jax.ShapeDtypeStruct((3,), jnp.float32),
            compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
            interpret=False,
        )(x)

    with pytest.raises(ValueError, match="power of 2"):
        export_for_cuda(f, jax.ShapeDtypeStruct((3,), jnp.float32))


# ------------------------------------------------------------------ real GPU (pytest -m gpu)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CASES))
def test_gpu_matches_dense(name):
    B, T, S, N, K, H, kw = CASES[name]
    q, k, v = make_qkv(B, T, S, N, K, H)
    kw = dict(kw, block_sizes=BlockSizes.for_head_dim(H))
    out, grads = loss_and_grads("pallas", q, k, v, **kw)
    ref_out, ref_grads = loss_and_grads("xla", q, k, v, **kw)
    assert_close(out, ref_out, jnp.float32, "output")
    for what, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, r, jnp.float32, what)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("L,causal", [(1024, True), (777, False)])
def test_gpu_matches_dense_long(dtype, L, causal):
    q, k, v = make_qkv(2, L, L, 4, 2, 64, dtype=dtype)
    out, grads = loss_and_grads("pallas", q, k, v, is_causal=causal, block_sizes=None)
    ref_out, ref_grads = loss_and_grads("xla", *(t.astype(jnp.float32) for t in (q, k, v)), is_causal=causal)
    assert_close(out, ref_out, dtype, "output")
    for what, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, r, dtype, what)


@pytest.mark.slow
def test_alpha_gradient_terms_only_when_alpha_is_differentiated(monkeypatch):
    """A traced but undifferentiated per-head α (e.g. annealed in a train step) skips the α terms."""
    import inspect
    import sys

    module = sys.modules["adasplash_jax.kernels.attention"]
    seen = []
    backward = module.backward

    def spy(*args, **kwargs):
        seen.append(inspect.signature(backward).bind(*args, **kwargs).arguments["with_alpha_grad"])
        return backward(*args, **kwargs)

    monkeypatch.setattr(module, "backward", spy)
    q, k, v = make_qkv(1, 32, 32, 2, 2, 16)
    alpha = jnp.array([1.3, 1.7])

    def loss(q, alpha):
        return run("pallas", q, k, v, alpha=alpha).sum()

    dq_only = jax.jit(jax.grad(loss))(q, alpha)
    dq_both, _ = jax.jit(jax.grad(loss, argnums=(0, 1)))(q, alpha)
    assert seen == [False, True]
    np.testing.assert_allclose(dq_only, dq_both, rtol=1e-5, atol=1e-7)
