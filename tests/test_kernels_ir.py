"""The kernels' pass structure and per-tile work, read from their Triton IR lowered for CUDA (no GPU).

Per visible tile the τ kernel does one max pass (which also builds the histogram start and marks
the tiles that may reach the support); the solver passes visit only the tiles marked before them.
Each solver pass also marks the block mask (no final pass); each pass is split into an
interior loop, whose tiles need no keep mask, and a boundary loop. Between them two row-level loops
solve the histogram's models (no tile work). The forward and backward kernels loop over active
tiles the same way.
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import pytest

from adasplash_jax import BlockSizes, entmax_attention
from adasplash_jax.kernels.ir_stats import kernel_ir, loop_stats


@functools.lru_cache(maxsize=None)
def kernels(alpha, causal=True, L=1024, H=64):
    structs = [jax.ShapeDtypeStruct((1, L, 4, H), jnp.bfloat16)] * 3
    f = functools.partial(entmax_attention, is_causal=causal, alpha=alpha, implementation="pallas", interpret=False)
    texts = kernel_ir(jax.grad(lambda q, k, v: f(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)), *structs)
    return {name: loop_stats(text) for name, text in texts.items()}


@pytest.mark.parametrize("alpha", [1.5, 1.8, 2.0])
def test_pass_structure(alpha):
    st = kernels(alpha)
    assert set(st) == {"entmax_threshold", "entmax_attention_forward", "entmax_attention_dkdv",
                       "entmax_attention_dq"}
    tau = st["entmax_threshold"]
    # Max + histogram pass over every reachable tile, then the solver passes over the tiles marked
    # before them (each solver pass marks the block mask): each an interior and a boundary loop
    # with one Q·Kᵀ matmul. Between them the two model bisections: row vectors only.
    assert [b.dots for b in tau.loops] == [1, 1, 0, 0, 1, 1]
    assert tau.dots == 4
    for model in tau.loops[2:4]:
        assert model.tile_float == model.tile_int == model.reductions == model.loads == 0
    # Forward with Õ: Q·Kᵀ, P·V, U·V per tile; dK/dV 4; dQ 3 — in an interior and a boundary loop.
    for name, dots in (("entmax_attention_forward", 3), ("entmax_attention_dkdv", 4), ("entmax_attention_dq", 3)):
        assert [b.dots for b in st[name].loops] == [dots, dots], name
    # Interior loops skip the keep mask: fewer tile-wide integer ops than their boundary twins
    # (the τ kernel's max pass runs from the diagonal down: its boundary loop comes first).
    for name, s in st.items():
        loops = [b for b in s.loops if b.dots]
        if name == "entmax_threshold":
            loops[:2] = loops[1::-1]
        for interior, boundary in zip(loops[::2], loops[1::2]):
            assert interior.tile_int < boundary.tile_int, name


def test_general_alpha_powers_are_single_instructions():
    """Non-polynomial α: one lg2 and one ex2 per power on the GPU (inline PTX), never libdevice's expf/logf."""
    for name, st in kernels(1.8).items():
        for body in st.loops[2:] if name == "entmax_threshold" else st.loops:  # past the max pass
            calls = sorted(c.split(".")[0] for c in body.calls)
            if not body.dots:  # a histogram model: z^c0 of each bin edge, one lg2 and one ex2 each
                assert calls and calls == sorted(["ex2", "lg2"] * (len(calls) // 2)), (name, body.calls)
                continue
            # (and x − τ as one fma per entry; the τ kernel forms each row's top z at lo for its
            # block mask with the same fma, on the row max)
            want = ["ex2", "ex2", "fma", "fma", "lg2"] if name == "entmax_threshold" else ["ex2", "fma", "lg2"]
            assert calls == want, (name, body.calls)


# The combiner of a row reduction whose max keeps NaN (maxnumf would drop it).
_NAN_KEEPING_REDUCE = re.compile(r"arith\.maximumf %arg\d+, %arg\d+ : f32")


@pytest.mark.parametrize("jensen_bound", [False, True])
def test_the_tau_max_pass_keeps_nan_in_the_row_max_without_the_jensen_sum(jensen_bound):
    """On the GPU Pallas' row max reduces with maxnumf, which drops a NaN score. Without the Jensen
    row sum (the sm_90 block sizes) the τ kernel's row max is its NaN detector (a NaN row must
    come out NaN), so its max pass (interior and boundary loop) reduces with maximumf, and only
    there: the other reductions keep maxnumf (a block-wide one must not let a bad row's NaN reach
    the others). With the sum (an unknown GPU's block sizes) the sum detects NaN, no maximumf reduction."""
    structs = [jax.ShapeDtypeStruct((1, 1024, 4, 64), jnp.bfloat16)] * 3
    sizes = dataclasses.replace(BlockSizes.for_head_dim(64, 1.5, 90), jensen_bound=jensen_bound)
    f = functools.partial(entmax_attention, is_causal=True, alpha=1.5, implementation="pallas", interpret=False,
                          block_sizes=sizes)
    texts = kernel_ir(f, *structs)
    tau = texts["entmax_threshold"]
    assert len(_NAN_KEEPING_REDUCE.findall(tau)) == (0 if jensen_bound else 2)
    assert "arith.maxnumf" in tau
    for name, text in texts.items():
        if name != "entmax_threshold":
            assert not _NAN_KEEPING_REDUCE.search(text), name
