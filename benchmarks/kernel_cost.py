"""A cost model of the AdaSplash Pallas kernels against FlashAttention-2, from their compiled code.

The kernels are compiled ahead of time for the target (``adasplash_jax.aot``; needs the `aot` extra,
no GPU). From the SASS of each kernel come the instructions and the tensor-core FLOPs of one
iteration of each innermost loop (one block_q × block_k tile); the pass structure says how many
tiles each loop visits. Every pass is two loops, one over interior tiles (no keep mask) and one over
boundary tiles (the causal diagonal: one per query or key block):

    τ kernel      max + histogram pass over every *visible* tile (the causal triangle, or all
                  tiles), from the diagonal down, which also marks the tiles whose top score may
                  reach the support; then the solver passes over the *marked* tiles (each pass
                  marks the block mask, which the next pass visits): about the active tiles
                  (× --marked-over-active, measured by benchmarks/tau_passes.py --local); between
                  them two row-level loops (the histogram models' bisections, 12 steps each: fewer
                  machine iterations where ptxas unrolled them, read off the loop counter's step),
                  once per query block.
                  The max pass's one branch, the histogram's grid start (SASS: the instructions a
                  predicated forward branch in the loop jumps over), runs on a query block's first
                  tile only (benchmarks/tau_passes.py counts it): charged once per query block, or
                  on every tile with --static-branches (the static count)
    forward       one pass over the *active* tiles (those holding a non-zero probability)
    dK/dV, dQ     one pass each over the active tiles

The solver passes per query block depend on the rows (the loop stops when every row has converged);
the default is what benchmarks/tau_passes.py measured on normal scores at L = 512 (α = 1.5: 3,
α = 2: 4, other α: 3 to 4; mean over three temperatures, rounded up).
    FlashAttention-2: 2 (forward) + 5 (backward) QKᵀ-sized matmuls per visible tile, at its
                  published fraction of the tensor-core peak

A kernel's time is max(issue, tensor, memory): issue = warp instructions / (issue rate × SMs ×
clock); tensor = FLOPs / peak; memory = compulsory HBM traffic / bandwidth (every operand read and
written once). The three overlap fully inside a kernel, kernels run back to back, and wave
quantisation, launch gaps and the index-list build (an argsort of the block mask) are ignored.
Block sparsity s is the fraction of visible tiles that are inactive.

    python benchmarks/kernel_cost.py                        # H100 model, L = 4k, 8k, 16k, d = 64, 128
    python benchmarks/kernel_cost.py --target sm_80         # A100
    python benchmarks/kernel_cost.py --alpha 2.0 --lengths 8192

On a GPU (jax.default_backend() == "gpu") it also times the real kernels and cuDNN's softmax
attention (inputs scaled to reach several sparsities) and prints each measurement beside the
estimate for the sparsity the τ kernel reports, so the model is calibrated the first time a GPU is lent.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Without a GPU, keep this process on the CPU: a CUDA plugin (the aot extra) would otherwise fail to
# initialise at the first backend call and log a cuDNN traceback. The compiles run in their own processes.
if "JAX_PLATFORMS" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["JAX_PLATFORMS"] = "cpu"

import adasplash_jax  # noqa: E402
from adasplash_jax import aot  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    peak_flops: float  # dense bf16 tensor-core FLOP/s
    issue_per_cycle: int  # warp instructions per cycle per SM (one per scheduler)
    sms: int
    clock_hz: float
    hbm_bytes_s: float
    fa2_efficiency: float  # FlashAttention-2's achieved fraction of peak_flops
    fa2_source: str


GPUS = {
    "sm_90": Gpu("H100 SXM", 989e12, 4, 132, 1.98e9, 3.35e12, 0.375,
                 "FlashAttention-2 on H100: 35-40% of the bf16 peak (FlashAttention-3 paper)"),
    "sm_80": Gpu("A100 SXM", 312e12, 4, 108, 1.41e9, 2.039e12, 0.60,
                 "FlashAttention-2 on A100: 50-73% of the bf16 peak (FlashAttention-2 paper)"),
}

# AdaSplash-2 (deep-spin/adasplash 0.2.2, adasplash_v2.py) compiled for sm_90 with pip triton:
# issue slots (SASS instructions per innermost-loop iteration × warps, scaled to a 64×64 tile),
# bf16, d = 64, causal, its 4-warp autotune entry. Source: shared/notes/adasplash.md §8 (measured
# 2026-12-01, not recompiled by this script).
ADASPLASH2_SLOTS = {"tau": 4343, "tau passes": "max 219, histogram 1,664, Halley 1,144, Halley+mask 1,316",
                    "forward": 1660, "dq": 1652, "dkdv": 2080}
# Tiles each τ solver pass visits per active tile (its marks: a superset of the block mask at the
# final τ), mean of `python benchmarks/tau_passes.py --local --length 1024 --alphas 1.5,2` (query
# scales 0.3, 1, 3: 1.55, 1.00, 1.00 for α = 1.5; 1.16, 1.00, 1.00 for α = 2; 2026-12-02).
MARKED_OVER_ACTIVE = 1.12
ADASPLASH2_MATMULS = {"tau": 4, "forward": 2, "dq": 3, "dkdv": 4}  # QKᵀ-sized matmuls per tile
# Published fwd+bwd times (ms), H100, causal: (L, block sparsity, FlashAttention-2 CUDA, AdaSplash-2).
ADASPLASH2_PUBLISHED = [(4096, 0.51, 3.1, 3.3), (8192, 0.58, 11, 11), (16384, 0.64, 42, 41),
                        (32768, 0.70, 160, 142), (65536, 0.75, 583, 461), (131072, 0.85, 2400, 1500)]


@dataclasses.dataclass
class KernelCost:
    label: str
    loops: list  # (instructions, mma FLOPs per warp, source iterations) per innermost loop and iteration
    num_warps: int
    block_q: int
    block_k: int
    once_per_program: int = 0  # instructions per warp run once per program (grid step), not per tile

    def slots_per_64x64(self, passes) -> float:
        scale = 64 * 64 / (self.block_q * self.block_k)
        return sum(n * lp[0] for n, lp in zip(passes, self.loops)) * self.num_warps * scale


def tile_counts(L: int, bq: int, bk: int, causal: bool) -> int:
    nq, nk = math.ceil(L / bq), math.ceil(L / bk)
    if not causal:
        return nq * nk
    return sum(min(nk, math.ceil(min(L, (i + 1) * bq) / bk)) for i in range(nq))


# The τ kernel's loops with a matmul, in address order: the max pass's boundary and interior loops
# (these two), then the solver pass's interior and boundary loops.
TAU_MAX_PASS_LOOPS = 2


def profiles(records, head_dim: int, static_branches: bool = False) -> dict:
    """KernelCost per kernel label. The τ kernel's max-pass loops (its first two with a matmul) hold
    one branch, the histogram's grid start, taken on a query block's first tile only
    (benchmarks/tau_passes.py counts it: one per query block): its guarded instructions are charged
    once per program, both loops' together, unless ``static_branches`` (every iteration, as the
    SASS's static count). Other kernels' guarded instructions are charged on every iteration."""
    bs = adasplash_jax.BlockSizes.for_head_dim(head_dim)
    out = {}
    for r in records:
        if r.variant.head_dim != head_dim:
            continue
        if r.error:
            raise RuntimeError(f"{r.id}: {r.error}")
        loops, once, mma_loops = [], 0, 0
        for lp in r.loops:
            n = lp.instructions
            if r.label == "tau" and lp.mma_flops and mma_loops < TAU_MAX_PASS_LOOPS and not static_branches:
                n, once = lp.unguarded, once + lp.guarded
            mma_loops += bool(lp.mma_flops)
            loops.append((n, lp.mma_flops, lp.unroll))
        out[r.label] = KernelCost(r.label, loops, r.num_warps, bs.block_q, bs.block_k, once)
    return out


def loop_visits(k: KernelCost, *, tiles: int, boundary: int, programs: int, solver_passes: int = 1,
                solver_tiles: float | None = None):
    """Iterations of each of a kernel's loops in one call: a pass is an interior loop (``tiles −
    boundary`` visits) and a boundary loop (``boundary``); the τ kernel's loops without matmuls
    (the histogram models' bisections) run ``BISECTIONS`` source iterations per program (fewer machine
    iterations where ptxas unrolled them: ``BISECTIONS / unroll``, rounded up); its first pass (max +
    histogram, boundary loop first) runs once over ``tiles`` and its second (the solver's)
    ``solver_passes`` times over ``solver_tiles`` (default: all ``tiles``)."""
    from adasplash_jax.kernels.histogram import BISECTIONS

    visits, mma_pass = [], 0
    for _, flops, unroll in k.loops:
        if flops == 0:
            visits.append(-(-BISECTIONS // unroll) * programs)
            continue
        if k.label != "tau":
            visits.append((tiles - boundary) if mma_pass % 2 == 0 else boundary)
        elif mma_pass < TAU_MAX_PASS_LOOPS:  # the max pass: from the diagonal down
            visits.append(boundary if mma_pass == 0 else tiles - boundary)
        else:
            marked = tiles if solver_tiles is None else solver_tiles
            visits.append(solver_passes * ((marked - boundary) if mma_pass % 2 == 0 else boundary))
        mma_pass += 1
    return visits


def interior_slots_per_64x64(k: KernelCost, solver_passes: int = 1, solver_fraction: float = 1.0) -> float:
    """Issue slots of one interior tile (a long sequence's typical tile), scaled to 64×64; for the
    τ kernel per visible tile, its solver passes visiting ``solver_fraction`` of the tiles."""
    visits = loop_visits(k, tiles=1, boundary=0, programs=0, solver_passes=solver_passes,
                         solver_tiles=solver_fraction)
    return k.slots_per_64x64(visits)


def issue_slots(k: KernelCost, visits, programs: int) -> float:
    """Warp instructions of one call: each loop's per-iteration count × its visits, plus the
    once-per-program instructions."""
    return (sum(n * lp[0] for n, lp in zip(visits, k.loops)) + programs * k.once_per_program) * k.num_warps


def kernel_time(gpu: Gpu, k: KernelCost, visits, bytes_moved: float, programs: int):
    slots = issue_slots(k, visits, programs)
    flops = sum(n * lp[1] for n, lp in zip(visits, k.loops)) * k.num_warps
    issue = slots / (gpu.issue_per_cycle * gpu.sms * gpu.clock_hz)
    tensor = flops / gpu.peak_flops
    memory = bytes_moved / gpu.hbm_bytes_s
    return max(issue, tensor, memory), dict(issue=issue, tensor=tensor, memory=memory)


def estimate(gpu: Gpu, prof: dict, *, L: int, d: int, bh: int, causal: bool, sparsity: float, solver_passes: int,
             marked_over_active: float = 1.0, itemsize: int = 2):
    """Estimated seconds: dict with tau, forward, backward (dkdv + dq), fa2_fwd, fa2_bwd."""
    tau = prof["tau"]
    visible = tile_counts(L, tau.block_q, tau.block_k, causal) * bh
    nq = math.ceil(L / tau.block_q) * bh
    nk = math.ceil(L / tau.block_k) * bh
    boundary = nq if causal else 0  # the diagonal tiles (block_q = block_k); always active
    active = max(boundary, round(visible * (1.0 - sparsity)))
    marked = min(visible, active * marked_over_active)
    x = bh * L * d * itemsize  # one [L, d] operand of every head

    def visits(name, tiles, programs):
        return loop_visits(prof[name], tiles=tiles, boundary=boundary, programs=programs, solver_passes=solver_passes,
                           solver_tiles=marked)

    t_tau, _ = kernel_time(gpu, tau, visits("tau", visible, nq), 2 * x, nq)
    t_fwd, _ = kernel_time(gpu, prof["forward+res"], visits("forward+res", active, nq),
                           3 * x + x + 2 * x, nq)  # q, k, v in; O (bf16) and Õ (fp32) out
    t_fwd_inf, _ = kernel_time(gpu, prof["forward"], visits("forward", active, nq), 4 * x, nq)
    t_dkdv, _ = kernel_time(gpu, prof["dkdv"], visits("dkdv", active, nk), 6 * x, nk)
    t_dq, _ = kernel_time(gpu, prof["dq"], visits("dq", active, nq), 5 * x, nq)
    fa2_tile_flops = 2 * tau.block_q * tau.block_k * d
    fa2_fwd = 2 * fa2_tile_flops * visible / (gpu.fa2_efficiency * gpu.peak_flops)
    fa2_bwd = 5 * fa2_tile_flops * visible / (gpu.fa2_efficiency * gpu.peak_flops)
    tau_slots = issue_slots(tau, visits("tau", visible, nq), nq)
    tau_slots_per_visible = tau_slots * 64 * 64 / (tau.block_q * tau.block_k) / visible
    return dict(tau=t_tau, forward=t_tau + t_fwd_inf, fwd_train=t_tau + t_fwd, backward=t_dkdv + t_dq,
                fa2_fwd=fa2_fwd, fa2_bwd=fa2_bwd, visible=visible, active=active,
                tau_slots_per_visible=tau_slots_per_visible)


def adasplash2_estimate(gpu: Gpu, *, L: int, bh: int, causal: bool, sparsity: float):
    """The same issue/tensor model fed AdaSplash-2's issue slots (d = 64 only)."""
    visible = tile_counts(L, 64, 64, causal) * bh
    active = max(math.ceil(L / 64) * bh, round(visible * (1.0 - sparsity)))
    tile_flops = 2 * 64 * 64 * 64

    def t(name, tiles):
        issue = ADASPLASH2_SLOTS[name] * tiles / (gpu.issue_per_cycle * gpu.sms * gpu.clock_hz)
        return max(issue, ADASPLASH2_MATMULS[name] * tile_flops * tiles / gpu.peak_flops)

    return t("tau", visible) + t("forward", active) + t("dq", active) + t("dkdv", active)


def measure(L, d, bh, causal, alpha, x_scale, reps=10):
    """On a GPU: block sparsity and median ms of ours (fwd, fwd+bwd) and cuDNN softmax (fwd, fwd+bwd)."""
    import jax
    import jax.numpy as jnp

    def median_ms(fn, *args):
        jax.block_until_ready(fn(*args))
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    heads = 16 if bh % 16 == 0 else bh
    shape = (bh // heads, L, heads, d)
    ks = jax.random.split(jax.random.key(L + d), 3)
    q, k = ((jax.random.normal(kk, shape) * x_scale).astype(jnp.bfloat16) for kk in ks[:2])
    v = jax.random.normal(ks[2], shape).astype(jnp.bfloat16)
    _, stats = jax.jit(lambda q, k, v: adasplash_jax.entmax_attention_with_stats(
        q, k, v, alpha=alpha, is_causal=causal, implementation="pallas"))(q, k, v)
    sparsity = 1.0 - float(jnp.mean(stats.active_tile_fraction))
    ours = lambda q, k, v: adasplash_jax.entmax_attention(q, k, v, alpha=alpha, is_causal=causal,  # noqa: E731
                                                          implementation="pallas")
    cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,  # noqa: E731
                                                         implementation="cudnn")

    def fb(fn):
        return jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))

    return sparsity, [median_ms(jax.jit(ours), q, k, v), median_ms(fb(ours), q, k, v),
                      median_ms(jax.jit(cudnn), q, k, v), median_ms(fb(cudnn), q, k, v)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="sm_90", choices=sorted(GPUS))
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.6, 0.9])
    ap.add_argument("--alpha", type=float, default=1.5)
    ap.add_argument("--solver-passes", type=int, default=None,
                    help="τ solver passes per visible tile after the max + histogram pass (default: "
                         "benchmarks/tau_passes.py's measurement, 3 for α = 1.5, 4 for α = 2 and others)")
    ap.add_argument("--marked-over-active", type=float, default=MARKED_OVER_ACTIVE,
                    help="tiles each τ solver pass visits per active tile (default: benchmarks/tau_passes.py "
                         "--local's measurement)")
    ap.add_argument("--static-branches", action="store_true",
                    help="charge the instructions under the τ max pass's branch (the histogram's grid start, "
                         "taken once per query block) on every tile, as the SASS's static count does")
    ap.add_argument("--batch-heads", type=int, default=16, help="batch × heads (times scale with it)")
    ap.add_argument("--full", action="store_true", help="non-causal instead of causal")
    ap.add_argument("--input-scales", type=float, nargs="+", default=[1.0, 4.0], help="GPU timing only")
    args = ap.parse_args(argv)
    gpu, causal = GPUS[args.target], not args.full
    # The τ kernel's solver loop stops once every row of a query block has converged (at most
    # MAX_SOLVER_PASSES). benchmarks/tau_passes.py (L = 512, normal scores at query scales 0.3, 1, 3,
    # histogram start) measured 3.0–3.1 passes per query block for α = 1.5, 3.2–5.0 for α = 2,
    # 3.0–3.7 for α = 1.25 and 1.8.
    n_iter = args.solver_passes or (3 if args.alpha == 1.5 else 4)

    variants = [aot.Variant(head_dim=d, dtype="bfloat16", causal=causal, alpha=args.alpha, programs=aot.variants.PROGRAMS)
                for d in args.head_dims]
    try:
        records = aot.compile_variants(variants, [args.target], sass=True)
    except aot.AotToolsMissing as e:
        print(e, file=sys.stderr)
        return 2

    print(f"Cost model, {gpu.name} ({args.target}); α = {args.alpha}, {'causal' if causal else 'non-causal'}, bf16, "
          f"batch × heads = {args.batch_heads}")
    print(f"  peak {gpu.peak_flops / 1e12:.0f} TFLOP/s bf16 dense, {gpu.issue_per_cycle} warp instructions/cycle/SM, "
          f"{gpu.sms} SMs, {gpu.clock_hz / 1e9:.2f} GHz, {gpu.hbm_bytes_s / 1e12:.2f} TB/s")
    print(f"  FlashAttention-2 at {gpu.fa2_efficiency:.0%} of peak ({gpu.fa2_source}); 2 + 5 matmuls per visible tile")
    print("  kernel time = max(issue, tensor, memory), fully overlapped within a kernel; kernels back to back;")
    print("  compulsory HBM traffic only; no wave quantisation, launch gaps or index-list build")
    if args.static_branches:
        print("  τ max pass: its branch (the histogram's grid start) charged on every tile (static SASS count)")
    else:
        print("  τ max pass: the instructions under its one branch (the histogram's grid start, taken on a query "
              "block's first tile) charged once per query block")
    print()
    profs = {d: profiles(records, d, args.static_branches) for d in args.head_dims}

    print("Per kernel (compiled SASS): instructions / MMA FLOPs per warp per innermost-loop iteration; "
          "issue slots per 64×64 tile")
    for d, prof in profs.items():
        for label, k in prof.items():
            slots = interior_slots_per_64x64(k, n_iter if label == "tau" else 1)  # τ: at 0% sparsity
            loops = " ".join(f"{i}/{f}" + (f" (×{u} unrolled)" if u > 1 else "") for i, f, u in k.loops)
            if k.once_per_program:
                loops += f" + {k.once_per_program} once per program"
            ref = ADASPLASH2_SLOTS.get(label.replace("+res", "")) if d == 64 else None
            cmp = f"  AdaSplash-2 {ref:,} ({slots / ref:.2f}×)" if ref else ""
            print(f"  d={d:<3} {label:<11} {k.num_warps} warps, tile {k.block_q}×{k.block_k}: loops {loops};"
                  f" {slots:,.0f} slots per interior tile{cmp}")
    print(f"  τ passes: max + histogram over every visible tile, then {n_iter} solver passes (each with the block "
          f"mask) over the marked tiles, {args.marked_over_active:.2f} × the active ones (all of them at 0% sparsity: "
          f"the slots above); "
          f"AdaSplash-2 τ passes: {ADASPLASH2_SLOTS['tau passes']} (source: shared/notes/adasplash.md §8)")
    print()

    head = (f"{'L':>6} {'d':>4} {'sparsity':>8} | {'ours fwd':>9} {'ours f+b':>9} {'τ share':>7} "
            f"{'τ slots/visible':>15} | {'FA2 fwd':>8} {'FA2 f+b':>8} | {'fwd/FA2':>7} {'f+b/FA2':>7} | "
            f"{'AS2-model f+b/FA2':>17}")
    print("Estimated times (ms)")
    print(head)
    print("-" * len(head))
    for L in args.lengths:
        for d in args.head_dims:
            for s in args.sparsities:
                e = estimate(gpu, profs[d], L=L, d=d, bh=args.batch_heads, causal=causal, sparsity=s, solver_passes=n_iter,
                             marked_over_active=args.marked_over_active)
                fb = e["fwd_train"] + e["backward"]
                fa2 = e["fa2_fwd"] + e["fa2_bwd"]
                as2 = ""
                if d == 64 and args.target == "sm_90":
                    as2 = f"{adasplash2_estimate(gpu, L=L, bh=args.batch_heads, causal=causal, sparsity=s) / fa2:.2f}"
                tau_vs = f"{e['tau_slots_per_visible']:,.0f}"
                if d == 64:
                    tau_vs += f" ({e['tau_slots_per_visible'] / ADASPLASH2_SLOTS['tau']:.2f}×)"
                print(f"{L:>6} {d:>4} {s:>8.0%} | {e['forward'] * 1e3:>9.3f} {fb * 1e3:>9.3f} {e['tau'] / fb:>7.0%} "
                      f"{tau_vs:>15} | "
                      f"{e['fa2_fwd'] * 1e3:>8.3f} {fa2 * 1e3:>8.3f} | {e['forward'] / e['fa2_fwd']:>7.2f} "
                      f"{fb / fa2:>7.2f} | {as2:>17}")
    print()
    print("AdaSplash-2 as published (H100, causal, fwd+bwd ms; block sparsity): "
          + "; ".join(f"{L // 1024}k ({s:.0%}) FA2 {f} / AS2 {a} = {a / f:.2f}×" for L, s, f, a in ADASPLASH2_PUBLISHED))

    import jax

    if jax.default_backend() != "gpu":
        print("\n(no GPU: measured times are printed only when jax.default_backend() == 'gpu')")
        return 0
    print(f"\nMeasured on {jax.devices()[0].device_kind} (median ms) beside the estimate at the measured sparsity")
    head = (f"{'L':>6} {'d':>4} {'x-scale':>7} {'sparsity':>8} | {'ours fwd':>9} {'est':>7} {'ours f+b':>9} {'est':>7} | "
            f"{'cudnn fwd':>9} {'cudnn f+b':>9} {'FA2 est f+b':>11}")
    print(head)
    print("-" * len(head))
    for L in args.lengths:
        for d in args.head_dims:
            for x_scale in args.input_scales:
                s, (f, fbm, cf, cfb) = measure(L, d, args.batch_heads, causal, args.alpha, x_scale)
                e = estimate(gpu, profs[d], L=L, d=d, bh=args.batch_heads, causal=causal, sparsity=s, solver_passes=n_iter,
                             marked_over_active=args.marked_over_active)
                print(f"{L:>6} {d:>4} {x_scale:>7} {s:>8.0%} | {f:>9.3f} {e['forward'] * 1e3:>7.3f} {fbm:>9.3f} "
                      f"{(e['fwd_train'] + e['backward']) * 1e3:>7.3f} | {cf:>9.3f} {cfb:>9.3f} "
                      f"{(e['fa2_fwd'] + e['fa2_bwd']) * 1e3:>11.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
