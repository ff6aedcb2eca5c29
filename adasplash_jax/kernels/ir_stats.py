"""Static cost of the kernels read from their Triton IR (no GPU needed): per kernel, the matmuls
(``tt.dot``) in the whole kernel, and per innermost loop body the arithmetic ops, reductions and
matmuls.

Usage: ``kernel_ir(fn, *structs)`` lowers ``jax.jit(fn)`` for CUDA and returns
{kernel name: Triton IR text} (one entry per ``pallas_call``, in lowering order; a name seen twice
gets a ``#2`` suffix); ``loop_stats(text)`` counts its innermost ``scf.for`` bodies.
An op inside a ``tt.reduce`` combiner region counts as part of its reduction, not as arithmetic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re

import jax

# One SSA op per line in the printed IR: `%a = dialect.op ...` or `dialect.op ...`.
_OP = re.compile(r"^\s*(?:%[\w#:, %]+=\s*)?\"?([a-z_]+\.[\w.]+)\"?")
_ARITH = ("arith.", "math.", "tt.extern_elementwise", "tt.elementwise_inline_asm", "tt.precise_")
_TILE = re.compile(r"tensor<\d+x\d+x")  # a 2-D (tile-shaped) result: one op per element
_FREE = ("arith.constant", "arith.index_cast")  # folded into operands / address arithmetic


@dataclasses.dataclass(frozen=True)
class LoopBody:
    """One innermost ``scf.for`` body (static count: both sides of a select count)."""

    arith: int  # arith/math ops outside reduction combiners, constants excluded
    tile_float: int  # ... of them on whole 2-D tiles with float results (the per-element cost)
    tile_int: int  # ... on whole 2-D tiles with integer/bool results (masks, addresses)
    reductions: int  # tt.reduce ops
    dots: int  # tt.dot ops
    loads: int  # tt.load ops
    ops: dict  # op name → count (arith/math only)
    calls: tuple = ()  # libdevice functions and inline PTX called in the body


@dataclasses.dataclass(frozen=True)
class KernelStats:
    dots: int  # tt.dot in the whole kernel
    loops: tuple  # LoopBody per innermost loop, in program order


@contextlib.contextmanager
def _capture(texts: dict):
    from jax._src.pallas.triton import lowering

    original = lowering.lower_jaxpr_to_triton_module

    def wrapped(jaxpr, *args, **kwargs):
        result = original(jaxpr, *args, **kwargs)
        name = jaxpr.debug_info.func_name
        key, n = name, 1
        while key in texts:
            n += 1
            key = f"{name}#{n}"
        texts[key] = result.module.operation.get_asm()
        return result

    lowering.lower_jaxpr_to_triton_module = wrapped
    try:
        yield
    finally:
        lowering.lower_jaxpr_to_triton_module = original


def kernel_ir(fn, *structs) -> dict:
    """{pallas_call name: Triton IR text} of ``jax.jit(fn)`` lowered for CUDA."""
    texts: dict = {}
    with _capture(texts):
        jax.export.export(
            jax.jit(fn),
            platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(*structs)
    return texts


def _regions(lines):
    """(kind, first line, last line) of every `{ ... }` region opened by an op line."""
    stack, out = [], []
    for i, line in enumerate(lines):
        m = _OP.match(line)
        opens = line.count("{") - line.count("}")
        if line.strip().startswith("}") and stack:
            kind, start = stack.pop()
            out.append((kind, start, i))
            if "{" in line:  # `} else {` / `} do {`
                stack.append((kind, i))
            continue
        if opens > 0:
            stack.append((m.group(1) if m else "?", i))
    return out


def loop_stats(text: str) -> KernelStats:
    lines = text.splitlines()
    regions = _regions(lines)
    loops = [(s, e) for kind, s, e in regions if kind == "scf.for"]
    inner = [(s, e) for s, e in loops if not any(s < s2 and e2 < e for s2, e2 in loops)]
    combiners = [(s, e) for kind, s, e in regions if kind == "tt.reduce"]

    def in_combiner(i):
        return any(s < i < e for s, e in combiners)

    def ops_in(s, e):
        for i in range(s + 1, e):
            m = _OP.match(lines[i])
            if m:
                yield i, m.group(1)

    bodies = []
    for s, e in inner:
        counts: dict = {}
        calls = []
        reductions = dots = loads = tile_float = tile_int = 0
        for i, op in ops_in(s, e):
            if op == "tt.reduce":
                reductions += 1
            elif op == "tt.dot":
                dots += 1
            elif op == "tt.load":
                loads += 1
            elif op.startswith(_ARITH) and op not in _FREE and not in_combiner(i):
                call = re.search(r'symbol = "(\w+)"|elementwise_inline_asm "([^"]+)"', lines[i])
                if call:
                    calls.append(call.group(1) or call.group(2))
                counts[op] = counts.get(op, 0) + 1
                result = lines[i].rsplit(":", 1)[-1]
                if _TILE.search(result):
                    if re.search(r"x(f16|bf16|f32)>", result.split("->")[-1].split(" to ")[-1]):
                        tile_float += 1
                    else:
                        tile_int += 1
        bodies.append(LoopBody(sum(counts.values()), tile_float, tile_int, reductions, dots, loads,
                               dict(sorted(counts.items())), tuple(calls)))
    total_dots = sum(1 for line in lines if (m := _OP.match(line)) and m.group(1) == "tt.dot")
    return KernelStats(total_dots, tuple(bodies))
