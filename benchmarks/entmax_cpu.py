"""Entmax forward+backward on the CPU: adasplash-jax vs the PyPI `entmax` package vs softmax.

Every timed call computes the forward and the backward pass (a vector-Jacobian product
with a fixed random cotangent) of one [rows, cols] float32 matrix, on the last axis.
JAX functions are jit-compiled and warmed up first; PyTorch runs eagerly (as the package
is used). Methods are timed round-robin in the same process, each PyPI method right
after the first JAX method it is compared with, so load from other processes affects a
pair alike. In each round a method runs once untimed, then ``--calls`` times back to
back. The table gives each method's median call; a speed-up is the median over rounds of
that round's ratio (the peer's median call over ours), with the range over rounds.

Back-to-back calls measure each method as a training loop runs it. A call that follows
other work, or an idle gap, pays for waking the thread pool and for page-faulting the
output buffers that glibc returned to the OS in between; on the 2-core CI machine that
roughly doubles a 10 ms JAX call (sparsemax: 9.5 ms back to back, 17–21 ms after a 0.2 s
sleep or after another method) and hardly shows on a 150 ms PyTorch call.

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
    ap.add_argument("--repeats", type=int, default=7, help="round-robin rounds")
    ap.add_argument("--calls", type=int, default=5, help="back-to-back calls per method and round")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyPI entmax package")
    ap.add_argument("--skip-slow", action="store_true", help="skip torch entmax_bisect (slowest)")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    x_np = (args.scale * rng.standard_normal((args.rows, args.cols))).astype(np.float32)
    g_np = rng.standard_normal((args.rows, args.cols)).astype(np.float32)
    x, g = jnp.asarray(x_np), jnp.asarray(g_np)

    def jax_entmax(alpha, solver="auto"):
        return jax_fwd_bwd(lambda v: entmax(v, alpha, solver=solver)), x, g

    jax_methods: dict[str, tuple] = {
        "jax softmax": (jax_fwd_bwd(lambda v: jax.nn.softmax(v, axis=-1)), x, g),
        "jax entmax a=1.5 (auto)": jax_entmax(1.5),
        "jax entmax a=2 (auto)": jax_entmax(2.0),
        "jax entmax a=1.25 (auto)": jax_entmax(1.25),
        "jax entmax a=1.5 (histogram)": jax_entmax(1.5, "histogram"),
        "jax entmax a=1.5 (bisect)": jax_entmax(1.5, "bisect"),
        "jax entmax a=1.5 (sort)": jax_entmax(1.5, "sort"),
        "jax entmax a=2 (sort)": jax_entmax(2.0, "sort"),
    }
    pairs = [
        ("jax softmax", "torch softmax"),
        ("jax entmax a=1.5 (auto)", "torch entmax15"),
        ("jax entmax a=1.5 (auto)", "torch entmax_bisect a=1.5"),
        ("jax entmax a=1.5 (histogram)", "torch entmax15"),
        ("jax entmax a=2 (auto)", "torch sparsemax"),
        ("jax entmax a=1.25 (auto)", "torch entmax_bisect a=1.25"),
    ]
    torch_methods: dict[str, tuple] = {}
    if not args.no_torch:
        import entmax as pypi_entmax
        import torch

        xt, gt = torch.from_numpy(x_np), torch.from_numpy(g_np)
        torch_methods["torch softmax"] = (torch_fwd_bwd(lambda v: torch.softmax(v, dim=-1)), xt, gt)
        torch_methods["torch entmax15"] = (torch_fwd_bwd(lambda v: pypi_entmax.entmax15(v, dim=-1)), xt, gt)
        torch_methods["torch sparsemax"] = (torch_fwd_bwd(lambda v: pypi_entmax.sparsemax(v, dim=-1)), xt, gt)
        if not args.skip_slow:
            torch_methods["torch entmax_bisect a=1.5"] = (
                torch_fwd_bwd(lambda v: pypi_entmax.entmax_bisect(v, 1.5, dim=-1)), xt, gt)
            torch_methods["torch entmax_bisect a=1.25"] = (
                torch_fwd_bwd(lambda v: pypi_entmax.entmax_bisect(v, 1.25, dim=-1)), xt, gt)
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; ", end="")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; input {args.rows}x{args.cols} float32, "
          f"scores ~ N(0, {args.scale}^2); forward+backward; {args.repeats} rounds "
          f"x {args.calls} back-to-back calls")

    # Each PyPI method runs right after the first JAX method it is compared with.
    methods: dict[str, tuple] = {}
    for name, method in jax_methods.items():
        methods[name] = method
        methods.update({b: torch_methods[b] for a, b in pairs if a == name and b in torch_methods})
    for fn, a, b in methods.values():  # compile + warm up
        fn(a, b)
        fn(a, b)
    # times[name][round]: the seconds of that round's back-to-back calls.
    times: dict[str, list[list[float]]] = {k: [] for k in methods}
    for _ in range(args.repeats):
        for name, (fn, a, b) in methods.items():
            fn(a, b)  # untimed: the first call after another method pays the switch
            calls = []
            for _ in range(args.calls):
                t0 = time.perf_counter()
                fn(a, b)
                calls.append(time.perf_counter() - t0)
            times[name].append(calls)
    med = {k: 1e3 * float(np.median(np.concatenate(v))) for k, v in times.items()}

    soft = med["jax softmax"]
    print()
    print(f"| {'method':<30} | {'median ms':>9} | {'/ jax softmax':>13} |")
    print(f"|{'-' * 32}|{'-' * 11}|{'-' * 15}|")
    for name in jax_methods | torch_methods:
        print(f"| {name:<30} | {med[name]:9.2f} | {med[name] / soft:12.2f}x |")
    rows = [(a, b) for a, b in pairs if b in med]
    if rows:
        print()
        print("speed-up: in each round, the peer's median call over ours; median over rounds (range)")
        print(f"| {'adasplash-jax':<28} | {'PyPI entmax / torch':<28} | {'speed-up':>8} | {'rounds':>13} |")
        print(f"|{'-' * 30}|{'-' * 30}|{'-' * 10}|{'-' * 15}|")
        for a, b in rows:
            ratios = [np.median(tb) / np.median(ta) for ta, tb in zip(times[a], times[b])]
            spread = f"{min(ratios):.1f}-{max(ratios):.1f}x"
            print(f"| {a:<28} | {b:<28} | {np.median(ratios):7.1f}x | {spread:>13} |")


if __name__ == "__main__":
    main()
