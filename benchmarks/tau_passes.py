"""Passes of the τ kernel per query block, with and without the histogram start, side by side.

Each pass recomputes every visible Q·Kᵀ tile, so passes per visible tile are the τ kernel's cost.
The kernel runs as compiled on a GPU, or in interpret mode on a CPU (the pass count is the same:
it is decided by the rows, not the hardware). Rows: queries and keys with normal entries, the
queries scaled to set the temperature; causal. Also prints the largest difference of the output
from the dense path, so fewer passes are never bought with accuracy.

    python benchmarks/tau_passes.py            # L = 512, head dim 64: ~4 min on 2 CPU cores
    python benchmarks/tau_passes.py --length 4096
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from adasplash_jax import entmax_attention
from adasplash_jax.inputs import check_attention_inputs
from adasplash_jax.kernels.config import BlockSizes
from adasplash_jax.kernels.debug import tile_visits


def passes_and_error(q, k, v, alpha, block_sizes):
    inp = check_attention_inputs(q, k, v, alpha=alpha, mask=None, is_causal=True, scale=None, query_seq_lengths=None,
                                 key_value_seq_lengths=None, segment_ids=None)
    visits = tile_visits(inp, jnp.zeros_like(q), block_sizes=block_sizes)
    out = entmax_attention(q, k, v, alpha=alpha, is_causal=True, implementation="pallas", block_sizes=block_sizes)
    ref = entmax_attention(q, k, v, alpha=alpha, is_causal=True, implementation="xla")
    passes = np.asarray(visits["tau_passes"])
    return passes, float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--alphas", default="1.5,2,1.25,1.8")
    parser.add_argument("--scales", default="0.3,1,3", help="query scales (temperature)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    L, H, N = args.length, args.head_dim, args.heads
    base = BlockSizes.for_head_dim(H)
    print(f"# τ kernel solver passes per query block (after the max pass), causal, L = {L}, head dim {H}, "
          f"{N} heads, float32, backend {jax.default_backend()}")
    print("| α | query scale | passes, analytic start (mean / max) | passes, histogram start (mean / max) "
          "| ratio of means | max |out − dense|, analytic / histogram |")
    print("| --- | --- | --- | --- | --- | --- |")
    for alpha in (float(a) for a in args.alphas.split(",")):
        for scale in (float(s) for s in args.scales.split(",")):
            q = jnp.asarray(rng.standard_normal((1, L, N, H)) * scale, jnp.float32)
            k = jnp.asarray(rng.standard_normal((1, L, N, H)), jnp.float32)
            v = jnp.asarray(rng.standard_normal((1, L, N, H)), jnp.float32)
            without, err_without = passes_and_error(q, k, v, alpha, dataclasses.replace(base, histogram_start=False))
            with_hist, err_with = passes_and_error(q, k, v, alpha, base)
            print(f"| {alpha:g} | {scale:g} | {without.mean():.2f} / {without.max()} | {with_hist.mean():.2f} / "
                  f"{with_hist.max()} | {with_hist.mean() / without.mean():.2f} | {err_without:.1e} / {err_with:.1e} |",
                  flush=True)
    print("Total τ passes per visible tile = 1 (max + histogram) + the solver passes above.")


if __name__ == "__main__":
    main()
