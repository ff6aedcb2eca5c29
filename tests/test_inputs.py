"""Bad arguments are ValueErrors that name them; edge inputs (empty, x64) behave like jax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adasplash_jax import ALPHA_MIN, BlockSizes, entmax, entmax_attention, entmax_loss, sparsemax_loss
from adasplash_jax.inputs import check_alpha, check_attention_inputs


@pytest.mark.parametrize("alpha", [1 + 1e-8, 1.0, 0.5, 2.5, float("nan"), -1.0, ALPHA_MIN / 1.0001])
def test_alpha_out_of_range_is_refused_as_used(alpha):
    with pytest.raises(ValueError, match="alpha"):
        entmax(jnp.ones(3), alpha)
    with pytest.raises(ValueError, match="alpha"):
        entmax_attention(jnp.ones((1, 2, 1, 4)), jnp.ones((1, 2, 1, 4)), jnp.ones((1, 2, 1, 4)), alpha=alpha)


@pytest.mark.parametrize("alpha", ["1.5", None, b"2", [1.5, "x"], True])
def test_alpha_of_the_wrong_type_names_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        check_alpha(alpha)


@pytest.mark.slow
def test_alpha_minimum_is_accepted_and_accurate():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 20)), jnp.float32)
    p = np.asarray(entmax(x, ALPHA_MIN))
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    # α → 1 is softmax; at the minimum entmax is within 1e-2 of it
    np.testing.assert_allclose(p, np.asarray(jax.nn.softmax(x, -1)), atol=1e-2)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_scale_must_be_finite(scale):
    q = jnp.ones((1, 3, 1, 4))
    for impl in ("xla", "pallas"):
        with pytest.raises(ValueError, match="scale"):
            entmax_attention(q, q, q, scale=scale, implementation=impl)


@pytest.mark.parametrize("field,value", [("num_warps", 0), ("num_warps", 3), ("num_stages", -3), ("num_stages", 0),
                                         ("block_q", 24), ("n_iter", 0), ("num_warps", 2.0),
                                         ("tau_num_warps", 6), ("backward_num_warps", 0),
                                         ("backward_num_stages", 0), ("tau_num_stages", 0),
                                         ("histogram_start", "yes"), ("reload_query", 1)])
def test_block_sizes_refuse_bad_fields(field, value):
    with pytest.raises(ValueError, match=field):
        BlockSizes(**{field: value})


def test_empty_inputs_give_empty_outputs():
    assert entmax(jnp.zeros((3, 0)), 1.5).shape == (3, 0)
    assert entmax(jnp.zeros((0, 5)), 1.5).shape == (0, 5)
    assert jax.nn.softmax(jnp.zeros((3, 0))).shape == (3, 0)
    g = jax.grad(lambda x: entmax(x, 1.5).sum())(jnp.zeros((0, 4)))
    assert g.shape == (0, 4)


@pytest.mark.slow
def test_losses_under_jit_with_constant_and_traced_labels():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 6)), jnp.float32)
    labels = jnp.array([0, 5, 2, 3])
    want = entmax_loss(x, labels, 1.5)
    np.testing.assert_allclose(jax.jit(lambda x: entmax_loss(x, labels, 1.5))(x), want, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda x, y: entmax_loss(x, y, 1.5))(x, labels), want, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda x: sparsemax_loss(x, labels))(x), sparsemax_loss(x, labels), rtol=1e-6)
    with pytest.raises(ValueError, match="labels"):
        entmax_loss(x, jnp.array([0, 6, 2, 3]), 1.5)
    bad = jnp.array([0, 6, 2, 3])  # closed over: concrete, so still checked under jit
    with pytest.raises(ValueError, match="labels"):
        jax.jit(lambda x: entmax_loss(x, bad, 1.5))(x)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("shape_q,shape_kv", [((0, 8, 2, 16), (0, 8, 2, 16)), ((2, 0, 2, 16), (2, 8, 2, 16)),
                                              ((2, 8, 2, 16), (2, 0, 2, 16))])
def test_empty_attention_inputs(impl, shape_q, shape_kv):
    q, kv = jnp.ones(shape_q), jnp.ones(shape_kv)
    out = entmax_attention(q, kv, kv, implementation=impl)
    assert out.shape == shape_q
    np.testing.assert_array_equal(out, 0.0)
    g = jax.grad(lambda q: entmax_attention(q, kv, kv, implementation=impl).sum())(q)
    assert g.shape == shape_q


def test_default_block_sizes_follow_the_gpu(monkeypatch):
    """The defaults depend on head dim, static α and the GPU (read from the default backend's
    device): at d = 64 the backward kernels run at 4 warps on sm_90, 8 elsewhere or when unknown."""
    from types import SimpleNamespace

    from adasplash_jax.kernels import config

    def fake_gpu(cc):
        monkeypatch.setattr(config.jax, "default_backend", lambda: "gpu")
        monkeypatch.setattr(config.jax, "devices", lambda: [SimpleNamespace(compute_capability=cc)])

    fake_gpu("9.0")
    assert config.local_compute_capability() == 90
    fake_gpu("8.6")
    assert config.local_compute_capability() == 86
    fake_gpu(None)  # no compute capability reported (another vendor's GPU)
    assert config.local_compute_capability() is None
    monkeypatch.setattr(config.jax, "default_backend", lambda: "cpu")
    assert config.local_compute_capability() is None

    q = jnp.ones((1, 8, 1, 64), jnp.bfloat16)
    inp = check_attention_inputs(q, q, q, alpha=1.5, mask=None, is_causal=True, scale=None, query_seq_lengths=None,
                                 key_value_seq_lengths=None, segment_ids=None)
    for cc, backward in (("9.0", (4, 1)), ("8.0", (8, 1))):
        fake_gpu(cc)
        assert dict(config.make_config(inp, None, interpret=True).launch)["backward"] == backward
    assert BlockSizes.for_head_dim(64, 1.5).launch()["backward"] == (8, 1)  # unknown GPU: sm_80-safe
    # Sparsemax's d = 64 τ kernel: one stage below sm_90 or when unknown (two spill on sm_80), two on sm_90.
    assert BlockSizes.for_head_dim(64, 2.0).launch()["tau"] == (4, 1)
    assert BlockSizes.for_head_dim(64, 2.0, 90).launch()["tau"] == (4, 2)
    assert BlockSizes.for_head_dim(64, None, 90).launch()["tau"] == (4, 2)
    # A general α's forward keeps one stage below sm_90 (two spill on sm_80), two on sm_90.
    assert BlockSizes.for_head_dim(64, 1.8).launch()["forward"] == (4, 1)
    assert BlockSizes.for_head_dim(64, 1.8, 90).launch()["forward"] == (4, 2)
    assert BlockSizes.for_head_dim(64, None).launch()["forward"] == (4, 2)
    # Reloading the query tile at every key tile: sparsemax at d ≤ 32 and every α at d = 256 (whose
    # τ kernel then runs at 4 warps); holding it there spills.
    assert BlockSizes.for_head_dim(32, 2.0).reload_query and not BlockSizes.for_head_dim(32, 1.5).reload_query
    assert not any(BlockSizes.for_head_dim(d, 2.0).reload_query for d in (64, 128))
    d256 = BlockSizes.for_head_dim(256, None)
    assert d256.reload_query and d256.launch()["tau"] == (4, 1)
    # A dense mask or bias at d = 128 keeps the forward at one stage below sm_90 (two spill on sm_80).
    assert BlockSizes.for_head_dim(128, 1.5, dense_inputs=True).launch()["forward"] == (8, 1)
    assert BlockSizes.for_head_dim(128, 1.5, 90, dense_inputs=True).launch()["forward"] == (8, 2)
    assert BlockSizes.for_head_dim(128, 1.5).launch()["forward"] == (8, 2)
    q128 = jnp.ones((1, 8, 1, 128), jnp.bfloat16)
    fake_gpu("8.0")
    for bias, stages in ((None, 2), (jnp.zeros((1, 1, 8, 8)), 1)):
        inp = check_attention_inputs(q128, q128, q128, alpha=1.5, mask=None, is_causal=True, scale=None,
                                     query_seq_lengths=None, key_value_seq_lengths=None, segment_ids=None,
                                     bias=bias)
        assert dict(config.make_config(inp, None, interpret=True).launch)["forward"] == (8, stages)
