"""Entmax attention on a GPU: AdaSplash Pallas kernels vs softmax flash attention and dense entmax.

Times forward and forward+backward (medians of jit-compiled runs, one process, side by side) for
    cudnn         jax.nn.dot_product_attention(implementation="cudnn")        softmax
    pallas_mha    jax.experimental.pallas.ops.gpu.attention.mha               softmax
    entmax_dense  adasplash_jax.entmax_attention(implementation="xla")        α-entmax, scores materialised
    adasplash     adasplash_jax.entmax_attention(implementation="pallas")     α-entmax, zero tiles skipped
    adasplash_8w  the same kernels with every τ and backward kernel at 8 warps (GPU only, 32 < d ≤ 128:
                  the launch before the 4-warp defaults, whose lost occupancy the cost model cannot price)
at several lengths, causal and not, with inputs scaled for low and high sparsity, and prints the
block sparsity (fraction of tiles the kernels skip) and the ratios to cuDNN.

    python benchmarks/attention_gpu.py                      # L = 1k, 4k, 16k, bf16, d = 64
    python benchmarks/attention_gpu.py --lengths 1024 --reps 5

On a machine without a GPU it still runs (tiny lengths advised) with the softmax peers that
exist there and the Pallas kernels in interpret mode — useful only to check the script.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp

from adasplash_jax import BlockSizes, entmax_attention, entmax_attention_with_stats


def median_ms(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def implementations(causal: bool, alpha: float, head_dim: int, on_gpu: bool):
    impls = {}
    if on_gpu:
        impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
        from jax.experimental.pallas.ops.gpu import attention as pallas_softmax

        def pallas_mha(q, k, v):
            return pallas_softmax.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=causal)

        impls["pallas_mha"] = pallas_mha
    else:
        impls["xla_softmax"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    impls["entmax_dense"] = lambda q, k, v: entmax_attention(q, k, v, alpha=alpha, is_causal=causal,
                                                             implementation="xla")
    impls["adasplash"] = lambda q, k, v: entmax_attention(q, k, v, alpha=alpha, is_causal=causal,
                                                          implementation="pallas")
    if on_gpu and 32 < head_dim <= 128:  # d ≤ 32 had 4-warp τ and backward kernels before too
        eight = dataclasses.replace(BlockSizes.for_head_dim(head_dim, alpha), tau_num_warps=8,
                                    tau_num_stages=1 if head_dim <= 64 else 2, backward_num_warps=8)
        impls["adasplash_8w"] = lambda q, k, v: entmax_attention(q, k, v, alpha=alpha, is_causal=causal,
                                                                 implementation="pallas", block_sizes=eight)
    return impls


def forward_backward(fn):
    def loss(q, k, v):
        return fn(q, k, v).astype(jnp.float32).sum()

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=1.5)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--input-scales", type=float, nargs="+", default=[1.0, 4.0],
                        help="multipliers of q and k: larger = more peaked scores = sparser attention")
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    parser.add_argument("--skip", nargs="*", default=[], help="implementations to leave out, e.g. entmax_dense")
    args = parser.parse_args()
    causal_modes = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16
    print(f"device={jax.devices()[0].device_kind}  batch={args.batch} heads={args.heads} "
          f"head_dim={args.head_dim} bf16 α={args.alpha}  times: median of {args.reps} (ms)")
    baseline = "cudnn" if on_gpu else "xla_softmax"
    header = (f"{'L':>6} {'causal':>6} {'x-scale':>7} {'tiles skipped':>13} {'impl':>12} | {'fwd ms':>9} "
              f"{'fwd+bwd ms':>10} | {'fwd / ' + baseline:>16} {'f+b / ' + baseline:>16}")
    print(header)
    print("-" * len(header))
    for L in args.lengths:
        for causal in causal_modes:
            for x_scale in args.input_scales:
                keys = jax.random.split(jax.random.key(L), 3)
                shape = (args.batch, L, args.heads, args.head_dim)
                q = (jax.random.normal(keys[0], shape) * x_scale).astype(dtype)
                k = (jax.random.normal(keys[1], shape) * x_scale).astype(dtype)
                v = jax.random.normal(keys[2], shape).astype(dtype)
                _, stats = jax.jit(lambda q, k, v: entmax_attention_with_stats(
                    q, k, v, alpha=args.alpha, is_causal=causal, implementation="pallas"))(q, k, v)
                skipped = 1.0 - float(jnp.mean(stats.active_tile_fraction))
                results = {}
                for name, fn in implementations(causal, args.alpha, args.head_dim, on_gpu).items():
                    if name in args.skip:
                        continue
                    try:
                        fwd = median_ms(jax.jit(fn), q, k, v, reps=args.reps)
                        fwdbwd = median_ms(forward_backward(fn), q, k, v, reps=args.reps)
                    except Exception as exc:  # out of memory for dense paths at long L, etc.
                        print(f"{L:>6} {str(causal):>6} {x_scale:>7} {skipped:>13.1%} {name:>12} | "
                              f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:60]}")
                        continue
                    results[name] = (fwd, fwdbwd)
                    base = results.get(baseline)
                    ratio = (f"{fwd / base[0]:>16.2f} {fwdbwd / base[1]:>16.2f}" if base else f"{'-':>16} {'-':>16}")
                    print(f"{L:>6} {str(causal):>6} {x_scale:>7} {skipped:>13.1%} {name:>12} | {fwd:>9.2f} "
                          f"{fwdbwd:>10.2f} | {ratio}")


if __name__ == "__main__":
    main()
