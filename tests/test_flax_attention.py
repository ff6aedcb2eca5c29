"""The Flax drop-in attention_fn, inside flax.nnx.MultiHeadAttention and linen.MultiHeadDotProductAttention.

Oracle: the same Flax module with an attention_fn computing scores with numpy and
probabilities with the PyTorch `entmax` package (entmax15 / sparsemax), independent of
adasplash_jax.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
from entmax import entmax15, sparsemax  # noqa: E402

from adasplash_jax.flax_attention import flax_entmax_attention, make_flax_attention_fn  # noqa: E402
from adasplash_jax import entmax_attention  # noqa: E402


def _torch_probs(query, key, mask, is_causal, alpha):
    q, k = np.asarray(query, np.float64), np.asarray(key, np.float64)
    scores = np.einsum("...tnh,...snh->...nts", q, k) / np.sqrt(q.shape[-1])
    keep = np.ones(scores.shape, bool)
    if mask is not None:
        keep &= np.broadcast_to(np.asarray(mask) != 0, scores.shape)
    if is_causal:
        keep &= np.tril(np.ones(scores.shape[-2:], bool))
    scores = np.where(keep, scores, -np.inf)
    fn = {1.5: entmax15, 2.0: sparsemax}[alpha]
    return fn(torch.tensor(scores), dim=-1).numpy()


def oracle_fn(alpha):
    def attention_fn(query, key, value, mask=None, is_causal=False, **_):
        p = _torch_probs(query, key, mask, is_causal, alpha)
        return jnp.asarray(np.einsum("...nts,...snh->...tnh", p, np.asarray(value, np.float64)), jnp.float32)

    return attention_fn


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_inside_nnx_multi_head_attention(alpha):
    x = jax.random.normal(jax.random.key(0), (2, 6, 16))
    mask = nnx.make_attention_mask(jnp.ones((2, 6)), jnp.array([[1] * 6, [1] * 4 + [0] * 2]))  # float [B,1,T,S]
    make = lambda fn: nnx.MultiHeadAttention(  # noqa: E731
        num_heads=2, in_features=16, attention_fn=fn, decode=False, rngs=nnx.Rngs(0)
    )
    ours, ref = make(make_flax_attention_fn(alpha=alpha)), make(oracle_fn(alpha))
    np.testing.assert_allclose(ours(x, mask=mask), ref(x, mask=mask), atol=1e-5)
    causal = nnx.make_causal_mask(jnp.ones((2, 6)))
    np.testing.assert_allclose(ours(x, mask=causal), ref(x, mask=causal), atol=1e-5)


@pytest.mark.slow
def test_inside_linen_multi_head_dot_product_attention():
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    mask = nn.make_causal_mask(jnp.ones((2, 5)))
    ours = nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=make_flax_attention_fn(alpha=1.5))
    ref = nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=oracle_fn(1.5))
    params = ours.init(jax.random.key(2), x, x, mask=mask)
    np.testing.assert_allclose(
        ours.apply(params, x, x, mask=mask), ref.apply(params, x, x, mask=mask), atol=1e-5
    )


@pytest.mark.slow
def test_is_causal_extra_batch_dims_and_gqa():
    q = jax.random.normal(jax.random.key(3), (2, 3, 5, 4, 8))  # two batch dims
    kv = jax.random.normal(jax.random.key(4), (2, 3, 5, 4, 8))
    got = flax_entmax_attention(q, kv, kv, is_causal=True, alpha=1.5)
    p = _torch_probs(q, kv, None, True, 1.5)
    expected = np.einsum("...nts,...snh->...tnh", p, np.asarray(kv, np.float64))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # grouped-query: 4 query heads over 2 key/value heads
    k2 = kv[0, :, :, :2]
    got = flax_entmax_attention(q[0], k2, k2, alpha=1.5)
    k_rep = np.repeat(np.asarray(k2), 2, axis=2)
    p = _torch_probs(q[0], k_rep, None, False, 1.5)
    np.testing.assert_allclose(got, np.einsum("bnts,bsnh->btnh", p, k_rep), atol=1e-5)


@pytest.mark.slow
def test_dropout_on_probabilities_matches_flax_convention():
    q = jax.random.normal(jax.random.key(5), (1, 6, 2, 8))
    rng = jax.random.key(6)
    got = flax_entmax_attention(q, q, q, dropout_rng=rng, dropout_rate=0.5, deterministic=False, alpha=1.5)
    # Flax's dot_product_attention: keep ~ bernoulli(rng, 1 - rate, [1, 1, T, S]) (broadcast over
    # batch and heads), probabilities scaled by 1 / (1 - rate)
    keep = np.asarray(jax.random.bernoulli(rng, 0.5, (1, 1, 6, 6)))
    p = _torch_probs(q, q, None, False, 1.5) * keep / 0.5
    np.testing.assert_allclose(got, np.einsum("bnts,bsnh->btnh", p, np.asarray(q)), atol=1e-5)
    # deterministic=True: no dropout, the plain entmax_attention result
    det = flax_entmax_attention(q, q, q, dropout_rng=rng, dropout_rate=0.5, deterministic=True, alpha=1.5)
    p = _torch_probs(q, q, None, False, 1.5)
    np.testing.assert_allclose(det, np.einsum("bnts,bsnh->btnh", p, np.asarray(q)), atol=1e-5)


def test_unsupported_requests_raise_clear_errors():
    q = jnp.ones((1, 4, 2, 8))
    with pytest.raises(ValueError, match="Pallas"):
        flax_entmax_attention(q, q, q, dropout_rng=jax.random.key(0), dropout_rate=0.1,
                              deterministic=False, implementation="pallas")
    with pytest.raises(ValueError, match="dropout_rng"):
        flax_entmax_attention(q, q, q, dropout_rate=0.1, deterministic=False)
    with pytest.raises(ValueError, match="bias"):
        flax_entmax_attention(q, q, q, bias=jnp.zeros((3, 2, 4, 4)))
    with pytest.raises(ValueError, match="mask"):
        flax_entmax_attention(q, q, q, mask=jnp.ones((3, 1, 4, 4)))


@pytest.mark.slow
def test_sow_weights_in_nnx():
    x = jax.random.normal(jax.random.key(7), (1, 5, 16))
    mha = nnx.MultiHeadAttention(num_heads=2, in_features=16, attention_fn=make_flax_attention_fn(alpha=2.0),
                                 decode=False, rngs=nnx.Rngs(0))
    mha(x, sow_weights=True)
    probs = np.asarray(jax.tree.leaves(nnx.state(mha, nnx.Intermediate))[0])
    assert probs.shape == (1, 2, 5, 5)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert np.any(probs == 0)


@pytest.mark.slow
def test_key_padding_mask_reaches_the_pallas_path():
    """Flax's [B, 1, 1, S] padding mask keeps its shape, so the Pallas path accepts it."""
    q = jax.random.normal(jax.random.key(0), (2, 16, 2, 16))
    mask = (jnp.arange(16) >= jnp.array([[3], [0]]))[:, None, None, :].astype(jnp.float32)
    got = flax_entmax_attention(q, q, q, mask=mask, implementation="pallas")
    want = flax_entmax_attention(q, q, q, mask=mask, implementation="xla")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_bias_is_added_to_the_scores():
    q = jax.random.normal(jax.random.key(3), (2, 5, 2, 8))
    bias = jax.random.normal(jax.random.key(4), (1, 2, 5, 5)) * 3
    got = flax_entmax_attention(q, q, q, bias=bias, alpha=1.5)
    want = entmax_attention(q, q, q, bias, alpha=1.5, implementation="xla")
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(got, flax_entmax_attention(q, q, q, alpha=1.5), atol=1e-3)
