"""Entmax forward+backward on the CPU: adasplash-jax vs the PyPI `entmax` package vs softmax.

Every timed call computes the forward and the backward pass (a vector-Jacobian product
with a fixed random cotangent) of one [rows, cols] float32 matrix, on the last axis.
JAX functions are jit-compiled and warmed up first; PyTorch runs eagerly (as the package
is used). All methods are timed round-robin in the same process (so load from other
processes affects them alike) and the medians are reported, with ratios.

    python benchmarks/entmax_cpu.py                      # 2048 x 2048, the issue's size
    python benchmarks/entmax_cpu.py --rows 256 --cols 512 --repeats 5   # quick
"""

from __future__ import annotations

import argparse
import os
import time

# PyTorch's OpenMP workers otherwise spin after each op and take the (2) cores from the
# JAX calls timed right after them; sleeping workers cost torch nothing measurable here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


import jax
import jax.numpy as jnp
import numpy as np

from adasplash_jax.entmax import entmax


def jax_fwd_bwd(fn):
    @jax.jit
    def run(x, g):
        p, vjp = jax.vjp(fn, x)
        return p, vjp(g)[0]

    return lambda x, g: jax.block_until_ready(run(x, g))


def torch_fwd_bwd(fn):
    import torch

    def run(x, g):
        x = x.detach().requires_grad_(True)
        p = fn(x)
        p.backward(g)
        return p, x.grad

    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--scale", type=float, default=3.0, help="std of the N(0, scale²) scores")
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--no-torch", action="store_true", help="skip the PyPI entmax package")
    ap.add_argument("--skip-slow", action="store_true", help="skip torch entmax_bisect (slowest)")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    x_np = (args.scale * rng.standard_normal((args.rows, args.cols))).astype(np.float32)
    g_np = rng.standard_normal((args.rows, args.cols)).astype(np.float32)
    x, g = jnp.asarray(x_np), jnp.asarray(g_np)

    methods: dict[str, tuple] = {
        "jax softmax": (jax_fwd_bwd(lambda v: jax.nn.softmax(v, axis=-1)), x, g),
        "jax entmax a=1.5 (auto)": (jax_fwd_bwd(lambda v: entmax(v, 1.5)), x, g),
        "jax entmax a=1.5 (sort)": (jax_fwd_bwd(lambda v: entmax(v, 1.5, solver="sort")), x, g),
        "jax entmax a=1.5 (histogram)": (jax_fwd_bwd(lambda v: entmax(v, 1.5, solver="histogram")), x, g),
        "jax entmax a=2 (auto)": (jax_fwd_bwd(lambda v: entmax(v, 2.0)), x, g),
        "jax entmax a=2 (sort)": (jax_fwd_bwd(lambda v: entmax(v, 2.0, solver="sort")), x, g),
        "jax entmax a=1.25 (auto)": (jax_fwd_bwd(lambda v: entmax(v, 1.25)), x, g),
        "jax entmax a=1.5 (bisect)": (jax_fwd_bwd(lambda v: entmax(v, 1.5, solver="bisect")), x, g),
    }
    pairs = [
        ("jax entmax a=1.5 (auto)", "torch entmax15"),
        ("jax entmax a=1.5 (auto)", "torch entmax_bisect a=1.5"),
        ("jax entmax a=1.5 (histogram)", "torch entmax15"),
        ("jax entmax a=2 (auto)", "torch sparsemax"),
        ("jax entmax a=1.25 (auto)", "torch entmax_bisect a=1.25"),
        ("jax softmax", "torch softmax"),
    ]
    if not args.no_torch:
        import entmax as pypi_entmax
        import torch

        xt, gt = torch.from_numpy(x_np), torch.from_numpy(g_np)
        methods["torch softmax"] = (torch_fwd_bwd(lambda v: torch.softmax(v, dim=-1)), xt, gt)
        methods["torch entmax15"] = (torch_fwd_bwd(lambda v: pypi_entmax.entmax15(v, dim=-1)), xt, gt)
        methods["torch sparsemax"] = (torch_fwd_bwd(lambda v: pypi_entmax.sparsemax(v, dim=-1)), xt, gt)
        if not args.skip_slow:
            methods["torch entmax_bisect a=1.5"] = (
                torch_fwd_bwd(lambda v: pypi_entmax.entmax_bisect(v, 1.5, dim=-1)), xt, gt)
            methods["torch entmax_bisect a=1.25"] = (
                torch_fwd_bwd(lambda v: pypi_entmax.entmax_bisect(v, 1.25, dim=-1)), xt, gt)
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; ", end="")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; input {args.rows}x{args.cols} float32, "
          f"scores ~ N(0, {args.scale}^2); forward+backward; median of {args.repeats}")

    for fn, a, b in methods.values():  # compile + warm up
        fn(a, b)
        fn(a, b)
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(args.repeats):
        for name, (fn, a, b) in methods.items():
            t0 = time.perf_counter()
            fn(a, b)
            times[name].append(time.perf_counter() - t0)
    med = {k: 1e3 * float(np.median(v)) for k, v in times.items()}

    soft = med["jax softmax"]
    print()
    print(f"| {'method':<30} | {'median ms':>9} | {'/ jax softmax':>13} |")
    print(f"|{'-' * 32}|{'-' * 11}|{'-' * 15}|")
    for name, ms in med.items():
        print(f"| {name:<30} | {ms:9.2f} | {ms / soft:12.2f}x |")
    rows = [(a, b) for a, b in pairs if a in med and b in med]
    if rows:
        print()
        print(f"| {'adasplash-jax':<28} | {'PyPI entmax / torch':<28} | {'speed-up':>8} |")
        print(f"|{'-' * 30}|{'-' * 30}|{'-' * 10}|")
        for a, b in rows:
            print(f"| {a:<28} | {b:<28} | {med[b] / med[a]:7.1f}x |")


if __name__ == "__main__":
    main()
