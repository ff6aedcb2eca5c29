"""Passes of the τ kernel per query block, with and without the histogram start, side by side.

The max pass visits every visible tile and marks those whose top score may reach the support;
each solver pass recomputes the Q·Kᵀ tiles marked before it (and marks the block mask for the
next), so its cost is the marked tiles, close to the active ones at high sparsity. Printed per
query block: the solver passes (mean / max), the tiles all solver passes visited per visible
tile, and per pass the marked tiles over the active ones (the block mask at the final τ; 1.00
when the marks are exactly the active tiles). The kernel runs as compiled on a GPU, or in
interpret mode on a CPU (the counts are the same: they are decided by the rows, not the
hardware). Rows: causal; queries and keys with normal entries, the queries scaled to set the
temperature; with ``--local`` the keys are an AR(1) sequence (correlation 0.98 from one position
to the next) and each query a scaled copy of its own key plus noise, so attention is local and
tiles far from the diagonal are inactive. Also prints the largest difference of the output from
the dense path, so fewer passes are never bought with accuracy, and the fraction of max-pass tiles
on which the histogram started a row's grid (the max pass's one branch: histogram.grid_started;
one tile per query block), which is why benchmarks/kernel_cost.py charges the branch's
instructions once per query block.

    python benchmarks/tau_passes.py            # L = 512, head dim 64: ~4 min on 2 CPU cores
    python benchmarks/tau_passes.py --local --length 1024
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from adasplash_jax import entmax_attention
from adasplash_jax.inputs import check_attention_inputs
from adasplash_jax.kernels.config import BlockSizes, local_compute_capability
from adasplash_jax.kernels.debug import tile_visits


def passes_and_error(q, k, v, alpha, block_sizes):
    inp = check_attention_inputs(q, k, v, alpha=alpha, mask=None, is_causal=True, scale=None, query_seq_lengths=None,
                                 key_value_seq_lengths=None, segment_ids=None)
    visits = tile_visits(inp, jnp.zeros_like(q), block_sizes=block_sizes)
    out = entmax_attention(q, k, v, alpha=alpha, is_causal=True, implementation="pallas", block_sizes=block_sizes)
    ref = entmax_attention(q, k, v, alpha=alpha, is_causal=True, implementation="xla")
    passes = np.asarray(visits["tau_passes"])
    solver_tiles = float(np.sum(visits["tau_solver"]))
    per_visible = solver_tiles / float(np.sum(visits["tau"]))
    per_active = solver_tiles / float(np.sum(passes * np.asarray(visits["block_mask"]).sum(-1)))
    grid_start_rate = float(np.sum(visits["tau_grid_starts"])) / float(np.sum(visits["tau"]))
    return passes, per_visible, per_active, grid_start_rate, float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))


def inputs(rng, L, N, H, scale, local):
    if not local:
        q, k = rng.standard_normal((1, L, N, H)) * scale, rng.standard_normal((1, L, N, H))
    else:
        rho = 0.98
        e = rng.standard_normal((1, L, N, H))
        k = np.empty_like(e)
        k[:, 0] = e[:, 0]
        for t in range(1, L):
            k[:, t] = rho * k[:, t - 1] + np.sqrt(1 - rho * rho) * e[:, t]
        q = k * scale + 0.3 * rng.standard_normal(k.shape)
    v = rng.standard_normal((1, L, N, H))
    return (jnp.asarray(a, jnp.float32) for a in (q, k, v))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--alphas", default="1.5,2,1.25,1.8")
    parser.add_argument("--scales", default="0.3,1,3", help="query scales (temperature)")
    parser.add_argument("--local", action="store_true", help="AR(1) keys, queries near their own key")
    parser.add_argument("--compute-capability", type=int, default=None,
                        help="the block sizes the library picks on this GPU (e.g. 90: no Jensen row sum); "
                             "default: this machine's GPU, or an unknown one's")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    L, H, N = args.length, args.head_dim, args.heads
    cc = args.compute_capability if args.compute_capability is not None else local_compute_capability()
    base = BlockSizes.for_head_dim(H, None, cc)
    print(f"# τ kernel solver passes per query block (after the max pass), causal, L = {L}, head dim {H}, "
          f"{N} heads, float32, {'local' if args.local else 'normal'} inputs, backend {jax.default_backend()}, "
          f"block sizes for compute capability {cc} (Jensen row sum {'on' if base.jensen_bound else 'off'})")
    print("| α | query scale | passes, analytic start (mean / max) | passes, histogram start (mean / max) "
          "| ratio of means | solver tiles per visible tile | marked / active per pass "
          "| max-pass tiles with a grid start | max |out − dense|, analytic / histogram |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for alpha in (float(a) for a in args.alphas.split(",")):
        for scale in (float(s) for s in args.scales.split(",")):
            q, k, v = inputs(rng, L, N, H, scale, args.local)
            without, _, _, _, err_without = passes_and_error(q, k, v, alpha,
                                                             dataclasses.replace(base, histogram_start=False))
            with_hist, per_visible, per_active, grid_start_rate, err_with = passes_and_error(q, k, v, alpha, base)
            print(f"| {alpha:g} | {scale:g} | {without.mean():.2f} / {without.max()} | {with_hist.mean():.2f} / "
                  f"{with_hist.max()} | {with_hist.mean() / without.mean():.2f} | {per_visible:.2f} | "
                  f"{per_active:.2f} | {grid_start_rate:.3f} | {err_without:.1e} / {err_with:.1e} |", flush=True)
    print("τ tile visits per visible tile = 1 (the max pass) + the solver tiles above (histogram start).")


if __name__ == "__main__":
    main()
