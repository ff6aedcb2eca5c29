"""The tiling module on its own: padding, index lists, their transposition, tile counting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adasplash_jax.tiling import (
    active_block_lists,
    block_mask_from_dense,
    pad_axis,
    sparsity_stats,
    tile_fractions,
    transposed_block_mask,
)


def test_active_block_lists_against_numpy():
    rng = np.random.default_rng(0)
    mask = (rng.random((2, 3, 5, 8)) < 0.4).astype(np.int32)
    counts, lists = jax.jit(active_block_lists)(jnp.asarray(mask))
    for idx in np.ndindex(*mask.shape[:-1]):
        active = np.nonzero(mask[idx])[0]
        assert counts[idx] == len(active)
        np.testing.assert_array_equal(np.asarray(lists[idx])[: len(active)], active)
        np.testing.assert_array_equal(np.asarray(lists[idx])[len(active):], 0)  # padding repeats 0


def test_transposed_block_mask_lists_query_blocks_per_key_block():
    rng = np.random.default_rng(1)
    mask = (rng.random((2, 5, 3)) < 0.5).astype(np.int32)  # [N, nq=5, nk=3]
    t = np.asarray(transposed_block_mask(jnp.asarray(mask), 8))
    assert t.shape == (2, 3, 8)
    np.testing.assert_array_equal(t[..., :5], mask.transpose(0, 2, 1))
    np.testing.assert_array_equal(t[..., 5:], 0)


def test_pad_axis():
    x = jnp.ones((2, 3))
    np.testing.assert_array_equal(pad_axis(x, 1, 5, -1), np.concatenate([np.ones((2, 3)), -np.ones((2, 2))], 1))
    np.testing.assert_array_equal(pad_axis(x, -2, 4), np.concatenate([np.ones((2, 3)), np.zeros((2, 3))], 0))
    assert pad_axis(x, 0, 2) is x


@pytest.mark.parametrize("T,S,bq,bk", [(50, 50, 16, 16), (33, 70, 16, 32), (16, 16, 16, 16)])
def test_block_mask_from_dense_against_loops(T, S, bq, bk):
    rng = np.random.default_rng(2)
    nonzero = (rng.random((2, T, S)) < 0.02).astype(np.float32)
    got = np.asarray(block_mask_from_dense(jnp.asarray(nonzero), bq, bk))
    nq, nk = -(-T // bq), -(-S // bk)
    assert got.shape == (2, nq, nk)
    for n, i, j in np.ndindex(2, nq, nk):
        assert got[n, i, j] == nonzero[n, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].max(initial=0)


def test_tile_fractions_count_only_reachable_tiles():
    # 4 query blocks × 4 key blocks; causal: 10 reachable tiles (the lower triangle).
    mask = np.ones((1, 2, 4, 4), np.int32)
    causal = np.asarray(tile_fractions(jnp.asarray(mask), block_q=16, block_k=16, is_causal=True))
    np.testing.assert_allclose(causal, 1.0)  # tiles above the diagonal do not count
    mask[0, 1] = np.eye(4, dtype=np.int32)
    causal = np.asarray(tile_fractions(jnp.asarray(mask), block_q=16, block_k=16, is_causal=True))
    np.testing.assert_allclose(causal, [1.0, 4 / 10])
    full = np.asarray(tile_fractions(jnp.asarray(mask), block_q=16, block_k=16, is_causal=False))
    np.testing.assert_allclose(full, [1.0, 4 / 16])


def test_sparsity_stats_fractions():
    block_mask = jnp.ones((1, 1, 2, 2), jnp.int32)
    nonzero = jnp.array([[[3.0, 1.0]]])
    allowed = jnp.array([[[4.0, 4.0]]])
    stats = sparsity_stats(block_mask, nonzero, allowed, block_q=16, block_k=16, is_causal=False)
    np.testing.assert_allclose(stats.nonzero_fraction, [0.5])
    np.testing.assert_allclose(stats.active_tile_fraction, [1.0])
