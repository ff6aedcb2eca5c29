"""Entmax attention in Pallas (Triton backend), the AdaSplash way: O(L) memory, zero tiles skipped.

Four kernels, each next to the pure-JAX dense path it must agree with
(``adasplash_jax.attention.dense_attention``):

1. ``_threshold_kernel`` (grid: query blocks × batch × heads) — per query row, τ by
   Halley–bisection over key blocks, recomputing Q·Kᵀ tiles; never writes scores. Also
   the normaliser Σp, the row's non-zero / allowed counts, and the block mask: a tile
   (query block, key block) is active if any probability in it is non-zero.
2. ``active_block_lists`` (plain XLA, static shapes, no host sync) — per query block the
   count and list of active key blocks, and per key block the count and list of active
   query blocks.
3. ``_forward_kernel`` — loops over the active key blocks only (loop bound = count,
   block index read from the list) and accumulates O, and when training
   Õ = Σ U·V / Σ U with U = P^(2−α).
4. ``_dkdv_kernel`` (grid: key blocks × batch × kv heads; loops over the query heads of
   the group and their active query blocks) and ``_dq_kernel`` (grid: query blocks;
   loops over active key blocks; also the row terms of the α gradient).

Inputs are padded to whole blocks (and head_dim to a power of two ≥ 16) on the XLA side;
padded keys and queries are masked by the same ``keep_mask`` the dense path uses.
On a CPU backend the kernels run in Pallas interpret mode.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from adasplash_jax.attention import AttentionInputs, SparsityStats, tile_fractions
from adasplash_jax.entmax import _powers as entmax_powers
from adasplash_jax.entmax import solver_step
from adasplash_jax.masking import keep_mask

# A finite stand-in for −inf inside kernels: keeps inf − inf = NaN out of the arithmetic.
MASKED = -1e30
_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and Triton launch parameters.

    ``n_iter``: Halley–bisection passes over the keys in the τ kernel (each recomputes the
    Q·Kᵀ tiles). None picks by α: 4 for α ≤ 1.6, 6 above (sparsemax-like rows converge
    slowest); measured to reach float32 agreement with the exact dense path on rows of
    512–2048 keys at several score scales.
    """

    block_q: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2
    n_iter: int | None = None

    def solver_passes(self, alpha_static: float | None) -> int:
        if self.n_iter is not None:
            return self.n_iter
        return 4 if alpha_static is not None and alpha_static <= 1.6 else 6

    @classmethod
    def for_head_dim(cls, head_dim: int) -> "BlockSizes":
        if head_dim <= 64:
            return cls(64, 64, 4, 2)
        if head_dim <= 128:
            return cls(64, 64, 8, 2)
        return cls(32, 32, 8, 1)

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            b = getattr(self, name)
            if b < 16 or b & (b - 1):
                raise ValueError(f"`BlockSizes.{name}` must be a power of two ≥ 16, got {b}")
        if self.n_iter is not None and self.n_iter < 1:
            raise ValueError(f"`BlockSizes.n_iter` must be ≥ 1, got {self.n_iter}")


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one call (hashable: it keys the custom_vjp and jit caches)."""

    q_len: int
    kv_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_q: int
    block_k: int
    num_warps: int
    num_stages: int
    n_iter: int
    causal: bool
    scale: float
    alpha_static: float | None
    has_segments: bool
    exact_dots: bool
    interpret: bool
    debug: bool

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

    def compiler_params(self):
        return plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


# ----------------------------------------------------------------- shared tile logic


def _dot(cfg: _Config, a, b, *, trans_a=False, trans_b=False):
    """fp32-accumulating tile matmul; fp32 inputs use full precision (no TF32)."""
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, allow_tf32=False if cfg.exact_dots else None)


class _Row:
    """Per-row (query) context loaded once per query block: positions, lengths, segments."""

    def __init__(self, cfg: _Config, q_block, q_len, kv_len, q_segment):
        self.cfg = cfg
        self.q_start = q_block * cfg.block_q
        self.q_pos = (self.q_start + jnp.arange(cfg.block_q, dtype=jnp.int32))[:, None]
        self.q_len = q_len
        self.kv_len = kv_len
        self.q_segment = None if q_segment is None else q_segment[:, None]

    def key_block_bound(self):
        """Key blocks this query block can see at all: up to the causal diagonal and kv length."""
        cfg = self.cfg
        kv_end = self.kv_len
        if cfg.causal:
            kv_end = jnp.minimum(kv_end, self.q_start + cfg.block_q)
        return lax.div(kv_end + cfg.block_k - 1, cfg.block_k)

    def keep(self, kv_block, kv_segment_ref):
        cfg = self.cfg
        kv_start = kv_block * cfg.block_k
        kv_pos = (kv_start + jnp.arange(cfg.block_k, dtype=jnp.int32))[None, :]
        kv_segment = None
        if kv_segment_ref is not None:
            kv_segment = kv_segment_ref[pl.ds(kv_start, cfg.block_k)][None, :]
        return keep_mask(
            self.q_pos,
            kv_pos,
            is_causal=cfg.causal,
            q_len=self.q_len,
            kv_len=self.kv_len,
            q_segment=self.q_segment,
            kv_segment=kv_segment,
        )

    def scores(self, q, k_ref, kv_block, kv_segment_ref):
        """Entmax input s = scale·q·kᵀ of one tile (fp32) and its keep mask; masked → MASKED."""
        cfg = self.cfg
        k = k_ref[pl.ds(kv_block * cfg.block_k, cfg.block_k), :]
        s = _dot(cfg, q, k, trans_b=True) * cfg.scale
        keep = self.keep(kv_block, kv_segment_ref)
        return jnp.where(keep, s, MASKED), keep, k


def _alpha(cfg: _Config, alpha_ref, index):
    return cfg.alpha_static if cfg.alpha_static is not None else alpha_ref[index]


def _tile_powers(cfg: _Config, alpha, s, tau):
    """(z^c0, z^c1) with z = [(α−1)·s − τ]_+ (masked entries give z = 0)."""
    z = jnp.maximum((alpha - 1.0) * s - tau[:, None], 0.0)
    p0, p1, _ = entmax_powers(cfg.alpha_static, alpha, z)
    return z, p0, p1


def _load_segment(ref, start, size):
    return None if ref is None else ref[pl.ds(start, size)]


# ------------------------------------------------------------------- 1. τ kernel


def _threshold_kernel(
    alpha_ref, q_len_ref, kv_len_ref, q_ref, k_ref, q_segment_ref, kv_segment_ref,
    tau_ref, norm_ref, nonzero_ref, allowed_ref, block_mask_ref,
    *, cfg: _Config,
):
    q_block = pl.program_id(0)
    alpha = _alpha(cfg, alpha_ref, 0)
    q = q_ref[...]
    row = _Row(cfg, q_block, q_len_ref[...], kv_len_ref[...],
               _load_segment(q_segment_ref, q_block * cfg.block_q, cfg.block_q))
    num_blocks = row.key_block_bound()
    x_scale = alpha - 1.0

    def max_pass(j, carry):
        row_max, row_sum, allowed = carry
        s, keep, _ = row.scores(q, k_ref, j, kv_segment_ref)
        row_max = jnp.maximum(row_max, jnp.max(s, axis=1) * x_scale)
        row_sum = row_sum + jnp.sum(jnp.where(keep, s, 0.0), axis=1) * x_scale
        allowed = allowed + jnp.sum(keep.astype(jnp.float32), axis=1)
        return row_max, row_sum, allowed

    zero = jnp.zeros((cfg.block_q,), jnp.float32)
    init = (jnp.full((cfg.block_q,), MASKED, jnp.float32), zero, zero)
    row_max, row_sum, allowed = lax.fori_loop(0, num_blocks, max_pass, init)
    # Rows with nothing to attend to keep τ = 0, far above their MASKED scores.
    has_any = allowed > 0
    lo, hi = threshold_bracket(row_max, row_sum, allowed, alpha)
    lo, hi = jnp.where(has_any, lo, 0.0), jnp.where(has_any, hi, 0.0)
    tau = 0.5 * (lo + hi)

    def solver_iteration(_, carry):
        tau, lo, hi = carry

        def sums(j, acc):
            s, _, _ = row.scores(q, k_ref, j, kv_segment_ref)
            z = jnp.maximum(x_scale * s - tau[:, None], 0.0)
            t0, t1, t2 = entmax_powers(cfg.alpha_static, alpha, z)
            return acc[0] + jnp.sum(t0, 1), acc[1] + jnp.sum(t1, 1), acc[2] + jnp.sum(t2, 1)

        zero = jnp.zeros((cfg.block_q,), jnp.float32)
        s0, s1, s2 = lax.fori_loop(0, num_blocks, sums, (zero, zero, zero))
        new_tau, lo, hi, f, *_ = solver_step(cfg.alpha_static, alpha, tau, lo, hi, s0, s1, s2)
        return jnp.where(f == 0, tau, new_tau), lo, hi

    tau, lo, hi = lax.fori_loop(0, cfg.n_iter, solver_iteration, (tau, lo, hi))

    def final_pass(j, carry):
        norm, nonzero, bits = carry
        s, _, _ = row.scores(q, k_ref, j, kv_segment_ref)
        z, p0, _ = _tile_powers(cfg, alpha, s, tau)
        support = (z > 0).astype(jnp.float32)
        active = jnp.max(support).astype(jnp.int32)
        bits = jnp.where(jnp.arange(cfg.kv_blocks_padded) == j, active, bits)
        return norm + jnp.sum(p0, 1), nonzero + jnp.sum(support, 1), bits

    zero = jnp.zeros((cfg.block_q,), jnp.float32)
    norm, nonzero, bits = lax.fori_loop(
        0, num_blocks, final_pass, (zero, zero, jnp.zeros((cfg.kv_blocks_padded,), jnp.int32))
    )
    tau_ref[...] = tau
    norm_ref[...] = norm
    nonzero_ref[...] = nonzero
    allowed_ref[...] = allowed
    block_mask_ref[...] = bits


def threshold_bracket(row_max, row_sum, count, alpha):
    """Bracket [lo, hi] of τ for (α−1)-scaled rows with this max, sum and entry count.

    hi = max − n^(1−α) (all entries equal). lo is the larger of max − 1 (the max alone
    reaches 1) and mean − n^(1−α): t ↦ [t]_+^(1/(α−1)) is convex and increasing, so by
    Jensen Σ[x − τ]_+^c0 ≥ n·[mean − τ]_+^c0, which is ≥ 1 at τ = mean − n^(1−α).
    The second bound is tight for near-uniform rows, where max − 1 is far off.
    """
    n = jnp.maximum(count, 1.0)
    spread = jnp.exp((1.0 - alpha) * jnp.log(n))
    hi = row_max - spread
    lo = jnp.minimum(jnp.maximum(row_max - 1.0, row_sum / n - spread), hi)
    return lo, hi


# ------------------------------------------------------------- 2. block index lists


def active_block_lists(block_mask):
    """Count and padded list of the active entries along the last axis of a 0/1 mask.

    Static shapes, no host sync: active indices come first, in increasing order (a stable
    argsort of "inactive"); the padding repeats index 0 and is never visited because
    kernels loop only up to the count.
    """
    active = block_mask > 0
    counts = jnp.sum(active, axis=-1, dtype=jnp.int32)
    order = jnp.argsort(~active, axis=-1, stable=True).astype(jnp.int32)
    slots = jnp.arange(block_mask.shape[-1], dtype=jnp.int32)
    return counts, jnp.where(slots < counts[..., None], order, 0)


# -------------------------------------------------------------- 3. forward kernel


def _forward_kernel(
    alpha_ref, q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, q_segment_ref, kv_segment_ref,
    tau_ref, inv_norm_ref, count_ref, list_ref,
    out_ref, *extra_refs,
    cfg: _Config, with_residual: bool,
):
    q_block = pl.program_id(0)
    alpha = _alpha(cfg, alpha_ref, 0)
    q = q_ref[...]
    row = _Row(cfg, q_block, q_len_ref[...], kv_len_ref[...],
               _load_segment(q_segment_ref, q_block * cfg.block_q, cfg.block_q))
    tau = tau_ref[...]
    hp = cfg.head_dim_padded

    def body(t, carry):
        acc, acc_u, u_sum = carry
        j = list_ref[t]
        s, _, _ = row.scores(q, k_ref, j, kv_segment_ref)
        _, p0, p1 = _tile_powers(cfg, alpha, s, tau)
        v = v_ref[pl.ds(j * cfg.block_k, cfg.block_k), :]
        acc = acc + _dot(cfg, p0.astype(v.dtype), v)
        if with_residual:
            acc_u = acc_u + _dot(cfg, p1.astype(v.dtype), v)
            u_sum = u_sum + jnp.sum(p1, 1)
        return acc, acc_u, u_sum

    zeros = jnp.zeros((cfg.block_q, hp), jnp.float32)
    init = (zeros, zeros, jnp.zeros((cfg.block_q,), jnp.float32))
    count = count_ref[...]
    acc, acc_u, u_sum = lax.fori_loop(0, count, body, init)
    out_ref[...] = (acc * inv_norm_ref[...][:, None]).astype(out_ref.dtype)
    extra = list(extra_refs)
    if with_residual:
        out_tilde_ref = extra.pop(0)
        out_tilde_ref[...] = acc_u / jnp.where(u_sum > 0, u_sum, 1.0)[:, None]
    if cfg.debug:
        extra.pop(0)[...] = count  # tiles visited by this program (the loop ran `count` times)


# ------------------------------------------------------------- 4. backward kernels


def _dkdv_kernel(
    alpha_ref, q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref, q_segment_ref, kv_segment_ref,
    tau_ref, inv_norm_ref, u_scale_ref, delta_ref, count_ref, list_ref,
    dk_ref, dv_ref, *debug_refs,
    cfg: _Config,
):
    kv_block = pl.program_id(0)
    kv_start = kv_block * cfg.block_k
    k = k_ref[pl.ds(kv_start, cfg.block_k), :]
    v = v_ref[pl.ds(kv_start, cfg.block_k), :]
    hp = cfg.head_dim_padded
    dk = jnp.zeros((cfg.block_k, hp), jnp.float32)
    dv = jnp.zeros((cfg.block_k, hp), jnp.float32)
    visited = jnp.int32(0)
    q_len, kv_len = q_len_ref[...], kv_len_ref[...]

    for g in range(cfg.groups):  # query heads sharing this key/value head
        alpha = _alpha(cfg, alpha_ref, g)

        def body(t, carry, g=g, alpha=alpha):
            dk, dv = carry
            i = list_ref[g, t]
            rows = pl.ds(i * cfg.block_q, cfg.block_q)
            q = q_ref[rows, g, :]
            do = do_ref[rows, g, :]
            row = _Row(cfg, i, q_len, kv_len, _load_segment(q_segment_ref, i * cfg.block_q, cfg.block_q))
            s = _dot(cfg, q, k, trans_b=True) * cfg.scale
            s = jnp.where(row.keep(kv_block, kv_segment_ref), s, MASKED)
            _, p0, p1 = _tile_powers(cfg, alpha, s, tau_ref[g, rows])
            p = p0 * inv_norm_ref[g, rows][:, None]
            u = p1 * u_scale_ref[g, rows][:, None]
            dv = dv + _dot(cfg, p.astype(do.dtype), do, trans_a=True)
            dp = _dot(cfg, do, v, trans_b=True)
            ds = u * (dp - delta_ref[g, rows][:, None])
            dk = dk + _dot(cfg, ds.astype(q.dtype), q, trans_a=True)
            return dk, dv

        count = count_ref[g]
        dk, dv = lax.fori_loop(0, count, body, (dk, dv))
        visited = visited + count
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    if cfg.debug:
        debug_refs[0][...] = visited


def _dq_kernel(
    alpha_ref, q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref, q_segment_ref, kv_segment_ref,
    tau_ref, inv_norm_ref, u_scale_ref, delta_ref, count_ref, list_ref,
    dq_ref, *extra_refs,
    cfg: _Config, with_alpha_grad: bool,
):
    q_block = pl.program_id(0)
    alpha = _alpha(cfg, alpha_ref, 0)
    q = q_ref[...]
    do = do_ref[...]
    row = _Row(cfg, q_block, q_len_ref[...], kv_len_ref[...],
               _load_segment(q_segment_ref, q_block * cfg.block_q, cfg.block_q))
    tau, inv_norm, u_scale, delta = tau_ref[...], inv_norm_ref[...], u_scale_ref[...], delta_ref[...]

    def body(t, carry):
        dq, sums = carry
        j = list_ref[t]
        s, keep, k = row.scores(q, k_ref, j, kv_segment_ref)
        _, p0, p1 = _tile_powers(cfg, alpha, s, tau)
        p = p0 * inv_norm[:, None]
        u = p1 * u_scale[:, None]
        v = v_ref[pl.ds(j * cfg.block_k, cfg.block_k), :]
        dp = _dot(cfg, do, v, trans_b=True)
        ds = u * (dp - delta[:, None])
        dq = dq + _dot(cfg, ds.astype(k.dtype), k)
        if with_alpha_grad:
            # Row sums for dL/dα (see _alpha_grad_from_row_sums): Σu·s, Σp·log p, Σ dP·u·s, Σ dP·p·log p.
            s_on = jnp.where(p > 0, s, 0.0)
            p_log_p = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
            sums = (
                sums[0] + jnp.sum(u * s_on, 1),
                sums[1] + jnp.sum(p_log_p, 1),
                sums[2] + jnp.sum(dp * u * s_on, 1),
                sums[3] + jnp.sum(dp * p_log_p, 1),
                sums[4] + jnp.sum(u, 1),
            )
        return dq, sums

    zero = jnp.zeros((cfg.block_q,), jnp.float32)
    init = (jnp.zeros((cfg.block_q, cfg.head_dim_padded), jnp.float32), (zero,) * 5)
    count = count_ref[...]
    dq, sums = lax.fori_loop(0, count, body, init)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)
    extra = list(extra_refs)
    if with_alpha_grad:
        extra.pop(0)[...] = _alpha_grad_from_row_sums(alpha, delta, *sums)
    if cfg.debug:
        extra.pop(0)[...] = count


def _alpha_grad_from_row_sums(alpha, delta, us, plogp, dp_us, dp_plogp, u_sum):
    """dL/dα of one row: with c0 = 1/(α−1) and dp_j/dα = c0·(u_j(s_j − τ') − p_j log p_j),
    τ' = (Σus − Σ p log p)/Σu, contracted with dP (and Σ dP·u = δ·Σu)."""
    c0 = 1.0 / (alpha - 1.0)
    safe = jnp.where(u_sum > 0, u_sum, 1.0)
    tau_prime = (us - plogp) / safe
    return c0 * (dp_us - tau_prime * delta * u_sum - dp_plogp)


# ---------------------------------------------------------------- pallas_call glue


def _specs(cfg: _Config, grid_over: str):
    """BlockSpecs shared by the kernels. grid_over="q": (q block, batch, head);
    grid_over="kv": (kv block, batch, kv head) with the group's query heads in each block."""
    G, hp = cfg.groups, cfg.head_dim_padded
    T, S = cfg.q_len_padded, cfg.kv_len_padded
    if grid_over == "q":
        return dict(
            alpha=pl.BlockSpec((1,), lambda i, b, n: (n,)),
            batch_scalar=pl.BlockSpec((None,), lambda i, b, n: (b,)),
            q=pl.BlockSpec((None, cfg.block_q, None, hp), lambda i, b, n: (b, i, n, 0)),
            kv=pl.BlockSpec((None, S, None, hp), lambda i, b, n: (b, 0, n // G, 0)),
            q_segment=pl.BlockSpec((None, T), lambda i, b, n: (b, 0)),
            kv_segment=pl.BlockSpec((None, S), lambda i, b, n: (b, 0)),
            row=pl.BlockSpec((None, None, cfg.block_q), lambda i, b, n: (b, n, i)),
            block_scalar=pl.BlockSpec((None, None, None), lambda i, b, n: (b, n, i)),
            block_list=lambda width: pl.BlockSpec((None, None, None, width), lambda i, b, n: (b, n, i, 0)),
        )
    return dict(
        alpha=pl.BlockSpec((G,), lambda j, b, h: (h,)),
        batch_scalar=pl.BlockSpec((None,), lambda j, b, h: (b,)),
        q=pl.BlockSpec((None, T, G, hp), lambda j, b, h: (b, 0, h, 0)),
        kv=pl.BlockSpec((None, S, None, hp), lambda j, b, h: (b, 0, h, 0)),
        kv_out=pl.BlockSpec((None, cfg.block_k, None, hp), lambda j, b, h: (b, j, h, 0)),
        q_segment=pl.BlockSpec((None, T), lambda j, b, h: (b, 0)),
        kv_segment=pl.BlockSpec((None, S), lambda j, b, h: (b, 0)),
        row=pl.BlockSpec((None, G, T), lambda j, b, h: (b, h, 0)),
        block_scalar=pl.BlockSpec((None, G, None), lambda j, b, h: (b, h, j)),
        block_list=lambda width: pl.BlockSpec((None, G, None, width), lambda j, b, h: (b, h, j, 0)),
    )


def _segment_specs(cfg, specs):
    if not cfg.has_segments:
        return [None, None]
    return [specs["q_segment"], specs["kv_segment"]]


def _call(kernel, cfg, grid, in_specs, out_specs, out_shape, name):
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=cfg.compiler_params(),
        interpret=cfg.interpret,
        name=name,
    )


def _thresholds(cfg: _Config, alpha, q_len, kv_len, q, k, q_seg, kv_seg):
    B, N = q.shape[0], cfg.num_heads
    sp = _specs(cfg, "q")
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    row_shape = f32(B, N, cfg.q_len_padded)
    outs = _call(
        functools.partial(_threshold_kernel, cfg=cfg),
        cfg,
        (cfg.num_q_blocks, B, N),
        [sp["alpha"], sp["batch_scalar"], sp["batch_scalar"], sp["q"], sp["kv"], *_segment_specs(cfg, sp)],
        [sp["row"]] * 4 + [sp["block_list"](cfg.kv_blocks_padded)],
        [row_shape] * 4 + [jax.ShapeDtypeStruct((B, N, cfg.num_q_blocks, cfg.kv_blocks_padded), jnp.int32)],
        "entmax_threshold",
    )(alpha, q_len, kv_len, q, k, q_seg, kv_seg)
    tau, norm, nonzero, allowed, block_mask = outs
    return tau, norm, nonzero, allowed, block_mask[..., : cfg.num_kv_blocks]


def _forward(cfg: _Config, alpha, q_len, kv_len, q, k, v, q_seg, kv_seg, with_residual: bool):
    B, N = q.shape[0], cfg.num_heads
    tau, norm, nonzero, allowed, block_mask = _thresholds(cfg, alpha, q_len, kv_len, q, k, q_seg, kv_seg)
    inv_norm = jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 0.0)
    q_counts, q_lists = active_block_lists(_pad_last(block_mask, cfg.kv_blocks_padded))
    sp = _specs(cfg, "q")
    out_specs = [sp["q"]]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if with_residual:
        out_specs.append(sp["q"])
        out_shape.append(jax.ShapeDtypeStruct(q.shape, jnp.float32))
    if cfg.debug:
        out_specs.append(sp["block_scalar"])
        out_shape.append(jax.ShapeDtypeStruct((B, N, cfg.num_q_blocks), jnp.int32))
    outs = _call(
        functools.partial(_forward_kernel, cfg=cfg, with_residual=with_residual),
        cfg,
        (cfg.num_q_blocks, B, N),
        [sp["alpha"], sp["batch_scalar"], sp["batch_scalar"], sp["q"], sp["kv"], sp["kv"],
         *_segment_specs(cfg, sp), sp["row"], sp["row"], sp["block_scalar"],
         sp["block_list"](cfg.kv_blocks_padded)],
        out_specs,
        out_shape,
        "entmax_attention_forward",
    )(alpha, q_len, kv_len, q, k, v, q_seg, kv_seg, tau, inv_norm, q_counts, q_lists)
    stats = dict(tau=tau, norm=norm, inv_norm=inv_norm, nonzero=nonzero, allowed=allowed,
                 block_mask=block_mask, q_counts=q_counts, q_lists=q_lists)
    return outs, stats


def _pad_last(x, width):
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])


def _backward_in_specs(cfg: _Config, sp, list_width: int):
    """Inputs of both backward kernels: α, lengths, q, k, v, dO, segments, τ, 1/Σ, u scale, δ, count, list."""
    return [sp["alpha"], sp["batch_scalar"], sp["batch_scalar"], sp["q"], sp["kv"], sp["kv"], sp["q"],
            *_segment_specs(cfg, sp), *[sp["row"]] * 4, sp["block_scalar"], sp["block_list"](list_width)]


def _backward(cfg: _Config, alpha, q_len, kv_len, q, k, v, q_seg, kv_seg, stats, out_tilde, d_out,
              with_alpha_grad: bool):
    B, N, K = q.shape[0], cfg.num_heads, cfg.num_kv_heads
    d_out = d_out.astype(q.dtype)
    # δ_i = dO_i · Õ_i, per row, laid out [B, N, T] like τ.
    delta = jnp.einsum("btnh,btnh->bnt", d_out.astype(jnp.float32), out_tilde)
    norm = stats["norm"]
    alpha_rows = (jnp.float32(cfg.alpha_static) if cfg.alpha_static is not None else alpha[None, :, None])
    # u = p^(2−α) with p = z^c0 / Σ: u = z^c1 · Σ^(α−2).
    u_scale = jnp.where(norm > 0, jnp.exp((alpha_rows - 2.0) * jnp.log(jnp.where(norm > 0, norm, 1.0))), 0.0)
    row_inputs = (stats["tau"], stats["inv_norm"], u_scale, delta)

    # dK, dV: grid over key blocks, per kv head, looping over the group's heads' active query blocks.
    mask_t = jnp.swapaxes(_pad_last(stats["block_mask"], cfg.kv_blocks_padded), -1, -2)[..., : cfg.num_kv_blocks, :]
    kv_counts, kv_lists = active_block_lists(_pad_last(mask_t, cfg.q_blocks_padded))
    sp = _specs(cfg, "kv")
    out_specs = [sp["kv_out"], sp["kv_out"]]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    if cfg.debug:
        out_specs.append(pl.BlockSpec((None, None, None), lambda j, b, h: (b, h, j)))
        out_shape.append(jax.ShapeDtypeStruct((B, K, cfg.num_kv_blocks), jnp.int32))
    dkdv = _call(
        functools.partial(_dkdv_kernel, cfg=cfg),
        cfg,
        (cfg.num_kv_blocks, B, K),
        _backward_in_specs(cfg, sp, cfg.q_blocks_padded),
        out_specs,
        out_shape,
        "entmax_attention_dkdv",
    )(alpha, q_len, kv_len, q, k, v, d_out, q_seg, kv_seg, *row_inputs, kv_counts, kv_lists)

    # dQ (and the α-gradient row terms): grid over query blocks, looping over active key blocks.
    sp = _specs(cfg, "q")
    out_specs = [sp["q"]]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if with_alpha_grad:
        out_specs.append(sp["row"])
        out_shape.append(jax.ShapeDtypeStruct((B, N, cfg.q_len_padded), jnp.float32))
    if cfg.debug:
        out_specs.append(sp["block_scalar"])
        out_shape.append(jax.ShapeDtypeStruct((B, N, cfg.num_q_blocks), jnp.int32))
    dq_outs = _call(
        functools.partial(_dq_kernel, cfg=cfg, with_alpha_grad=with_alpha_grad),
        cfg,
        (cfg.num_q_blocks, B, N),
        _backward_in_specs(cfg, sp, cfg.kv_blocks_padded),
        out_specs,
        out_shape,
        "entmax_attention_dq",
    )(alpha, q_len, kv_len, q, k, v, d_out, q_seg, kv_seg, *row_inputs, stats["q_counts"], stats["q_lists"])
    return dkdv, dq_outs, (kv_counts, kv_lists)


# ------------------------------------------------------------------ custom_vjp wiring


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, alpha, q_len, kv_len, q_seg, kv_seg):
    (out, *_), stats = _forward(cfg, alpha, q_len, kv_len, q, k, v, q_seg, kv_seg, with_residual=False)
    return out, _public_stats(stats)


def _attention_fwd(cfg, q, k, v, alpha, q_len, kv_len, q_seg, kv_seg):
    # symbolic_zeros=True: every primal comes wrapped with a `perturbed` flag. The α-gradient
    # terms of the dQ kernel are computed only when α is actually differentiated (learned α),
    # not when it is merely traced (e.g. annealed inside a jitted train step).
    alpha_grad = cfg.alpha_static is None and alpha.perturbed
    q, k, v, alpha, q_len, kv_len, q_seg, kv_seg = jax.tree.map(
        lambda a: a.value, (q, k, v, alpha, q_len, kv_len, q_seg, kv_seg),
        is_leaf=lambda a: isinstance(a, jax.custom_derivatives.CustomVJPPrimal))
    (out, out_tilde, *_), stats = _forward(cfg, alpha, q_len, kv_len, q, k, v, q_seg, kv_seg, with_residual=True)
    residuals = (q, k, v, alpha, q_len, kv_len, q_seg, kv_seg, out_tilde,
                 {key: stats[key] for key in ("tau", "norm", "inv_norm", "block_mask", "q_counts", "q_lists")},
                 jnp.zeros(()) if alpha_grad else None)
    return (out, _public_stats(stats)), residuals


def _attention_bwd(cfg, residuals, cotangents):
    q, k, v, alpha, q_len, kv_len, q_seg, kv_seg, out_tilde, stats, alpha_grad_flag = residuals
    d_out = cotangents[0]
    if isinstance(d_out, jax.custom_derivatives.SymbolicZero):
        d_out = jnp.zeros(d_out.shape, d_out.dtype)
    with_alpha_grad = alpha_grad_flag is not None
    (dk, dv, *_), (dq, *rest), _ = _backward(
        cfg, alpha, q_len, kv_len, q, k, v, q_seg, kv_seg, stats, out_tilde, d_out, with_alpha_grad
    )
    d_alpha = jnp.sum(rest[0], axis=(0, 2)) if with_alpha_grad else jnp.zeros_like(alpha)
    return dq, dk, dv, d_alpha, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd, symbolic_zeros=True)


def _public_stats(stats):
    return {key: jax.lax.stop_gradient(stats[key]) for key in ("nonzero", "allowed", "block_mask")}


# ----------------------------------------------------------------------- entry point


def _resolve_interpret(interpret: bool | None) -> bool:
    if interpret is None:
        return jax.default_backend() != "gpu"
    return bool(interpret)


def make_config(inp: AttentionInputs, block_sizes: BlockSizes | None, interpret: bool | None, debug: bool = False):
    B, T, N, H = inp.query.shape
    S, K = inp.key.shape[1], inp.key.shape[2]
    dtype = inp.query.dtype
    if dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"`query` dtype {dtype} is not supported by the Pallas kernels; use float32, bfloat16 or float16")
    if H > _MAX_HEAD_DIM:
        raise ValueError(f"`query` head_dim {H} is not supported by the Pallas kernels (at most {_MAX_HEAD_DIM})")
    if inp.mask is not None and _padding_mask_axis(inp.mask) is None:
        raise ValueError(
            f"`mask` of shape {inp.mask.shape} is not supported by implementation='pallas': it takes padding masks "
            "over keys [batch, 1, 1, kv_len] or queries [batch, 1, q_len, 1] only; express other masks with "
            "is_causal, query_seq_lengths, key_value_seq_lengths or segment_ids, or use implementation='xla'"
        )
    bs = block_sizes or BlockSizes.for_head_dim(H)
    alpha_static = inp.alpha if isinstance(inp.alpha, float) else None
    # Short sequences (decoding): shrink tiles to the sequence, still a power of two ≥ 16.
    block_q = min(bs.block_q, max(16, pl.next_power_of_2(T)))
    block_k = min(bs.block_k, max(16, pl.next_power_of_2(S)))
    return _Config(
        q_len=T, kv_len=S, num_heads=N, num_kv_heads=K, head_dim=H,
        block_q=block_q, block_k=block_k, num_warps=bs.num_warps, num_stages=bs.num_stages,
        n_iter=bs.solver_passes(alpha_static), causal=inp.is_causal, scale=inp.scale,
        alpha_static=alpha_static,
        has_segments=inp.q_segment_ids is not None or inp.mask is not None, exact_dots=dtype == jnp.float32,
        interpret=_resolve_interpret(interpret), debug=debug,
    )


def _pad_to(x, axis, size, value=0):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


# Segment ids given to masked-out positions: they match nothing a caller would use.
_MASKED_KEY_SEGMENT = -(2**31)
_MASKED_QUERY_SEGMENT = -(2**31) + 1


def _padding_mask_axis(mask):
    """2 for a query mask [b, 1, T, 1], 3 for a key mask [b, 1, 1, S], None for any other mask."""
    shape = (1,) * (4 - mask.ndim) + tuple(mask.shape)
    if shape[1] != 1:
        return None
    if shape[2] == 1:
        return 3
    if shape[3] == 1:
        return 2
    return None


def _segments_with_padding_mask(inp: AttentionInputs, B: int, T: int, S: int):
    """Segment ids [B, T], [B, S] that also encode a query or key padding mask (any padding side)."""
    q_seg = inp.q_segment_ids if inp.q_segment_ids is not None else jnp.zeros((B, T), jnp.int32)
    kv_seg = inp.kv_segment_ids if inp.kv_segment_ids is not None else jnp.zeros((B, S), jnp.int32)
    if inp.mask is not None:
        mask = inp.mask.reshape((1,) * (4 - inp.mask.ndim) + inp.mask.shape)
        if _padding_mask_axis(inp.mask) == 3:
            kv_seg = jnp.where(jnp.broadcast_to(mask[:, 0, 0, :], (B, S)), kv_seg, _MASKED_KEY_SEGMENT)
        else:
            q_seg = jnp.where(jnp.broadcast_to(mask[:, 0, :, 0], (B, T)), q_seg, _MASKED_QUERY_SEGMENT)
    return q_seg, kv_seg


def _kernel_inputs(cfg: _Config, inp: AttentionInputs):
    """Pads to whole blocks / power-of-two head_dim and folds padding into the lengths."""
    B = inp.query.shape[0]
    hp = cfg.head_dim_padded
    q = _pad_to(_pad_to(inp.query, 1, cfg.q_len_padded), 3, hp)
    k = _pad_to(_pad_to(inp.key, 1, cfg.kv_len_padded), 3, hp)
    v = _pad_to(_pad_to(inp.value, 1, cfg.kv_len_padded), 3, hp)
    q_len = jnp.full((B,), cfg.q_len, jnp.int32)
    kv_len = jnp.full((B,), cfg.kv_len, jnp.int32)
    if inp.q_lengths is not None:
        q_len = jnp.clip(inp.q_lengths, 0, cfg.q_len)
    if inp.kv_lengths is not None:
        kv_len = jnp.clip(inp.kv_lengths, 0, cfg.kv_len)
    q_seg = kv_seg = None
    if cfg.has_segments:
        q_seg, kv_seg = _segments_with_padding_mask(inp, B, cfg.q_len, cfg.kv_len)
        q_seg = _pad_to(q_seg, 1, cfg.q_len_padded, -1)
        kv_seg = _pad_to(kv_seg, 1, cfg.kv_len_padded, -2)
    if isinstance(inp.alpha, float):
        alpha = jnp.full((cfg.num_heads,), inp.alpha, jnp.float32)
    else:
        alpha = inp.alpha.astype(jnp.float32)
    return q, k, v, alpha, q_len, kv_len, q_seg, kv_seg


def _sparsity_stats(cfg: _Config, stats) -> SparsityStats:
    tile_fraction = tile_fractions(stats["block_mask"], block_q=cfg.block_q, block_k=cfg.block_k, is_causal=cfg.causal)
    nonzero_fraction = stats["nonzero"].sum((0, 2)) / jnp.maximum(stats["allowed"].sum((0, 2)), 1.0)
    return SparsityStats(tile_fraction, nonzero_fraction)


def pallas_attention(
    inp: AttentionInputs,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    return_stats: bool = False,
):
    """Entmax attention with the Pallas kernels for validated inputs (see ``entmax_attention``)."""
    cfg = make_config(inp, block_sizes, interpret)
    args = _kernel_inputs(cfg, inp)
    out, stats = _attention(cfg, *args)
    out = out[:, : cfg.q_len, :, : cfg.head_dim]
    if return_stats:
        return out, _sparsity_stats(cfg, stats)
    return out


def tile_visits(inp: AttentionInputs, d_out, *, block_sizes: BlockSizes | None = None, interpret: bool | None = None):
    """Debug: tiles visited by the forward, dK/dV and dQ kernels, next to the block mask.

    Returns a dict of int arrays: ``forward`` [B, N, nq] (per query block), ``dkdv``
    [B, K, nk] (per key block, summed over the group's heads), ``dq`` [B, N, nq] and
    ``block_mask`` [B, N, nq, nk]. Skipping is real when the visits equal the mask's counts.
    """
    cfg = make_config(inp, block_sizes, interpret, debug=True)
    q, k, v, alpha, q_len, kv_len, q_seg, kv_seg = _kernel_inputs(cfg, inp)
    (out, out_tilde, fwd_visits), stats = _forward(cfg, alpha, q_len, kv_len, q, k, v, q_seg, kv_seg, True)
    d_out = _pad_to(_pad_to(d_out, 1, cfg.q_len_padded), 3, cfg.head_dim_padded)
    (_, _, dkdv_visits), (_, *rest), _ = _backward(
        cfg, alpha, q_len, kv_len, q, k, v, q_seg, kv_seg, stats, out_tilde, d_out, False
    )
    return dict(forward=fwd_visits, dkdv=dkdv_visits, dq=rest[0], block_mask=stats["block_mask"])

