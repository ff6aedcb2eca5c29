"""Every Pallas kernel compiled ahead of time for sm_80 (A100) and sm_90 (H100), on the CPU.

Needs the `aot` extra (XLA's CUDA plugin at the jaxlib version, ptxas ≥ 13, nvdisasm), which
`pip install -e ".[test]"` pulls in on Linux with Python < 3.12; elsewhere the tests skip, saying so.
In CI (CI set, Python < 3.12) a missing extra fails instead. Select with `pytest -m aot`.

All kernels must compile within the target's shared memory; bf16 and fp16 kernels must not spill
registers (fp32 kernels use exact dots without tensor cores and spill: reported, not asserted). The
kernels that spill today are listed in SPILL_TODAY as strict xfails, so a kernel change that fixes
one fails here until its entry is removed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from adasplash_jax import BlockSizes, aot
from adasplash_jax.aot import Variant
from adasplash_jax.aot.sass import innermost_loops, parse_ptxas

pytestmark = [pytest.mark.aot, pytest.mark.slow]  # every kernel variant through XLA's Triton and ptxas

TARGETS = ("sm_80", "sm_90")
# ADASPLASH_AOT_FULL=1: the full fp16 product too (about twice the compile time).
VARIANTS = aot.matrix(full=os.environ.get("ADASPLASH_AOT_FULL", "") not in ("", "0"))
# The table variants, also disassembled (SASS loop counts).
SASS_VARIANTS = [Variant(head_dim=d, dtype="bfloat16", causal=True, alpha=1.5) for d in (64, 128)]
# Each program's kernels, by label: a change to the kernel set must update this.
KERNELS = {"inference": ("tau", "forward"), "training": ("forward+res", "dkdv", "dq")}
LABELS = [label for labels in KERNELS.values() for label in labels]

_AVAILABLE, _WHY = aot.tools_available(sass=True)
_REQUIRED = bool(os.environ.get("CI")) and sys.version_info < (3, 12) and sys.platform == "linux"


def _need_tools():
    if _AVAILABLE:
        return
    if _REQUIRED:
        pytest.fail("CI installs the `aot` extra through `.[test]`, but it is missing:\n" + _WHY)
    pytest.skip(_WHY.replace("\n  - ", "; "))


# The bf16/fp16 kernels that spill registers today (ptxas 13.5, jaxlib 0.10.2's Triton, default
# BlockSizes for each target): none since 2026-12-02, measured on the default matrix (`python -m
# adasplash_jax.aot --matrix --no-sass`: 0 of 590; 24 before the d = 256 kernels and sparsemax's
# d = 32 forward read the query tile per key tile, the d = 256 τ kernel went to 4 warps and a dense
# mask or bias kept the d = 128 forward at one stage below sm_90; 86 at the first count), and 0 of 920
# on the full matrix (`--matrix full`, the fp16 twins included; fp32 kernels spill, as reported). Strict xfails: a kernel that spills today goes here with the
# date and why, and the change that stops it spilling must delete its line.
SPILL_TODAY: set[str] = set()


@pytest.fixture(scope="module")
def records(request):
    _need_tools()
    t0 = time.perf_counter()
    recs = aot.compile_variants(VARIANTS, TARGETS, sass={v.name for v in SASS_VARIANTS})
    seconds = time.perf_counter() - t0
    by_id = {}
    for r in recs:
        by_id.setdefault(r.id, r)
    yield by_id
    _report(request, recs, seconds)


def _report(request, recs, seconds):
    lines = [f"aot: {len(recs)} kernels of {len(VARIANTS)} variants compiled for {', '.join(TARGETS)} in {seconds:.0f} s"]
    sass_names = {v.name for v in SASS_VARIANTS}
    lines.append(aot.format_table([r for r in recs if r.variant.name in sass_names]))
    spilling = sorted(r.id + f" ({r.spill_store_bytes} B)" for r in recs if r.spills and r.variant.dtype != "float32")
    lines.append(f"bf16/fp16 kernels that spill ({len(spilling)}): " + ", ".join(spilling))
    fp32 = [r for r in recs if r.variant.dtype == "float32"]
    lines.append(f"fp32 (reported): {sum(r.spills for r in fp32)} of {len(fp32)} kernels spill, up to "
                 f"{max([r.spill_store_bytes or 0 for r in fp32], default=0)} B per thread")
    text = "\n".join(lines)
    path = os.environ.get("ADASPLASH_AOT_REPORT")
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # teardown output is captured otherwise
            reporter.write_line("")
            for line in text.splitlines():
                reporter.write_line(line)


def _record(records, item):
    if item not in records:
        variant = item.split(":")[0]
        errors = [r.error for r in records.values() if r.variant.name == variant and r.error]
        pytest.fail(f"{item}: not compiled" + (f"; lowering failed:\n{errors[0]}" if errors else ""))
    return records[item]


def _items(dtypes):
    for v in VARIANTS:
        if v.dtype not in dtypes:
            continue
        for label in LABELS:
            for t in TARGETS:
                yield f"{v.name}:{label}:{t}"


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_kernel_set(records, variant):
    labels = sorted({r.label for r in records.values() if r.variant == variant})
    assert labels == sorted(LABELS), f"{variant.name}: kernels {labels}"


def test_default_launch_follows_the_target(records):
    """A variant without block sizes compiles the library's defaults for each target: at d = 64 the
    backward kernels run at 4 warps on sm_90 and 8 on sm_80 (4 spill there)."""
    name = Variant(head_dim=64, dtype="bfloat16", causal=True, alpha=1.5).name
    warps = {}
    for t in TARGETS:
        launch = BlockSizes.for_head_dim(64, 1.5, aot.get_target(t).compute_capability).launch()
        for label, stage in (("tau", "tau"), ("forward", "forward"), ("dkdv", "backward"), ("dq", "backward")):
            r = _record(records, f"{name}:{label}:{t}")
            assert (r.num_warps, r.num_stages) == launch[stage], f"{name}:{label}:{t}"
        warps[t] = _record(records, f"{name}:dkdv:{t}").num_warps
    assert warps == {"sm_80": 8, "sm_90": 4}


@pytest.mark.parametrize("item", list(_items(("bfloat16", "float16", "float32"))))
def test_compiles_within_shared_memory(records, item):
    r = _record(records, item)
    assert r.error is None, r.error
    assert r.registers is not None and 0 < r.registers <= 255
    assert r.smem_ok, f"{item}: {r.smem_bytes} B of shared memory, the limit is {r.smem_limit}"


def _spill_params():
    for item in _items(("bfloat16", "float16")):
        marks = []
        if item in SPILL_TODAY:
            marks.append(pytest.mark.xfail(strict=True, reason="spills registers today (see SPILL_TODAY)"))
        yield pytest.param(item, marks=marks, id=item)


@pytest.mark.parametrize("item", list(_spill_params()))
def test_no_register_spills(records, item):
    r = _record(records, item)
    assert r.error is None, r.error
    assert not r.spills, (f"{item}: {r.registers} registers, {r.spill_store_bytes} B spill stores, "
                          f"{r.spill_load_bytes} B spill loads, {r.stack_bytes} B stack")


@pytest.mark.parametrize("variant", SASS_VARIANTS, ids=lambda v: v.name)
def test_sass_loops_counted(records, variant):
    """The disassembled kernels have innermost loops with tensor-core instructions in them."""
    for label in LABELS:
        for t in TARGETS:
            r = _record(records, f"{variant.name}:{label}:{t}")
            assert r.loops, f"{r.id}: no innermost loop found"
            mma = "HMMA" if t == "sm_80" else "HGMMA"
            # Kernels split into interior and boundary loops (and the τ kernel's adaptive solver
            # loop) also have innermost loops without a matmul; each must have some with one.
            assert r.sass_mma and any(lp.mma > 0 for lp in r.loops), f"{r.id}: no loop with {mma}"
            assert all(lp.instructions > lp.mma for lp in r.loops)
            # benchmarks/kernel_cost.py counts one tile per iteration of a loop with a matmul
            assert all(lp.unroll == 1 for lp in r.loops if lp.mma > 0), [lp.unroll for lp in r.loops]
            if label == "tau":
                # The max pass's two loops (boundary, interior) hold the histogram's two lax.conds
                # (grid start, count shift); the solver loops have no branch in them.
                mma_loops = [lp for lp in r.loops if lp.mma > 0]
                assert all(lp.guarded > 0 for lp in mma_loops[:2]), [lp.guarded for lp in mma_loops]
                assert all(lp.guarded == 0 for lp in mma_loops[2:]), [lp.guarded for lp in mma_loops]


def test_deviceless_whole_programs():
    """The jitted forward+backward and a GPT-2 train step compile for a compile-only A100 and H100."""
    _need_tools()
    from adasplash_jax.aot.programs import compile_programs

    results = compile_programs(TARGETS)
    assert {(r["program"], r["target"]) for r in results} == {
        (p, t) for p in ("attention_fwd_bwd", "gpt2_train_step") for t in TARGETS
    }
    for r in results:
        assert "error" not in r, r
        assert r["device_kind"] == aot.get_target(r["target"]).device_kind
        assert {"entmax_threshold", "entmax_attention_forward", "entmax_attention_dkdv",
                "entmax_attention_dq"} <= set(r["triton_kernels"]), r


def test_decode_compiled_kernel_call():
    """The reader for the compile-while-lowering custom call (jax ≥ 0.11 may take that path) against
    jaxlib's own encoder of it."""
    _need_tools()
    code = (
        "import jax; jax.devices()\n"
        "from jax._src.lib import gpu_triton as g\n"
        "from adasplash_jax.aot.capture import decode_kernel_call\n"
        "k = g.TritonKernel('kern', 8, 1, 4321, '.version 9.0\\n.target sm_90a\\n', 'ttir', 90)\n"
        "c = g.TritonKernelCall(k, 2, 3, 4, [g.create_array_parameter(0, 16)] * 3)\n"
        "print(repr(decode_kernel_call(c.to_proto('kern', b'meta'))))\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 0, p.stderr[-3000:]
    got = eval(p.stdout.strip().splitlines()[-1])
    assert got == dict(num_warps=8, num_stages=None, smem_bytes=4321, ptx=".version 9.0\n.target sm_90a\n",
                       compute_capability=90, grid=(2, 3, 4))


_KEY_CODE = """
import io, re, jax
jax.devices()
from jax._src.lib.mlir import ir
from adasplash_jax.aot import capture
from adasplash_jax.aot.variants import Variant

def inference(alpha):
    calls = capture.lower_variant(Variant(head_dim=32, alpha=alpha, programs=("inference",)), [None])
    return {c["name"]: c for c in calls}

def relocated(bytecode, root):
    # The same kernel lowered from a checkout elsewhere: every location's path moved, lines shifted.
    with capture._triton_ir_context():
        text = ir.Module.parse(bytecode).operation.get_asm(enable_debug_info=True)
        def move(m):
            return 'loc("' + m.group(1).replace(root, "/elsewhere/clone") + '":' + str(int(m.group(2)) + 7)
        moved = re.sub(r'loc\\("([^"]+)":(\\d+)', move, text)
        assert moved != text
        buf = io.BytesIO()
        ir.Module.parse(moved).operation.write_bytecode(buf)
        return buf.getvalue()

root = ROOT
a, b = inference(1.5), inference(2.0)
out = []
for name, call in a.items():
    assert root.encode() in call["ir"], name
    moved = dict(call, ir=relocated(call["ir"], root))
    assert moved["ir"] != call["ir"] and root.encode() not in moved["ir"]
    out.append((name, call["key"], capture.kernel_key(moved), b[name]["key"],
                capture.kernel_key(dict(call, num_stages=call["num_stages"] + 1))))
print(repr(out))
"""


def test_kernel_key_ignores_source_paths():
    """The cache key of a lowered kernel stays when its source locations name another checkout (and
    other lines), and differs for another kernel (α = 2 instead of 1.5) or other launch parameters."""
    _need_tools()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = _KEY_CODE.replace("ROOT", repr(root + os.sep))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert p.returncode == 0, p.stderr[-3000:]
    got = eval(p.stdout.strip().splitlines()[-1])
    assert sorted(name for name, *_ in got) == ["entmax_attention_forward", "entmax_threshold"]
    for name, key, moved, other_alpha, other_stages in got:
        assert moved == key, name
        assert len({key, other_alpha, other_stages}) == 3, name


# --------------------------------------------------------------------------- parsers (no tools needed)

PTXAS = """\
ptxas info    : (C7517) wgmma.wait_group is injected in around line 611 by compiler
ptxas info    : (C7511) Potential Performance Loss: wgmma.mma_async instructions are serialized due to insufficient register resources for the wgmma pipeline in the function 'k'
ptxas info    : Compiling entry function 'k' for 'sm_90a'
ptxas info    : Function properties for k
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 8 bytes cumulative stack size
"""

SASS = """\
k:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
.L_x_1:
        /*0020*/                   FADD R2, R2, R3 ;
        /*0030*/              @!P0 BRA `(.L_x_1) ;
        /*0040*/                   MUFU.EX2 R2, R2 ;
        /*0050*/               @P1 BRA `(.L_x_0) ;
.L_x_2:
        /*0060*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0070*/                   SHFL.BFLY PT, R3, R2, 0x1, 0x1f ;
        /*0080*/                   BRA `(.L_x_2) ;
.L_x_4:
        /*0090*/                   FADD R2, R2, R3 ;
        /*00a0*/               @P2 BRA `(.L_x_5) ;
        /*00b0*/                   MUFU.EX2 R2, R2 ;
        /*00c0*/                   FMUL R2, R2, R3 ;
.L_x_5:
        /*00d0*/                   VIADD R9, R9, 0x6 ;
        /*00e0*/                   BRA.DIV UR8, `(.L_x_6) ;
        /*00f0*/                   ISETP.GT.AND P0, PT, R9, 0xb, PT ;
        /*0100*/              @!P0 BRA `(.L_x_4) ;
        /*0110*/                   EXIT ;
.L_x_6:
        /*0120*/                   SHFL.BFLY PT, R3, R2, 0x1, 0x1f ;
        /*0130*/                   BRA `(.L_x_5) ;
.L_x_3:
        /*0140*/                   BRA `(.L_x_3);
"""


def test_parse_ptxas():
    rep = parse_ptxas(PTXAS)
    assert (rep.registers, rep.stack_bytes, rep.spill_store_bytes, rep.spill_load_bytes) == (255, 8, 4, 12)
    assert rep.perf_warnings == ("C7511",) and rep.codes == {"C7511": 1, "C7517": 1}


def test_innermost_loops():
    loops = innermost_loops(SASS)
    # the loop at 0x20 lies inside the one at 0x10 (not innermost); BRA-to-self after EXIT is no loop,
    # nor is the divergent path after EXIT (0x120) branching back into the loop at 0x90
    assert [(lp.start, lp.end, lp.instructions, lp.mma) for lp in loops] == [(0x20, 0x30, 2, 0), (0x60, 0x80, 3, 1),
                                                                             (0x90, 0x100, 8, 0)]
    assert loops[1].classes["shfl"] == 1 and loops[1].issue_slots(4) == 12
    assert loops[1].mma_flops == 2 * 64 * 64 * 16 // 4  # a warpgroup-wide HGMMA, per warp
    # the predicated forward branch at 0xa0 jumps over two instructions (an `if` in the loop); the
    # back edge is no such branch, nor is BRA.DIV, whose target lies outside the loop
    assert [lp.guarded for lp in loops] == [0, 0, 2] and loops[2].unguarded == 6
    # its counter R9, which the back edge's predicate tests, steps by 6: six source iterations per
    # machine iteration (a constant-trip loop ptxas unrolled); the others have no counter found
    assert [lp.unroll for lp in loops] == [1, 1, 6]


def test_missing_extra_names_it(monkeypatch):
    from adasplash_jax.aot import tools

    tools.find_tools.cache_clear()
    monkeypatch.setattr(tools, "_version", lambda name: None)
    try:
        with pytest.raises(aot.AotToolsMissing, match=r"\.\[aot\]"):
            tools.find_tools(sass=True)
    finally:
        tools.find_tools.cache_clear()
