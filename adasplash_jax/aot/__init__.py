"""Ahead-of-time GPU compilation of the Pallas kernels, on a machine without a GPU.

Every Pallas Triton kernel of ``entmax_attention(implementation="pallas")`` (the τ kernel, the
forward with and without residuals, dK/dV and dQ) is lowered for CUDA with ``jax.export``, pulled
out of the exported StableHLO as a ``__gpu$xla.gpu.triton`` custom call (its backend_config holds
the ``pallas_call`` name, num_warps, num_stages and the Triton IR bytecode), compiled for a target
compute capability by XLA's own bundled Triton (the compiler that builds these kernels on a GPU),
assembled by ptxas ≥ 13 with ``-v`` (registers, stack, spills, "Potential Performance Loss"
warnings such as C7511/C7514), and disassembled by nvdisasm to count the instructions and the MMA
instructions (HMMA on sm_80, HGMMA on sm_90) per iteration of each innermost loop (a backward BRA).
:func:`compile_variants` returns one :class:`KernelRecord` per kernel and target;
``python -m adasplash_jax.aot`` prints them as a table.

:func:`compile_program` compiles a whole jitted program for a compile-only H100 or A100
(``jax.experimental.topologies`` with a ``GpuTargetConfigProto``): XLA:GPU end to end, Pallas
kernels included, no device needed.

Install: the ``aot`` extra (``pip install -e ".[aot]"``): ``jax[cuda13-local]`` (XLA's CUDA plugin and
PJRT pinned to the jax release, so to jaxlib), ``nvidia-cuda-nvcc>=13`` (ptxas; 12.x rejects the
PTX 9.0 XLA's Triton emits), ``nvidia-cuda-nvdisasm`` and ``nvidia-cuda-cuobjdump``. Missing
tools raise :class:`AotToolsMissing`, whose message names the extra.

Compile results are cached by kernel (Triton IR and launch parameters), target and tool versions
in ``~/.cache/adasplash_jax/aot`` (``ADASPLASH_AOT_CACHE``: another folder, or 0 for none), so a
rerun after changing one kernel recompiles only that kernel; lowering always runs. The kernel is
keyed by its IR without source locations (:func:`capture.kernel_key`): those name the checkout's
path and the lines, so a clone elsewhere, or an edit that only moves code, still hits the cache.

The plugin is only ever initialised in worker processes started with ``JAX_PLATFORMS=cpu`` (so it
registers its Triton compiler without looking for a GPU, cuDNN or a driver); the calling process
keeps whatever backend it has. The work is CPU-bound and XLA's Triton compile holds the GIL, so it
is spread over ``jobs`` processes (one per CPU by default), one task per lowering and per kernel
and target: a cold compile takes about (total CPU time) / jobs.

Versions: tested with jax/jaxlib 0.10.2 (Python 3.11), where Pallas emits the Triton IR in the
custom call and lowers it once for every target (its lowering assumes compute capability 9.0 without
a GPU; the capability only changes fp8 casts, which these kernels do not use). From 0.11 Pallas
reads the target GPU while lowering (``jax/_src/pallas/triton/gpu_info.py``): the lowering then runs
once per target under an abstract CUDA device of that kind, and, should a later release switch
on its compile-while-lowering path (custom call ``triton_kernel_call_ffi``, PTX in a zlib'd proto),
the PTX is taken from the proto. Neither 0.11+ path has run end to end here (jax ≥ 0.11 needs
Python ≥ 3.12); the proto reader is tested against jaxlib's own encoder, and exporting under
the abstract device was checked not to break the 0.10.2 lowering.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from adasplash_jax.aot.sass import LoopStats, PtxasReport, innermost_loops, parse_ptxas, parse_sass
from adasplash_jax.aot.targets import A100, H100, TARGETS, GpuTarget, get_target
from adasplash_jax.aot.tools import EXTRA_HINT, AotToolsMissing, Tools, find_tools, tools_available
from adasplash_jax.aot.variants import Variant, matrix

__all__ = [
    "A100", "H100", "TARGETS", "GpuTarget", "get_target",
    "AotToolsMissing", "Tools", "find_tools", "tools_available", "EXTRA_HINT",
    "Variant", "matrix", "KernelRecord", "compile_variants", "format_table",
    "LoopStats", "PtxasReport", "parse_ptxas", "parse_sass", "innermost_loops",
    "compile_program", "compile_only_device",
]

SHORT_NAMES = {
    "entmax_threshold": "tau",
    "entmax_attention_forward": "forward",
    "entmax_attention_dkdv": "dkdv",
    "entmax_attention_dq": "dq",
}


@dataclasses.dataclass(frozen=True)
class KernelRecord:
    """One kernel of one variant, compiled for one target."""

    variant: Variant
    program: str  # "inference" or "training"
    kernel: str  # the pallas_call name, e.g. "entmax_attention_dq"
    target: str  # "sm_80", "sm_90"
    num_warps: int | None = None
    num_stages: int | None = None
    grid: tuple | None = None
    smem_bytes: int | None = None
    smem_limit: int | None = None
    registers: int | None = None
    stack_bytes: int | None = None
    spill_store_bytes: int | None = None
    spill_load_bytes: int | None = None
    perf_warnings: tuple = ()
    ptxas_codes: dict = dataclasses.field(default_factory=dict)
    sass_instructions: int | None = None
    sass_mma: int | None = None
    loops: tuple = ()  # LoopStats of each innermost loop, in address order (with sass=True)
    error: str | None = None
    key: str | None = None  # equal keys: the same kernel (same IR without locations, same launch parameters)
    compile_seconds: dict = dataclasses.field(default_factory=dict)  # triton, ptxas, nvdisasm

    @property
    def label(self) -> str:
        """Short kernel label: tau, forward, forward+res (the training forward), dkdv, dq."""
        short = SHORT_NAMES.get(self.kernel.split("#")[0], self.kernel)
        if short == "forward" and self.program == "training":
            short = "forward+res"
        return short + ("#" + self.kernel.split("#")[1] if "#" in self.kernel else "")

    @property
    def id(self) -> str:
        return f"{self.variant.name}:{self.label}:{self.target}"

    @property
    def spills(self) -> bool:
        return bool(self.spill_store_bytes or self.spill_load_bytes)

    @property
    def smem_ok(self) -> bool:
        return self.smem_bytes is not None and self.smem_bytes <= self.smem_limit


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _run_driver(variants, targets, tools, sass, jobs, timeout):
    """Run ``capture.run`` in a process of its own (JAX_PLATFORMS=cpu; it starts the compile pool)."""
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH")) if p)
    env.pop("XLA_FLAGS", None)  # e.g. a forced host device count: irrelevant to compiling
    with tempfile.TemporaryDirectory(prefix="adasplash_aot_req_") as tmp:
        req, resp, log = (os.path.join(tmp, x) for x in ("req", "resp", "log"))
        with open(req, "wb") as f:
            pickle.dump(dict(variants=variants, targets=targets, tools=tools, sass=sass, jobs=jobs), f)
        with open(log, "w") as logf:
            # A session of its own, so that a timeout ends the pool's processes with the driver.
            p = subprocess.Popen([sys.executable, "-m", "adasplash_jax.aot.capture", req, resp], env=env,
                                 stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            raise
        if rc != 0 or not os.path.exists(resp):
            with open(log) as f:
                tail = f.read()[-6000:]
            raise RuntimeError(f"AOT compile worker exited {rc}:\n{tail}")
        with open(resp, "rb") as f:
            return pickle.load(f)


def compile_variants(variants, targets=("sm_80", "sm_90"), *, sass=True, jobs: int | None = None,
                     timeout: float | None = None) -> list[KernelRecord]:
    """Compile every kernel of every variant for every target; one :class:`KernelRecord` each.

    ``sass``: disassemble (loop counts) every kernel, none (``False``: faster), or those of the
    variants whose names are in the given collection. ``jobs``: processes that lower and compile
    (default: the CPUs this process may run on); each lowering and each kernel compile for one
    target is a task of its own. A variant whose lowering fails gives one record with kernel
    ``"<lowering>"`` and the traceback in ``error``.
    """
    variants = list(variants)
    targets = [get_target(t) for t in targets]
    if not isinstance(sass, bool):
        sass = frozenset(sass)
    tools = find_tools(bool(sass))
    jobs = jobs or _cpu_count()
    result = _run_driver(variants, targets, tools, sass, jobs, timeout)
    calls, errors, compiled = result["calls"], result["errors"], result["compiled"]
    records = []
    for v in variants:
        if v.name in errors:
            records += [KernelRecord(v, "-", "<lowering>", t.name, error=errors[v.name]) for t in targets]
            continue
        inference_keys = {(c["name"], c["key"]) for c in calls[v.name] if c["program"] == "inference"}
        for call in calls[v.name]:
            if call["program"] == "training" and (call["name"], call["key"]) in inference_keys:
                continue  # the same kernel as in the inference program (the τ kernel)
            for t in targets:
                if call["target"] not in (None, t.name):
                    continue
                res = compiled[(call["key"], t.name)]
                rep = res.get("ptxas")
                records.append(KernelRecord(
                    variant=v, program=call["program"], kernel=call["name"], target=t.name,
                    num_warps=call["num_warps"], num_stages=call["num_stages"], grid=call["grid"],
                    smem_bytes=res.get("smem_bytes"), smem_limit=t.smem_per_block_optin,
                    registers=rep and rep.registers, stack_bytes=rep and rep.stack_bytes,
                    spill_store_bytes=rep and rep.spill_store_bytes, spill_load_bytes=rep and rep.spill_load_bytes,
                    perf_warnings=rep.perf_warnings if rep else (), ptxas_codes=rep.codes if rep else {},
                    sass_instructions=res.get("sass_instructions"), sass_mma=res.get("sass_mma"),
                    loops=tuple(res.get("loops", ())), error=res["error"], key=call["key"],
                    compile_seconds=res["seconds"],
                ))
    return records


def _loops_text(loops) -> str:
    """'664/4g144 303/0u6 563/4x4': instructions/MMA per innermost loop (g: how many run under a branch, u:
    source iterations per machine iteration when unrolled), repeats folded."""
    parts, prev, n = [], None, 0
    for lp in loops:
        cur = f"{lp.instructions}/{lp.mma}" + (f"g{lp.guarded}" if lp.guarded else "") + (
            f"u{lp.unroll}" if lp.unroll > 1 else "")
        if cur == prev:
            n += 1
            continue
        if prev is not None:
            parts.append(prev + (f"x{n}" if n > 1 else ""))
        prev, n = cur, 1
    if prev is not None:
        parts.append(prev + (f"x{n}" if n > 1 else ""))
    return " ".join(parts)


def format_table(records) -> str:
    """A plain-text table, one row per record."""
    head = ("variant", "kernel", "target", "w/s", "smem KB", "regs", "spill st/ld", "stack", "warnings",
            "SASS", "loops: instr/MMA per iteration (gN: N of them under a branch; uN: N source iterations each)")
    rows = []
    for r in records:
        if r.error:
            rows.append((r.variant.name, r.label, r.target, "", "", "", "", "", "", "",
                         "ERROR " + r.error.strip().splitlines()[-1][:80]))
            continue
        rows.append((
            r.variant.name, r.label, r.target, f"{r.num_warps}/{r.num_stages}",
            f"{r.smem_bytes / 1024:.1f}" + ("" if r.smem_ok else "!"), str(r.registers),
            f"{r.spill_store_bytes}/{r.spill_load_bytes}", str(r.stack_bytes), ",".join(r.perf_warnings),
            "" if r.sass_instructions is None else str(r.sass_instructions), _loops_text(r.loops),
        ))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


# ------------------------------------------------------------------------- whole programs, deviceless


def compile_only_device(target="sm_90"):
    """A compile-only CUDA device of the target GPU (needs the plugin, initialised: JAX_PLATFORMS=cpu
    on a machine without a GPU)."""
    from jax.experimental import topologies

    t = get_target(target)
    topology = topologies.get_topology_desc("", "cuda", target_config=t.target_config, topology="1x1x1")
    return topology.devices[0]


def compile_program(fn, *structs, target="sm_90"):
    """``jax.jit(fn)`` traced on ``structs`` (ShapeDtypeStructs; their shardings are replaced by the
    compile-only device), lowered and compiled by XLA:GPU for the target; returns the Compiled."""
    import jax

    device = compile_only_device(target)
    sharding = jax.sharding.SingleDeviceSharding(device)
    placed = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), structs)
    return jax.jit(fn).trace(*placed).lower().compile()
