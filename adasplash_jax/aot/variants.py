"""What to compile: one ``Variant`` is one call of ``entmax_attention`` (shapes, dtype, α, masks, tiles);
lowering it yields the kernels of its inference program (τ, forward) and its training program
(τ, forward with residuals, dK/dV, dQ)."""

from __future__ import annotations

import dataclasses
import itertools

PROGRAMS = ("inference", "training")
ALPHA_MODES = ("head", "learned")  # α as a per-head array; "learned" also differentiates it
# Optional inputs that change the kernels: a local window (left 256, and right 256 unless causal),
# ALiBi slopes [heads], a dense bool mask shared by the batch [1, heads, L, L], a dense bias shared
# by the heads [batch, 1, L, L] (differentiated in the training program).
FEATURES = ("window", "alibi", "mask", "bias")
_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclasses.dataclass(frozen=True)
class Variant:
    head_dim: int = 64
    dtype: str = "bfloat16"
    causal: bool = True
    alpha: float | str = 1.5  # a float (static α), "head" (array [heads]) or "learned" (array, differentiated)
    seq_len: int = 4096
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: as many as query heads; fewer: grouped-query attention
    batch: int = 1
    block_sizes: object = None  # an adasplash_jax.BlockSizes, or None for the library's defaults
    programs: tuple = PROGRAMS
    features: tuple = ()  # a subset of FEATURES

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(f"`dtype` must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if isinstance(self.alpha, str) and self.alpha not in ALPHA_MODES:
            raise ValueError(f"`alpha` must be a float or one of {ALPHA_MODES}, got {self.alpha!r}")
        if not set(self.programs) <= set(PROGRAMS) or not self.programs:
            raise ValueError(f"`programs` must be a non-empty subset of {PROGRAMS}, got {self.programs!r}")
        if not set(self.features) <= set(FEATURES):
            raise ValueError(f"`features` must be a subset of {FEATURES}, got {self.features!r}")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def name(self) -> str:
        a = self.alpha if isinstance(self.alpha, str) else f"{float(self.alpha):g}"
        parts = [f"d{self.head_dim}", _DTYPES[self.dtype], "causal" if self.causal else "full", f"a{a}",
                 f"L{self.seq_len}"]
        if self.kv_heads != self.num_heads:
            parts.append(f"gqa{self.num_heads}:{self.kv_heads}")
        if self.block_sizes is not None:
            b = self.block_sizes
            launch = b.launch()
            (tw, ts), (bw, bs) = launch["tau"], launch["backward"]
            parts.append(f"tile{b.block_q}x{b.block_k}w{b.num_warps}s{b.num_stages}-tau{tw}w{ts}s-bwd{bw}w{bs}s")
            if not b.histogram_start:
                parts.append("nohist")
            if b.reload_query:
                parts.append("reloadq")
            if not b.fold_row_max:
                parts.append("nofold")
            if b.mass_per_entry:
                parts.append("entrymass")
            if not b.jensen_bound:
                parts.append("nojensen")
        if self.features:
            parts.append("+".join(self.features))
        return "-".join(parts)


HEAD_DIMS = (32, 64, 128, 256)
ALPHAS = (1.5, 2.0, 1.8, "head", "learned")


def matrix(full: bool = False) -> list[Variant]:
    """The variants CI compiles for every target (tests/test_aot.py).

    bf16: every head dim × causal and not × every α mode; grouped-query attention; one long
    sequence; window + ALiBi and dense mask + bias at d = 64 and 128. fp16 (``full=False``): every head dim, causal, α = 1.5 and learned — on 2026-12-01 every
    fp16 kernel of the full product compiled to exactly the registers and spills of its bf16 twin,
    so the rest of the fp16 product costs CI time for nothing; ``full=True`` compiles it all.
    fp32 (reported, not held to the no-spill rule): d = 64, causal, α = 1.5 (its kernels spill
    kilobytes and take ptxas ~10× longer); ``full=True`` adds d = 128.
    """
    out = [
        Variant(head_dim=d, dtype="bfloat16", causal=c, alpha=a)
        for d, c, a in itertools.product(HEAD_DIMS, (True, False), ALPHAS)
    ]
    if full:
        out += [Variant(head_dim=d, dtype="float16", causal=c, alpha=a)
                for d, c, a in itertools.product(HEAD_DIMS, (True, False), ALPHAS)]
    else:
        out += [Variant(head_dim=d, dtype="float16", causal=True, alpha=a) for d in HEAD_DIMS for a in (1.5, "learned")]
    out += [Variant(head_dim=d, dtype="float32", causal=True, alpha=1.5) for d in ((64, 128) if full else (64,))]
    out += [Variant(head_dim=d, dtype="bfloat16", causal=True, alpha=a, num_heads=8, num_kv_heads=2)
            for d in (64, 128) for a in (1.5, "learned")]
    out += [Variant(head_dim=d, dtype="bfloat16", causal=True, alpha=1.5, seq_len=16384) for d in (64, 128)]
    # The kernels' optional inputs: window + ALiBi, dense mask + bias (with its gradient).
    out += [Variant(head_dim=d, dtype="bfloat16", causal=True, alpha=1.5, features=f)
            for d in (64, 128) for f in (("window", "alibi"), ("mask", "bias"))]
    return out
