"""Static configuration of the kernels: block sizes and launch parameters (``BlockSizes``, the
user-facing knobs) and ``KernelConfig`` (everything static about one call)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from adasplash_jax.inputs import AttentionInputs
from adasplash_jax.kernels.mask_info import layout

# A finite stand-in for −inf inside kernels: keeps inf − inf = NaN out of the arithmetic.
MASKED = -1e30
_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_MAX_HEAD_DIM = 256
# Cap of the τ kernel's adaptive solver loop (BlockSizes.n_iter = None).
MAX_SOLVER_PASSES = 16


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and Triton launch parameters.

    ``n_iter``: Halley–bisection passes over the keys in the τ kernel (each recomputes the
    Q·Kᵀ tiles). None (the default) iterates until every row of the query block has
    converged, as the dense solver does (|Σp − 1| < 1e-6, a step below float32 resolution,
    or a Halley step from |Σp − 1| ≤ 1e-4), at most ``MAX_SOLVER_PASSES`` passes; an int
    makes exactly that many passes (for benchmarks and tests). Sparsemax-like rows with many
    entries near the threshold need the most: 6 fixed passes left errors of 2e-3 there.

    ``histogram_start``: the τ kernel's max pass also keeps a histogram of each row, which starts
    the solver inside about one bin (kernels.histogram); False starts from the analytic bracket
    (for side-by-side benchmarks).

    ``num_warps`` / ``num_stages`` launch the forward kernel; ``tau_num_warps`` / ``tau_num_stages`` the τ kernel and
    ``backward_num_warps`` / ``backward_num_stages`` the dK/dV and dQ kernels (None: as the
    forward).

    ``reload_query``: the τ and forward kernels read the query tile from memory at every key tile
    instead of holding it across the key loop. Same instructions per tile, but a different
    register allocation: ptxas holds some kernels at 168 registers and spills when the query tile
    stays live across the loop (see ``for_head_dim``).

    ``fold_row_max``: with bf16/fp16 inputs, every kernel forms z = [(d − m)·mult + shift]_+ as one
    fma per entry, d·mult + (shift − m·mult), the row max folded into the per-row constant
    (``KernelConfig.fold_row_max``); False keeps the subtraction d − m, one more instruction per
    entry, but one register fewer per row of the tile (see ``for_head_dim``).

    ``mass_per_entry``: the τ kernel's solver passes keep Σ z^c0 per entry of the tile across the key
    loop (one fma per entry, z^c1·z added to it) and reduce the rows once per pass, instead of a
    multiply and a row reduction per tile: 32–40 instructions per warp and tile fewer, a tile of
    accumulators more (see ``for_head_dim``).

    ``jensen_bound``: the τ kernel's max pass also sums each row, Σ(anchor − d), for the Jensen
    bound on τ (one subtraction and one add per entry) — with the histogram start that bound saves
    no solver pass (benchmarks/tau_passes.py), and the sum is then kept only as the pass's NaN
    detector. False (histogram start only) drops it: the row max keeps NaN instead
    (tiles.row_max_keeping_nan, no more instructions than the max itself). Without the histogram
    start the bound is the solver's start and always kept (see ``for_head_dim``).
    """

    block_q: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2
    n_iter: int | None = None
    histogram_start: bool = True
    tau_num_warps: int | None = None
    tau_num_stages: int | None = None
    backward_num_warps: int | None = None
    backward_num_stages: int | None = None
    reload_query: bool = False
    fold_row_max: bool = True
    mass_per_entry: bool = False
    jensen_bound: bool = True

    def solver_passes(self) -> int:
        return MAX_SOLVER_PASSES if self.n_iter is None else self.n_iter

    def launch(self) -> dict[str, tuple[int, int]]:
        """(num_warps, num_stages) of each kernel stage: "tau", "forward", "backward"."""
        return dict(tau=(self.tau_num_warps or self.num_warps, self.tau_num_stages or self.num_stages),
                    forward=(self.num_warps, self.num_stages),
                    backward=(self.backward_num_warps or self.num_warps, self.backward_num_stages or self.num_stages))

    @classmethod
    def for_head_dim(cls, head_dim: int, alpha: float | None = None,
                     compute_capability: int | None = None, *, dense_inputs: bool = False) -> "BlockSizes":
        """The defaults for this head dim, α when it is static (an array α: None), the GPU's compute
        capability (90 for sm_90; None when unknown, as when lowering without a GPU: then the choices
        that compile without spills on both sm_80 and sm_90) and whether a dense [T, S] mask or bias
        comes in, chosen from the kernels compiled for sm_80 and sm_90 (python -m adasplash_jax.aot,
        2026-12-01/02, bf16).

        τ kernel: 4 warps for d ≤ 64 — a 64-row tile at 4 warps is one sm_90 warpgroup, so each row's
        reductions stay inside a warp, with no shared-memory exchange between warpgroups: ~30% fewer
        issue slots per tile than 8 warps (d = 64, α = 1.5: max + histogram pass 4,312 → 2,944,
        solver pass 2,664 → 1,824) — with two stages at d = 64 (128–237 registers, none spill; one
        stage spills 16 B on sm_80), sparsemax (α = 2) included since its solver passes visit only
        marked tiles (2026-12-02; sm_90 α = 2: max pass 4,664 → 3,128 slots, solver 2,184 → 1,548;
        before, 4 warps spilled 4–8 B there on sm_80: ptxas stops at 168 registers under the
        PTX's `.reqntid 128`, a heuristic no knob reaches);
        8 warps at d = 128, 4 on sm_90 and later (168–247 registers, none spill; on sm_80 4 warps spill
        8–16 B for α = 1.8 and per-head α), 4 at d = 256 with ``reload_query`` (2026-12-02: 159–167
        registers, none spill; holding the 32×256 query tile, ptxas stops at 168 registers at 2, 4
        and 8 warps and 18 of the 20 bf16 variants spilled 8–48 B; reloading it at 2 warps takes
        255 registers and still spills 8 B in one).

        Forward kernel: 4 warps and two stages up to d = 64, except a static non-polynomial α at
        d = 64 below sm_90 (or an unknown GPU): one stage, as two spill 4 B in the causal α = 1.8
        forward on sm_80 (168 registers). Sparsemax at d ≤ 32 and every α at d = 256 reload the query
        tile (2026-12-02: the d = 32 α = 2 training forward spilled 4–8 B on sm_80 at 168 registers,
        clean at 168–182 reloading; the d = 256 general-α forward spilled 4 B on sm_90; at d = 32
        α = 1.5 and at d = 64, reloading makes the sm_80 forward spill 4–16 B instead, so it is not
        the default there). A dense mask or bias at d = 128 below sm_90: one stage (two: the mask +
        bias training forward spills 12 B on sm_80 at 255 registers, 4 B reloading; one: 247, none).

        Backward kernels: one stage from d = 64 (two stages: dK/dV at 255 registers spills 16–24 B on
        sm_80; one stage: 224–253, none) and 8 warps, 4 at d = 32 (8 warps: the dQ spills 8 B) and, on
        sm_90 and later, at d = 64 too: there dK/dV and dQ at 4 warps keep
        158–255 registers without spills and take about half the issue slots per tile (α = 1.5: dK/dV
        4,968 → 2,608, dQ 3,504 → 1,648), while on sm_80 both reach 255 registers and spill 4 B (at d =
        128 on sm_90, 4 warps spill 8–108 B in five dK/dV variants and 36 B in the learned-α dQ).

        The row max folded into z's fma (``fold_row_max``) everywhere but below sm_90 (or on an unknown
        GPU) at d ≤ 32 (2026-12-03: folded, ptxas holds those at 128–168 registers and spills 4–16 B
        in the d = 32 α = 1.5 and α = 2 forwards, the α = 2 τ kernel and the learned-α dQ on sm_80;
        each row's constant then lives across the key loop). Sparsemax's d = 64 τ kernel below sm_90
        runs at one stage: at two it spills 4–8 B on sm_80, folded or not (168 registers; one stage:
        165–168, none).

        The τ solver's Σ z^c0 kept per entry (``mass_per_entry``) on sm_90 and later up to d = 128
        (2026-12-03, bf16 d = 64 α = 1.5: solver pass 395 → 355 instructions per warp, 147 → 168
        registers; 145–205 registers, none spill; at d = 256 on sm_90, and on sm_80 at d = 32 and
        for general α at d = 64, it spills 8–72 B).

        The τ max pass without the Jensen row sum (``jensen_bound`` off) up to d = 128 on sm_90 and
        later, and on sm_80 without a dense mask or bias (2026-12-04, bf16 d = 64 α = 1.5 on sm_90:
        max pass interior loop 642 → 602 instructions per warp, its boundary loop 996 → 763; at d = 256 on sm_90
        the general-α τ kernels spill 8–16 B without it, as does the d = 64 mask + bias one on
        sm_80). On an unknown GPU it stays on.
        """
        hopper = compute_capability is not None and compute_capability >= 90
        entry_mass = hopper and head_dim <= 128
        jensen = not (head_dim <= 128 and compute_capability is not None and (hopper or not dense_inputs))
        if head_dim <= 32:
            return cls(64, 64, 4, 2, backward_num_warps=4, backward_num_stages=1, reload_query=alpha == 2.0,
                       fold_row_max=hopper, mass_per_entry=entry_mass, jensen_bound=jensen)
        if head_dim <= 64:
            general_alpha = alpha is not None and alpha not in (1.5, 2.0)
            sparsemax_below_hopper = alpha == 2.0 and not hopper
            return cls(64, 64, 4, 1 if general_alpha and not hopper else 2, tau_num_warps=4,
                       tau_num_stages=1 if sparsemax_below_hopper else 2,
                       backward_num_warps=4 if hopper else 8, backward_num_stages=1, mass_per_entry=entry_mass,
                       jensen_bound=jensen)
        if head_dim <= 128:
            return cls(64, 64, 8, 1 if dense_inputs and not hopper else 2, tau_num_warps=4 if hopper else 8,
                       tau_num_stages=2, backward_num_warps=8, backward_num_stages=1, mass_per_entry=entry_mass,
                       jensen_bound=jensen)
        return cls(32, 32, 8, 1, tau_num_warps=4, reload_query=True)

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            b = getattr(self, name)
            if b < 16 or b & (b - 1):
                raise ValueError(f"`BlockSizes.{name}` must be a power of two ≥ 16, got {b}")
        if self.n_iter is not None and (not isinstance(self.n_iter, int) or self.n_iter < 1):
            raise ValueError(f"`BlockSizes.n_iter` must be an int ≥ 1 or None, got {self.n_iter!r}")
        for name in ("num_warps", "tau_num_warps", "backward_num_warps"):
            w = getattr(self, name)
            if (w is not None or name == "num_warps") and (not isinstance(w, int) or w < 1 or w & (w - 1)):
                raise ValueError(f"`BlockSizes.{name}` must be a power of two ≥ 1, got {w!r}")
        for name in ("histogram_start", "reload_query", "fold_row_max", "mass_per_entry", "jensen_bound"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`BlockSizes.{name}` must be a bool, got {getattr(self, name)!r}")
        for name in ("num_stages", "tau_num_stages", "backward_num_stages"):
            n = getattr(self, name)
            if (n is not None or name == "num_stages") and (not isinstance(n, int) or n < 1):
                raise ValueError(f"`BlockSizes.{name}` must be an int ≥ 1, got {n!r}")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Everything static about one call (hashable: it keys the custom_vjp and jit caches)."""

    q_len: int
    kv_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_q: int
    block_k: int
    launch: tuple  # ((stage, (num_warps, num_stages)), ...) for "tau", "forward", "backward"
    n_iter: int  # solver passes: exactly, or at most when adaptive
    adaptive: bool
    histogram_start: bool
    reload_query: bool
    # z as d·mult + (shift − m·mult), one fma per entry (tiles.shifted_z): bf16/fp16 inputs only.
    # Folding m rounds the row constant once, an error of ~2⁻²⁴·|m·mult| in x; scores from bf16/fp16
    # operands carry ~2⁻⁹·|m| already, so it is lost in their rounding. fp32 inputs keep the
    # subtraction (x exact near the max at any score magnitude).
    fold_row_max: bool
    # The τ solver's Σ z^c0 summed per entry across the key loop (BlockSizes.mass_per_entry).
    mass_per_entry: bool
    # The τ max pass's Jensen row sum (BlockSizes.jensen_bound; always without the histogram start).
    jensen_bound: bool
    causal: bool
    window: tuple[int, int] | None
    scale: float
    alpha_static: float | None
    has_segments: bool
    has_alibi: bool
    # (batched, per_head) of a dense mask / bias [b, n, T, S] (kernels.mask_info), None when absent.
    mask_layout: tuple[bool, bool] | None
    bias_layout: tuple[bool, bool] | None
    exact_dots: bool
    interpret: bool
    debug: bool
    # The forward kernel also counts the non-zero probabilities per row (sparsity statistics).
    count_nonzero: bool = False

    @property
    def irregular(self) -> bool:
        """Whether the kept entries of a tile depend on more than positions, lengths and the causal
        diagonal (segments, windows, dense masks): no tile is then known to be interior."""
        return self.has_segments or self.window is not None or self.mask_layout is not None

    @property
    def groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def head_dim_padded(self) -> int:
        return max(16, pl.next_power_of_2(self.head_dim))

    @property
    def num_q_blocks(self) -> int:
        return pl.cdiv(self.q_len, self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return pl.cdiv(self.kv_len, self.block_k)

    @property
    def q_len_padded(self) -> int:
        return self.num_q_blocks * self.block_q

    @property
    def kv_len_padded(self) -> int:
        return self.num_kv_blocks * self.block_k

    # Lists and block-mask rows are stored with a power-of-two length (Triton loads/stores).
    @property
    def q_blocks_padded(self) -> int:
        return pl.next_power_of_2(self.num_q_blocks)

    @property
    def kv_blocks_padded(self) -> int:
        return pl.next_power_of_2(self.num_kv_blocks)

    def compiler_params(self, stage: str):
        num_warps, num_stages = dict(self.launch)[stage]
        return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _resolve_interpret(interpret: bool | None) -> bool:
    if interpret is None:
        return jax.default_backend() != "gpu"
    return bool(interpret)


def tile_shape(block_sizes: BlockSizes, q_len: int, kv_len: int) -> tuple[int, int]:
    """(block_q, block_k) the kernels use: the configured tiles, shrunk for short sequences
    (decoding) to the sequence, still a power of two ≥ 16."""
    block_q = min(block_sizes.block_q, max(16, pl.next_power_of_2(q_len)))
    block_k = min(block_sizes.block_k, max(16, pl.next_power_of_2(kv_len)))
    return block_q, block_k


def local_compute_capability() -> int | None:
    """Compute capability of the default backend's GPU (90 for an H100), or None: no NVIDIA GPU here
    (a CPU, interpret mode, or lowering for CUDA on a machine without one)."""
    if jax.default_backend() != "gpu":
        return None
    cc = getattr(jax.devices()[0], "compute_capability", None)
    try:
        major, minor = str(cc).split(".")
        return 10 * int(major) + int(minor)
    except ValueError:
        return None


def default_tile_shape(head_dim: int, q_len: int, kv_len: int) -> tuple[int, int]:
    """The tiles of a call with default block sizes (also used to count dense sparsity stats)."""
    return tile_shape(BlockSizes.for_head_dim(head_dim), q_len, kv_len)


def padding_mask_axis(mask):
    """2 for a query mask [b, 1, T, 1], 3 for a key mask [b, 1, 1, S], None for any other mask."""
    shape = (1,) * (4 - mask.ndim) + tuple(mask.shape)
    if shape[1] != 1:
        return None
    if shape[2] == 1:
        return 3
    if shape[3] == 1:
        return 2
    return None


def unsupported_reason(inp: AttentionInputs) -> str | None:
    """Why the kernels cannot take these inputs (the dense path can), or None."""
    dtype, H = inp.query.dtype, inp.query.shape[3]
    if dtype not in _SUPPORTED_DTYPES:
        return f"`query` dtype {dtype} is not supported by the Pallas kernels; use float32, bfloat16 or float16"
    if H > _MAX_HEAD_DIM:
        return f"`query` head_dim {H} is not supported by the Pallas kernels (at most {_MAX_HEAD_DIM})"
    if inp.bias is not None and inp.bias.dtype not in _SUPPORTED_DTYPES:
        return f"`bias` dtype {inp.bias.dtype} is not supported by the Pallas kernels; use float32, bfloat16 or float16"
    return None


def make_config(inp: AttentionInputs, block_sizes: BlockSizes | None, interpret: bool | None, debug: bool = False,
                count_nonzero: bool = False):
    B, T, N, H = inp.query.shape
    S, K = inp.key.shape[1], inp.key.shape[2]
    reason = unsupported_reason(inp)
    if reason is not None:
        raise ValueError(reason)
    dtype = inp.query.dtype
    alpha_static = inp.alpha if isinstance(inp.alpha, float) else None
    padding_mask = inp.mask is not None and padding_mask_axis(inp.mask) is not None
    dense_mask = None if inp.mask is None or padding_mask else inp.mask
    bs = block_sizes or BlockSizes.for_head_dim(H, alpha_static, local_compute_capability(),
                                                dense_inputs=dense_mask is not None or inp.bias is not None)
    block_q, block_k = tile_shape(bs, T, S)
    return KernelConfig(
        q_len=T, kv_len=S, num_heads=N, num_kv_heads=K, head_dim=H,
        block_q=block_q, block_k=block_k, launch=tuple(bs.launch().items()),
        n_iter=bs.solver_passes(), adaptive=bs.n_iter is None, histogram_start=bs.histogram_start,
        reload_query=bs.reload_query, fold_row_max=bs.fold_row_max and dtype != jnp.float32,
        mass_per_entry=bs.mass_per_entry, jensen_bound=bs.jensen_bound or not bs.histogram_start,
        causal=inp.is_causal, window=inp.window,
        scale=abs(inp.scale),  # kernel_inputs negates the key for a negative scale
        alpha_static=alpha_static,
        has_segments=inp.q_segment_ids is not None or padding_mask, has_alibi=inp.alibi_slopes is not None,
        mask_layout=layout(dense_mask), bias_layout=layout(inp.bias),
        exact_dots=dtype == jnp.float32,
        interpret=_resolve_interpret(interpret), debug=debug, count_nonzero=count_nonzero,
    )


