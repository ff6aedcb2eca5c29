"""kernels.mask_info on its own: tile kinds of a dense mask, the τ kernel's visible key blocks, the
transposed kinds, and the broadcast/padded planes the kernels read. Checked against plain loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adasplash_jax.kernels.mask_info import (EMPTY, FULL, PARTIAL, dense_tile_inputs, layout, tile_kinds,
                                             transposed_kinds, visible_key_blocks)
from adasplash_jax.masking import reachable_kv_range


def kinds_by_loops(mask, bq, bk):
    *lead, T, S = mask.shape
    nq, nk = -(-T // bq), -(-S // bk)
    out = np.zeros((*lead, nq, nk), np.int32)
    for idx in np.ndindex(*lead, nq, nk):
        *l, i, j = idx
        tile = np.zeros((bq, bk), bool)
        part = mask[tuple(l)][i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
        tile[: part.shape[0], : part.shape[1]] = part
        out[idx] = EMPTY if not tile.any() else FULL if tile.all() else PARTIAL
    return out


@pytest.mark.parametrize("T,S,bq,bk", [(64, 64, 16, 16), (50, 70, 16, 32), (16, 16, 16, 16)])
def test_tile_kinds_against_loops(T, S, bq, bk):
    rng = np.random.default_rng(0)
    mask = np.zeros((2, T, S), bool)
    mask[0] = np.tril(np.ones((T, S), bool))  # empty, full and partial tiles
    mask[1] = rng.random((T, S)) < 0.97
    got = np.asarray(jax.jit(tile_kinds, static_argnums=(1, 2))(jnp.asarray(mask), bq, bk))
    np.testing.assert_array_equal(got, kinds_by_loops(mask, bq, bk))
    if T // bq > 1:
        assert {EMPTY, PARTIAL, FULL} <= set(np.unique(got[0]).tolist())


def test_layout_names_the_shared_dims():
    assert layout(None) is None
    assert layout(jnp.zeros((1, 1, 4, 4))) == (False, False)
    assert layout(jnp.zeros((3, 1, 4, 4))) == (True, False)
    assert layout(jnp.zeros((1, 2, 1, 4))) == (False, True)


def test_dense_tile_inputs_broadcast_pad_and_classify():
    rng = np.random.default_rng(1)
    T, S, bq, bk = 40, 24, 16, 16
    key_mask = rng.random((2, 1, 1, S)) < 0.5  # broadcast over queries
    bias = rng.normal(size=(1, 3, T, 1)).astype(np.float32)  # broadcast over keys
    d = dense_tile_inputs(jnp.asarray(key_mask), jnp.asarray(bias), q_len=T, kv_len=S, block_q=bq, block_k=bk,
                          kv_blocks_padded=4)
    assert d.mask.shape == (2, 1, 48, 32) and d.mask.dtype == jnp.int8
    full = np.broadcast_to(key_mask, (2, 1, T, S))
    np.testing.assert_array_equal(np.asarray(d.mask)[..., :T, :S], full)
    assert not np.asarray(d.mask)[..., T:, :].any() and not np.asarray(d.mask)[..., S:].any()
    kinds = np.asarray(d.kinds)
    assert kinds.shape == (2, 1, 3, 4)
    np.testing.assert_array_equal(kinds[..., :2], kinds_by_loops(full, bq, bk))
    assert (kinds[..., 2:] == EMPTY).all()  # the power-of-two padding of the block lists
    assert d.bias.shape == (1, 3, 48, 32)
    np.testing.assert_array_equal(np.asarray(d.bias)[..., :T, :S], np.broadcast_to(bias, (1, 3, T, S)))
    assert dense_tile_inputs(None, None, q_len=T, kv_len=S, block_q=bq, block_k=bk, kv_blocks_padded=4) == (
        None, None, None)


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (False, (20, 4))])
def test_visible_key_blocks_are_the_reachable_non_empty_ones(causal, window):
    rng = np.random.default_rng(2)
    nq, nk, bq, bk = 5, 6, 16, 16
    kinds = rng.integers(0, 3, (2, 1, nq, nk)).astype(np.int32)
    counts, lists = visible_key_blocks(jnp.asarray(kinds), block_q=bq, block_k=bk, is_causal=causal, window=window)
    for b, i in np.ndindex(2, nq):
        start, end = reachable_kv_range(i * bq, bq, nk * bk, is_causal=causal, window=window)
        want = [j for j in range(nk) if kinds[b, 0, i, j] != EMPTY and j * bk < end and (j + 1) * bk > start]
        assert int(counts[b, 0, i]) == len(want)
        assert list(np.asarray(lists[b, 0, i, : len(want)])) == want


def test_transposed_kinds():
    kinds = np.arange(2 * 3 * 4).reshape(1, 2, 3, 4).astype(np.int32) % 3
    kinds[..., 3] = EMPTY  # a padding column
    t = np.asarray(transposed_kinds(jnp.asarray(kinds), num_kv_blocks=3, q_blocks_padded=4))
    assert t.shape == (1, 2, 3, 4)
    np.testing.assert_array_equal(t[..., :3], np.swapaxes(kinds[..., :3], -1, -2))
    assert (t[..., 3] == EMPTY).all()
