"""Reading what ptxas and nvdisasm print: resources, warnings, and the innermost loops of the SASS."""

from __future__ import annotations

import collections
import dataclasses
import re

_REGISTERS = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_CODE = re.compile(r"\((C\d{4})\)")


@dataclasses.dataclass(frozen=True)
class PtxasReport:
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    codes: dict  # every "(Cnnnn)" message code ptxas printed → how many times
    perf_warnings: tuple  # the codes of its "Potential Performance Loss" messages (C7511, C7514, ...)


def parse_ptxas(text: str) -> PtxasReport:
    """``ptxas -v`` output of a single-kernel module → registers, stack, spills and message codes."""
    regs = _REGISTERS.search(text)
    frame = _FRAME.search(text)
    if regs is None or frame is None:
        raise ValueError(f"no resource usage in the ptxas output:\n{text[-2000:]}")
    codes = collections.Counter(_CODE.findall(text))
    perf = sorted({m for line in text.splitlines() if "Performance Loss" in line for m in _CODE.findall(line)})
    return PtxasReport(
        registers=int(regs.group(1)),
        stack_bytes=int(frame.group(1)),
        spill_store_bytes=int(frame.group(2)),
        spill_load_bytes=int(frame.group(3)),
        codes=dict(sorted(codes.items())),
        perf_warnings=tuple(perf),
    )


# nvdisasm -c:   "        /*0bd0*/              @!P0 BRA `(.L_x_0) ;"   and labels ".L_x_0:"
_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L[\w.$]*):")
_PRED = re.compile(r"^@!?U?P[T\d]+\s+")
_TARGET = re.compile(r"`\((\.L[\w.$]*)\)")

# Opcode families worth counting separately in a loop.
_CLASSES = {
    "mma": lambda op: op.endswith("MMA"),  # HMMA (sm_80 mma.sync), HGMMA (sm_90 wgmma), IMMA, ...
    "mufu": lambda op: op == "MUFU",  # ex2, lg2, rcp, rsq, ...
    "shfl": lambda op: op == "SHFL",
    "bar": lambda op: op in ("BAR", "WARPGROUP", "WARPSYNC", "SYNCS", "DEPBAR"),
    "gmem": lambda op: op in ("LDG", "STG", "LDGSTS", "UTMALDG", "UBLKCP", "RED", "ATOMG"),
    "smem": lambda op: op in ("LDS", "STS", "LDSM", "STSM"),
}


_HGMMA = re.compile(r"^HGMMA\.(\d+)x(\d+)x(\d+)")
_HMMA = re.compile(r"^HMMA\.(16)(8)(16|8)\b")


def mma_flops_per_warp(opcode: str) -> int:
    """Multiply-add FLOPs one warp's MMA instruction does: HMMA.16816 is a 16x8x16 tile per warp;
    HGMMA.64xNx16 is a warpgroup-wide (4-warp) 64xNx16 tile, a quarter of it per warp."""
    m = _HGMMA.match(opcode)
    if m:
        return 2 * int(m.group(1)) * int(m.group(2)) * int(m.group(3)) // 4
    m = _HMMA.match(opcode)
    if m:
        return 2 * int(m.group(1)) * int(m.group(2)) * int(m.group(3))
    return 0


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with modifiers, e.g. "HGMMA.64x64x16.F32.BF16"
    text: str
    guard: str = ""  # "@P0" / "@!P0": runs (or branches) only where the predicate holds; "" always

    @property
    def predicated(self) -> bool:
        return bool(self.guard)

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


@dataclasses.dataclass(frozen=True)
class LoopStats:
    """One innermost loop: the instructions from its header to its backward branch (static count;
    instructions under a branch inside the loop count once, as if every path ran). ``guarded``:
    how many of them a predicated forward branch inside the loop jumps over (the body of an
    ``if``, e.g. a ``lax.cond`` in the loop), which run only on the iterations that take that path."""

    start: int
    end: int
    instructions: int
    mma: int
    classes: dict  # family → count (see _CLASSES)
    mma_flops: int = 0  # per warp and iteration (see mma_flops_per_warp); × num_warps for the block
    guarded: int = 0
    # Source iterations per machine iteration: the step of the counter the back edge tests (a loop
    # of constant trip count that ptxas unrolled 6× steps its counter by 6); 1 when not found.
    unroll: int = 1

    @property
    def unguarded(self) -> int:
        """Instructions every iteration runs (those under no conditional branch of the loop)."""
        return self.instructions - self.guarded

    def issue_slots(self, num_warps: int) -> int:
        """Warp instructions the loop body issues per iteration of the whole thread block."""
        return self.instructions * num_warps


def parse_sass(text: str) -> list[Instruction]:
    out = []
    for line in text.splitlines():
        m = _INSTR.match(line)
        if m is None:
            continue
        text = m.group(2).strip()
        body = _PRED.sub("", text)
        if not body:
            continue
        out.append(Instruction(int(m.group(1), 16), body.split()[0], body, guard=text[:len(text) - len(body)].strip()))
    return out


def _labels(text: str) -> dict:
    """label → address of the instruction that follows it."""
    labels, pending = {}, []
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.match(line)
        if m and pending:
            for name in pending:
                labels[name] = int(m.group(1), 16)
            pending = []
    return labels


def innermost_loops(text: str) -> list[LoopStats]:
    """Innermost loops of a kernel's SASS (``nvdisasm -c`` output), in address order.

    A loop is a backward ``BRA`` (its target lies before it; the ``BRA`` to itself after ``EXIT``
    is padding, not a loop); back edges to the same header make one loop; a loop is innermost
    when no other loop lies inside it. A span holding an ``EXIT`` is no loop: it is an out-of-line
    path after the kernel's exit (a ``BRA.DIV`` target) branching back into the loop it left.
    """
    instrs = parse_sass(text)
    labels = _labels(text)
    ends: dict = {}
    for ins in instrs:
        if ins.base != "BRA":
            continue
        m = _TARGET.search(ins.text)
        if m is None or m.group(1) not in labels:
            continue
        target = labels[m.group(1)]
        if target < ins.address:
            ends[target] = max(ends.get(target, 0), ins.address)
    exits = [i.address for i in instrs if i.base == "EXIT"]
    loops = sorted((s, e) for s, e in ends.items() if not any(s <= x <= e for x in exits))
    inner = [
        (s, e) for s, e in loops
        if not any((s2, e2) != (s, e) and s <= s2 and e2 <= e for s2, e2 in loops)
    ]
    out = []
    for s, e in inner:
        body = [i for i in instrs if s <= i.address <= e]
        classes = {name: sum(1 for i in body if pred(i.base)) for name, pred in _CLASSES.items()}
        flops = sum(mma_flops_per_warp(i.opcode) for i in body)
        out.append(LoopStats(start=s, end=e, instructions=len(body), mma=classes["mma"], classes=classes,
                             mma_flops=flops, guarded=_guarded(body, labels, e), unroll=_counter_step(body)))
    return out


_INT = r"(-?0x[0-9a-f]+|-?\d+)"
_SETP = re.compile(r"^U?ISETP\.\S+\s+(U?P\d+),\s*U?PT,\s*(U?R\d+),")
_STEP = [re.compile(r"^U?VIADD\s+(U?R\d+),\s*(U?R\d+),\s*" + _INT + r"\s*$"),
         re.compile(r"^U?IADD3\s+(U?R\d+),\s*(U?R\d+),\s*" + _INT + r",\s*U?RZ\s*$")]


def _counter_step(body) -> int:
    """The step of the loop counter: the back edge's predicate is set by an ISETP on a register that
    the body advances by a constant (``VIADD R, R, k`` or ``IADD3 R, R, k, RZ``); 1 when not found."""
    back = body[-1]
    pred = back.guard.lstrip("@!") if back.base == "BRA" else ""
    counter = None
    for ins in reversed(body[:-1]):
        m = _SETP.match(ins.text)
        if pred and m and m.group(1) == pred:
            counter = m.group(2)
            break
    for ins in body:
        for pattern in _STEP:
            m = pattern.match(ins.text)
            if counter and m and m.group(1) == counter and m.group(2) == counter:
                step = int(m.group(3), 0)
                return step if step > 0 else 1
    return 1


def _guarded(body, labels, end) -> int:
    """Instructions of a loop body that some predicated forward branch inside the loop jumps over
    (between the branch and its target, the target inside the loop), each counted once. The
    ``else`` of an if/else, reached by an unconditional branch, is not counted: conservative."""
    skipped = set()
    for ins in body:
        if ins.base != "BRA" or not ins.predicated:
            continue
        m = _TARGET.search(ins.text)
        target = labels.get(m.group(1)) if m else None
        if target is not None and ins.address < target <= end:
            skipped.update(i.address for i in body if ins.address < i.address < target)
    return len(skipped)
