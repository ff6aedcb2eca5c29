"""benchmarks/kernel_cost.py's accounting on hand-made SASS loop counts (no compile): which loops a
call visits how often, the τ max pass's branch charged once per program, unrolled bisections
charged their machine iterations."""

import sys
import types
from pathlib import Path

from adasplash_jax.aot.sass import LoopStats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import kernel_cost  # noqa: E402


def _loop(instructions, mma_flops, guarded=0, unroll=1):
    return LoopStats(start=0, end=0, instructions=instructions, mma=int(mma_flops > 0), classes={},
                     mma_flops=mma_flops, guarded=guarded, unroll=unroll)


def _tau_record():
    # The τ kernel's loops as the SASS lists them: max pass (boundary, interior) with the grid start
    # under a branch, the two bisection loops unrolled 6× and 4×, the solver pass (interior, boundary).
    loops = (_loop(1018, 100, guarded=144), _loop(664, 100, guarded=144), _loop(303, 0, unroll=6),
             _loop(243, 0, unroll=4), _loop(429, 100), _loop(593, 100))
    return types.SimpleNamespace(variant=types.SimpleNamespace(head_dim=64), error=None, label="tau", loops=loops,
                                 num_warps=4)


def test_grid_start_is_charged_once_per_program_and_bisections_per_machine_iteration():
    tau = kernel_cost.profiles([_tau_record()], 64)["tau"]
    assert [n for n, _, _ in tau.loops] == [1018 - 144, 664 - 144, 303, 243, 429, 593]
    assert tau.once_per_program == 288
    visits = kernel_cost.loop_visits(tau, tiles=100, boundary=10, programs=10, solver_passes=3, solver_tiles=50)
    # max pass: 10 boundary + 90 interior tiles; 12 bisections = 2 and 3 machine iterations per
    # program; 3 solver passes over the 50 marked tiles (10 of them boundary)
    assert visits == [10, 90, 20, 30, 3 * 40, 3 * 10]
    slots = kernel_cost.issue_slots(tau, visits, programs=10)
    want = (10 * 874 + 90 * 520 + 20 * 303 + 30 * 243 + 120 * 429 + 30 * 593 + 10 * 288) * 4
    assert slots == want


def test_static_branches_charge_every_tile():
    tau = kernel_cost.profiles([_tau_record()], 64, static_branches=True)["tau"]
    assert [n for n, _, _ in tau.loops] == [1018, 664, 303, 243, 429, 593] and tau.once_per_program == 0


def test_other_kernels_keep_their_static_counts():
    rec = types.SimpleNamespace(variant=types.SimpleNamespace(head_dim=64), error=None, label="forward", num_warps=4,
                                loops=(_loop(336, 100, guarded=20), _loop(513, 100)))
    fwd = kernel_cost.profiles([rec], 64)["forward"]
    assert [n for n, _, _ in fwd.loops] == [336, 513] and fwd.once_per_program == 0
    assert kernel_cost.loop_visits(fwd, tiles=100, boundary=10, programs=10) == [90, 10]
