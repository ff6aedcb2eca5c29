"""attention="adasplash" (Pallas kernels, interpret mode on CPU) against attention="entmax" (dense XLA).

Same weights, same inputs: logits, parameter gradients (learned α included) and cached
generation must agree. Interpret mode is slow, so configs are tiny and sequences short.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

pytestmark = pytest.mark.slow  # whole models through the Pallas kernels in interpret mode


# The "tiny" presets made smaller still (vocab 128, 64 positions, width 32): interpret mode is slow.
def _gpt2_config(**kw):
    return GPT2Config.preset("tiny", vocab_size=128, n_positions=64, n_embd=32, **kw)


def _bert_config(**kw):
    return BertConfig.preset("tiny", vocab_size=128, max_position_embeddings=64, hidden_size=32, intermediate_size=64,
                             **kw)


def _pair(cls, config):
    dense = cls(dataclasses.replace(config, attention="entmax"), rngs=nnx.Rngs(0))
    pallas = cls(dataclasses.replace(config, attention="adasplash"), rngs=nnx.Rngs(0))
    return dense, pallas


def _assert_trees_close(a, b, atol):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-4)


def test_gpt2_adasplash_matches_entmax_logits_and_gradients():
    config = _gpt2_config(alpha=(1.5, 1.8), learn_alpha=True)
    dense, pallas = _pair(GPT2LMHeadModel, config)
    x = jnp.asarray(np.random.RandomState(0).randint(0, 128, (2, 12)), jnp.int32)

    def loss(model):
        logits = model(x[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), x[:, 1:, None], -1)), logits

    ((_, lg_dense), g_dense), ((_, lg_pallas), g_pallas) = (
        nnx.value_and_grad(loss, has_aux=True)(m) for m in (dense, pallas)
    )
    np.testing.assert_allclose(lg_pallas, lg_dense, atol=1e-5)
    _assert_trees_close(g_pallas, g_dense, atol=1e-5)
    alpha_grad = np.asarray(g_pallas["h"][0]["attn"]["alpha_logit"][...])
    assert np.all(np.isfinite(alpha_grad)) and np.any(alpha_grad != 0)


def test_bert_adasplash_matches_entmax_with_padding():
    config = _bert_config(alpha=1.5, num_labels=3)
    dense, pallas = _pair(BertForSequenceClassification, config)
    x = jnp.asarray(np.random.RandomState(1).randint(0, 128, (2, 10)), jnp.int32)
    mask = jnp.array([[1] * 10, [1] * 6 + [0] * 4])  # right padding: folded into segment ids

    def loss(model):
        logits = model(x, mask)
        return jnp.sum(logits**2), logits

    ((_, lg_dense), g_dense), ((_, lg_pallas), g_pallas) = (
        nnx.value_and_grad(loss, has_aux=True)(m) for m in (dense, pallas)
    )
    np.testing.assert_allclose(lg_pallas, lg_dense, atol=1e-5)
    _assert_trees_close(g_pallas, g_dense, atol=1e-5)


def test_gpt2_adasplash_generation_matches_entmax():
    dense, pallas = _pair(GPT2LMHeadModel, _gpt2_config(alpha=1.5))
    prompt = jnp.asarray(np.random.RandomState(2).randint(0, 128, (2, 5)), jnp.int32)
    np.testing.assert_array_equal(pallas.generate(prompt, 4), dense.generate(prompt, 4))
