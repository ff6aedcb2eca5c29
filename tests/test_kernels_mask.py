"""The block mask comes from the τ kernel's last solver pass (taken at the bracket's lower end before
that pass), not from a pass at the final τ: it must still cover every non-zero probability at the
final τ. A missed tile would silently drop probability mass, so this is checked on adversarial rows:
ties at the threshold, clustered scores, and score scales from ×0.01 to ×100.

Queries and keys are small dyadic rationals, so every score is exact in float32 whichever order a
matmul sums in: the support recomputed here from the kernel's own τ and row max is the kernel's.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adasplash_jax import BlockSizes, entmax_attention
from adasplash_jax.inputs import check_attention_inputs
from adasplash_jax.kernels.attention import kernel_inputs
from adasplash_jax.kernels.config import make_config
from adasplash_jax.kernels.forward import forward
from adasplash_jax.tiling import block_mask_from_dense

SMALL = BlockSizes(block_q=16, block_k=16)
B, T, S, N, H = 3, 40, 72, 2, 16


def adversarial_qkv(seed=0):
    """Batch 0: keys drawn from three vectors (many exact ties, some at the threshold);
    batch 1: keys clustered around one direction (scores within a narrow band);
    batch 2: plain random dyadic values. Values multiples of 1/8 or 1/4: exact dot products."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-4, 5, (B, T, N, H)) / 4.0
    k = rng.integers(-4, 5, (B, S, 1, H)) / 4.0
    basis = rng.integers(-2, 3, (3, H)) / 2.0
    k[0, :, 0] = basis[rng.integers(0, 3, S)]
    k[0, ::7, 0] = 0.0  # zero scores: sparsemax rows whose top score is 1 put these exactly at τ
    direction = rng.integers(-2, 3, H) / 2.0
    k[1, :, 0] = 4.0 * direction + rng.integers(-1, 2, (S, H)) / 8.0
    q[1] = direction + rng.integers(-1, 2, (T, N, H)) / 8.0
    v = rng.normal(size=(B, S, 1, H))
    return (jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32))


@functools.partial(jax.jit, static_argnames=("alpha", "scale", "causal"))
def kernel_state(q, k, v, alpha, scale, causal):
    inp = check_attention_inputs(q, k, v, alpha=alpha, mask=None, is_causal=causal, scale=scale,
                                 query_seq_lengths=None, key_value_seq_lengths=None, segment_ids=None)
    cfg = make_config(inp, SMALL, None, count_nonzero=True)
    qp, kp, vp, a, q_len, kv_len, tile_inputs = kernel_inputs(cfg, inp)
    (out, *_), stats = forward(cfg, a, q_len, kv_len, qp, kp, vp, tile_inputs, with_residual=False)
    return out[:, :T], {key: stats[key] for key in ("tau", "row_max", "norm", "nonzero", "block_mask")}


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [1.25, 1.5, 1.8, 2.0])
@pytest.mark.parametrize("scale_factor,causal", [(0.01, False), (1.0, True), (100.0, False)])
def test_block_mask_covers_the_support_at_the_final_tau(alpha, scale_factor, causal):
    q, k, v = adversarial_qkv()
    scale = scale_factor / np.sqrt(H)
    out, st = kernel_state(q, k, v, alpha=alpha, scale=float(scale), causal=causal)
    # The support at the kernel's final τ, recomputed in float32 op by op as the kernels do: from the
    # raw scores d = q·kᵀ and the row max m of d, x = (d − m)·(α−1)·scale.
    d = np.einsum("btnh,bsh->bnts", np.asarray(q, np.float64), np.asarray(k[:, :, 0], np.float64))
    keep = np.ones((T, S), bool) if not causal else np.tril(np.ones((T, S), bool))
    d = np.where(keep, d.astype(np.float32), np.float32(-1e30))
    tau = np.asarray(st["tau"])[..., :T, None]
    row_max = np.asarray(st["row_max"])[..., :T, None]
    x = (d - row_max) * np.float32((alpha - 1.0) * scale)
    support = ((x - tau) > 0) & keep
    assert support.any(-1).all(), "every row attends somewhere"
    needed = block_mask_from_dense(support.astype(np.int32), 16, 16)
    mask = np.asarray(st["block_mask"])
    missed = (needed > 0) & (mask == 0)
    assert not missed.any(), f"{int(missed.sum())} tiles with non-zero probabilities are not in the block mask"
    # The forward kernel saw every non-zero: its count and normaliser are those of the full row.
    np.testing.assert_array_equal(np.asarray(st["nonzero"])[..., :T], support.sum(-1))
    z = np.where(support, x - tau, 0.0).astype(np.float64)
    norm = (z ** (1.0 / (alpha - 1.0))).sum(-1)
    np.testing.assert_allclose(np.asarray(st["norm"])[..., :T], norm, rtol=1e-4)
    np.testing.assert_allclose(norm, 1.0, atol=1e-4)
    assert np.all(np.isfinite(np.asarray(out)))
    # A superset costs speed only; it stays close to the needed tiles here.
    assert mask[..., : needed.shape[-1]].sum() <= needed.sum() + needed.size // 4


@pytest.mark.slow
@pytest.mark.parametrize("scale", [0.05, 0.3])
@pytest.mark.parametrize("causal", [False, True])
def test_sparsemax_near_uniform_rows_match_dense(scale, causal):
    """α = 2 rows whose support is (nearly) every entry: the root sits at the Jensen bound, and
    Newton steps that undershoot the bracket go to its lower end instead of bisecting (with plain
    bisection 6 passes left outputs up to 1e-2 off)."""
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.normal(size=(1, 96, 2, 16)) * np.sqrt(scale), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(1, 96, 2, 16)), jnp.float32)
    kw = dict(alpha=2.0, is_causal=causal)
    out = entmax_attention(q, k, v, implementation="pallas", block_sizes=BlockSizes(32, 32), **kw)
    ref = entmax_attention(q, k, v, implementation="xla", **kw)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)
