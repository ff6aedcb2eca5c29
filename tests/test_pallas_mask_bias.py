"""Any boolean mask and any additive bias on the Pallas path (interpret mode), against the dense path.

A dense mask reaches the kernels as a per-tile map (kernels.mask_info): EMPTY tiles are visited by
no kernel, FULL tiles keep everything without loading the mask, PARTIAL tiles load it. A bias is
added to every score tile, and its gradient is written by the dQ kernel on active tiles.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adasplash_jax import BlockSizes, entmax_attention
from adasplash_jax.inputs import check_attention_inputs
from adasplash_jax.kernels.attention import _attention, kernel_inputs
from adasplash_jax.kernels.config import make_config, unsupported_reason
from adasplash_jax.kernels.debug import tile_visits
from adasplash_jax.kernels.mask_info import EMPTY, FULL, tile_kinds, visible_key_blocks

SMALL = BlockSizes(block_q=16, block_k=16)
B, T, S, H = 2, 40, 72, 16


def qkv(N=4, K=2, seed=0, T=T, S=S):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.normal(size=(B, L, n, H)), jnp.float32) for L, n in ((T, N), (S, K), (S, K)))


def structured_mask(shape, seed=0):
    """Random keeps with whole tiles dropped (EMPTY), whole tiles kept (FULL), one fully masked
    query row, and sparse random tiles elsewhere (PARTIAL)."""
    r = np.random.default_rng(seed)
    m = r.random(shape) < 0.6
    m[..., :16, 16:48] = False  # EMPTY tiles
    m[..., 16:32, :32] = True  # FULL tiles
    if shape[-2] > 1:
        m[..., shape[-2] * 7 // 8, :] = False  # a query with nothing to attend to: a zero row on both paths
    return jnp.asarray(m)


def attend(impl, q, k, v, bias=None, mask=None, **kw):
    return entmax_attention(q, k, v, bias, mask, implementation=impl, block_sizes=SMALL if impl == "pallas" else None,
                            **kw)


def assert_paths_agree(q, k, v, bias=None, mask=None, atol=2e-5, **kw):
    """Outputs and the gradients of every array argument agree (one jax.vjp per path)."""
    args = (q, k, v) if bias is None else (q, k, v, bias)
    cotangent = jnp.broadcast_to(jnp.cos(jnp.arange(H, dtype=jnp.float32)), q.shape)
    results = {}
    for impl in ("pallas", "xla"):
        out, vjp = jax.vjp(lambda *a: attend(impl, *a, mask=mask, **kw), *args)
        results[impl] = (out, vjp(cotangent))
    (ours, got), (ref, want) = results["pallas"], results["xla"]
    np.testing.assert_allclose(ours, ref, atol=atol)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=atol, rtol=atol)
    return ref


@pytest.mark.slow
def test_shared_mask_with_gqa_values_and_gradients():
    q, k, v = qkv()
    mask = structured_mask((1, 1, T, S))
    ref = assert_paths_agree(q, k, v, mask=mask)
    np.testing.assert_array_equal(np.asarray(ref[:, 35]), 0.0)
    assert not np.allclose(ref, attend("xla", q, k, v), atol=1e-3)  # the mask matters


@pytest.mark.slow
@pytest.mark.parametrize("shape,kw", [
    ((B, 4, T, S), dict(alpha=2.0)),  # one mask per batch and head, GQA
    ((B, 1, T, S), dict(is_causal=True, key_value_seq_lengths=jnp.array([72, 50]), alpha=1.25)),
    ((1, 4, 1, S), dict(alpha=jnp.array([1.5, 2.0, 1.75, 1.2]))),  # per-head key mask: not a padding mask
    ((B, 1, T, S), dict(local_window_size=(20, 8), segment_ids=jnp.asarray(np.repeat([[0] * 30 + [1] * 42], B, 0)))),
], ids=["per-head-gqa", "causal-lengths", "per-head-keys", "window-segments"])
def test_masks_pallas_equals_xla(shape, kw):
    q, k, v = qkv(seed=1)
    if "segment_ids" in kw:  # self-attention shapes for segments
        q, k, v = qkv(seed=1, T=S)
        shape = shape[:2] + (S, S)
    assert_paths_agree(q, k, v, mask=structured_mask(shape, seed=2), **kw)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(B, 4, T, S), (1, 1, T, S), (B, 1, 1, S), (1, 4, T, 1)])
def test_bias_pallas_equals_xla_values_and_gradients(shape):
    q, k, v = qkv(seed=3)
    bias = jnp.asarray(np.random.default_rng(4).normal(size=shape), jnp.float32)
    ref = assert_paths_agree(q, k, v, bias, is_causal=True)
    if shape[-1] != 1:  # (a bias constant along a row changes nothing: entmax is shift invariant)
        assert not np.allclose(ref, attend("xla", q, k, v, is_causal=True), atol=1e-3)  # the bias matters


@pytest.mark.slow
def test_bias_mask_and_alibi_together():
    q, k, v = qkv(N=2, K=2, seed=5, T=24, S=40)
    bias = jnp.asarray(np.random.default_rng(6).normal(size=(B, 1, 24, 40)), jnp.bfloat16).astype(jnp.float32)
    mask = structured_mask((1, 2, 24, 40), seed=7)
    assert_paths_agree(q, k, v, bias, mask, alibi_slopes=jnp.array([0.5, 0.25]), alpha=1.5)


@pytest.mark.slow
def test_minus_inf_bias_drops_keys_and_an_all_minus_inf_row_is_zero():
    q, k, v = qkv(N=2, K=2, seed=8, T=32, S=48)
    bias = np.zeros((1, 1, 32, 48), np.float32)
    bias[..., 5:20] = -np.inf
    bias[..., 3, :] = -np.inf
    ours = attend("pallas", q, k, v, jnp.asarray(bias))
    np.testing.assert_allclose(ours, attend("xla", q, k, v, jnp.asarray(bias)), atol=2e-5)
    np.testing.assert_array_equal(np.asarray(ours[:, 3]), 0.0)


def _inputs(q, k, v, mask=None, bias=None, is_causal=False):
    return check_attention_inputs(q, k, v, bias=bias, alpha=1.5, mask=mask, is_causal=is_causal, scale=None,
                                  query_seq_lengths=None, key_value_seq_lengths=None, segment_ids=None)


@pytest.mark.slow
def test_empty_tiles_are_visited_by_no_kernel():
    L = 96
    q, k, v = qkv(N=2, K=2, seed=9, T=L, S=L)
    blocks = np.kron(np.eye(L // 32, dtype=bool), np.ones((32, 32), bool))  # block-diagonal: 2/3 of tiles EMPTY
    mask = jnp.asarray(blocks[None, None] & (np.random.default_rng(10).random((1, 1, L, L)) < 0.8))
    inp = _inputs(q, k, v, mask=mask, is_causal=True)
    visits = tile_visits(inp, jnp.ones_like(q), block_sizes=SMALL)
    kinds = tile_kinds(mask, 16, 16)
    counts, _ = visible_key_blocks(kinds, block_q=16, block_k=16, is_causal=True, window=None)
    np.testing.assert_array_equal(visits["tau"], np.broadcast_to(counts, visits["tau"].shape))
    reachable_non_empty = int(np.sum(counts))
    assert reachable_non_empty == 6 * 2 - 6 // 2 * 0 - 3  # per 32×32 diagonal block: 3 of its 4 tiles (causal)
    block_mask = np.asarray(visits["block_mask"])
    assert not block_mask[..., np.asarray(kinds[0, 0]) == EMPTY].any()
    np.testing.assert_array_equal(visits["forward"], block_mask.sum(-1))
    np.testing.assert_array_equal(visits["dq"], block_mask.sum(-1))
    np.testing.assert_array_equal(visits["dkdv"], block_mask.sum(-2))


@pytest.mark.slow
def test_full_tiles_do_not_read_the_mask():
    """White box: a FULL tile's mask plane is never read. Zeroing the plane while the tile map
    says FULL everywhere leaves the output that of the all-True mask."""
    q, k, v = qkv(N=2, K=2, seed=11, T=32, S=32)
    inp = _inputs(q, k, v, mask=jnp.ones((1, 2, 32, 32), bool))
    cfg = make_config(inp, SMALL, None)
    q_, k_, v_, alpha, q_len, kv_len, tiles = kernel_inputs(cfg, inp)
    assert (np.asarray(tiles.kinds)[..., :2] == FULL).all()
    blanked = tiles._replace(mask=jnp.zeros_like(tiles.mask))
    out, _ = _attention(cfg, q_, k_, v_, alpha, q_len, kv_len, blanked)
    np.testing.assert_allclose(out[:, :32, :, :H], attend("xla", q, k, v), atol=2e-5)


def test_the_kernels_take_every_mask_and_bias_the_dense_path_takes():
    q, k, v = qkv(N=2, K=2)
    for mask, bias in [(jnp.ones((B, 2, T, S), bool), None), (jnp.ones((1, 1, T, S), bool), jnp.zeros((B, 2, 1, S))),
                       (jnp.ones((B, 1, T, 1), bool), jnp.zeros((T, S)))]:
        assert unsupported_reason(_inputs(q, k, v, mask=mask, bias=bias)) is None


@pytest.mark.parametrize("mask_shape,bias_shape", [((2, 1, 256, 256), (1, 4, 256, 256)), ((1, 4, 256, 256), None),
                                                   (None, (2, 1, 1, 256))])
def test_mask_and_bias_kernels_lower_for_cuda(mask_shape, bias_shape):
    structs = [jax.ShapeDtypeStruct((2, 256, n, 64), jnp.bfloat16) for n in (4, 2, 2)]
    extra = [jax.ShapeDtypeStruct(s, d) for s, d in ((mask_shape, jnp.bool_), (bias_shape, jnp.bfloat16)) if s]

    def loss(q, k, v, *extra):
        mask = extra[0] if mask_shape else None
        bias = extra[-1] if bias_shape else None
        out = entmax_attention(q, k, v, bias, mask, is_causal=True, implementation="pallas", interpret=False)
        return out.astype(jnp.float32).sum()

    argnums = (0, 1, 2) + ((len(structs) + len(extra) - 1,) if bias_shape else ())
    exported = jax.export.export(
        jax.jit(jax.grad(loss, argnums=argnums)), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*structs, *extra)
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 4  # τ, forward, dK/dV, dQ


@pytest.mark.slow
def test_mask_and_bias_under_x64_and_with_an_empty_batch(x64):
    r = np.random.default_rng(12)
    q = jnp.asarray(r.normal(size=(1, 20, 2, H)), jnp.float32)
    mask = jnp.asarray(r.random((1, 1, 20, 20)) < 0.7)
    bias = jnp.asarray(r.normal(size=(1, 2, 20, 20)), jnp.float32)
    out, vjp = jax.vjp(lambda b: attend("pallas", q, q, q, b, mask), bias)
    ref, vjp_ref = jax.vjp(lambda b: attend("xla", q, q, q, b, mask), bias)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, atol=2e-5)
    (d_bias,), (d_bias_ref,) = vjp(jnp.ones_like(out)), vjp_ref(jnp.ones_like(ref))
    assert d_bias.dtype == jnp.float32
    np.testing.assert_allclose(d_bias, d_bias_ref, atol=2e-5)
    empty = jnp.zeros((0, 20, 2, H), jnp.float32)
    assert attend("pallas", empty, empty, empty, None, jnp.ones((0, 1, 20, 20), bool)).shape == empty.shape
    assert attend("pallas", empty, empty, empty, jnp.zeros((0, 2, 20, 20))).shape == empty.shape
