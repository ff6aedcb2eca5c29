"""The masking module on its own: the keep rule and the causal reach of a query block."""

import jax.numpy as jnp
import numpy as np
import pytest

from adasplash_jax.masking import keep_mask, reachable_kv_end, reachable_tiles


def test_keep_mask_rules():
    q = jnp.arange(5)[:, None]
    k = jnp.arange(7)[None, :]
    np.testing.assert_array_equal(keep_mask(q, k, is_causal=False), np.ones((5, 7), bool))
    np.testing.assert_array_equal(keep_mask(q, k, is_causal=True), np.tril(np.ones((5, 7), bool)))
    got = keep_mask(q, k, is_causal=False, q_len=3, kv_len=4)
    want = np.zeros((5, 7), bool)
    want[:3, :4] = True
    np.testing.assert_array_equal(got, want)
    seg_q = jnp.array([0, 0, 1, 1, 1])[:, None]
    seg_k = jnp.array([0, 1, 1, 0, 1, 1, 2])[None, :]
    np.testing.assert_array_equal(keep_mask(q, k, is_causal=False, q_segment=seg_q, kv_segment=seg_k),
                                  np.asarray(seg_q) == np.asarray(seg_k))


@pytest.mark.parametrize("block_q,block_k,n", [(16, 16, 4), (16, 32, 5), (32, 16, 3)])
def test_reachable_tiles_match_the_keep_rule(block_q, block_k, n):
    # A tile is reachable iff some (query, key) pair inside it is kept by the causal rule.
    T, S = n * block_q, n * block_k
    keep = np.asarray(keep_mask(jnp.arange(T)[:, None], jnp.arange(S)[None, :], is_causal=True))
    want = keep.reshape(n, block_q, n, block_k).any((1, 3))
    np.testing.assert_array_equal(reachable_tiles(n, n, block_q, block_k, is_causal=True), want)
    full = np.asarray(reachable_tiles(n, n, block_q, block_k, is_causal=False))
    assert full.shape == (n, n) and full.all()


def test_reachable_kv_end():
    assert int(reachable_kv_end(32, 16, 100, is_causal=True)) == 48
    assert int(reachable_kv_end(96, 16, 100, is_causal=True)) == 100
    assert reachable_kv_end(96, 16, 100, is_causal=False) == 100
