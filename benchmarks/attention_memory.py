"""Compiled memory of entmax attention forward+backward: Pallas kernels vs the dense XLA path.

Uses XLA's own accounting (``jax.jit(f).lower(...).compile().memory_analysis()``) of one
training-style step (output and dq, dk, dv) at growing sequence lengths, so nothing has to
fit in memory to be measured. On a CPU machine the Pallas kernels are compiled in interpret
mode, which keeps their O(L) working set; on a GPU the real Triton kernels are measured.

    python benchmarks/attention_memory.py                       # L = 2k, 4k, 8k, 16k
    python benchmarks/attention_memory.py --lengths 1024 2048   # quicker

Target: Pallas grows linearly (≤ 9× from 2k to 16k) while dense grows quadratically.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from adasplash_jax import entmax_attention


def step_memory(impl: str, L: int, batch: int, heads: int, head_dim: int, dtype) -> int:
    shape = jax.ShapeDtypeStruct((batch, L, heads, head_dim), dtype)

    def loss(q, k, v):
        out = entmax_attention(q, k, v, is_causal=True, implementation=impl)
        return out.astype(jnp.float32).sum()

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape).compile()
    mem = compiled.memory_analysis()
    # Peak-relevant bytes: arguments + outputs + temporaries (aliases counted once).
    return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
               - mem.alias_size_in_bytes)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)

    print(f"backend={jax.default_backend()}  batch={args.batch} heads={args.heads} head_dim={args.head_dim} "
          f"dtype={args.dtype}  causal  forward+backward")
    print(f"{'L':>7} | {'pallas MiB':>11} | {'dense MiB':>11} | {'dense/pallas':>12}")
    print("-" * 52)
    rows = []
    for L in args.lengths:
        pallas = step_memory("pallas", L, args.batch, args.heads, args.head_dim, dtype)
        dense = step_memory("xla", L, args.batch, args.heads, args.head_dim, dtype)
        rows.append((L, pallas, dense))
        print(f"{L:>7} | {pallas / 2**20:>11.1f} | {dense / 2**20:>11.1f} | {dense / pallas:>11.1f}x")
    if len(rows) > 1:
        (l0, p0, d0), (l1, p1, d1) = rows[0], rows[-1]
        print(f"\ngrowth from L={l0} to L={l1} ({l1 / l0:.0f}x longer): pallas {p1 / p0:.1f}x, dense {d1 / d0:.1f}x "
              f"(linear would be {l1 / l0:.0f}x, quadratic {(l1 / l0) ** 2:.0f}x)")


if __name__ == "__main__":
    main()
