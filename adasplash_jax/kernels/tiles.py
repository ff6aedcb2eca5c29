"""Tile logic shared by every kernel: the score tile, its keep mask, entmax powers on a tile, and the
split of a key (or query) block loop into interior tiles, which need no mask, and boundary tiles.

Scores are kept as the raw matmul d = q·kᵀ, and the row max m in that domain: the entmax input
of an entry is then x = (α−1)·scale·(d − m), one subtraction and one multiply by a constant per
element (scale and α − 1 folded), exact near the max at any score magnitude.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from adasplash_jax.kernels.config import MASKED, KernelConfig
from adasplash_jax.kernels.mask_info import FULL
from adasplash_jax.masking import keep_mask, reachable_kv_range


def dot(cfg: KernelConfig, a, b, *, trans_a=False, trans_b=False):
    """fp32-accumulating tile matmul; fp32 inputs use full precision (no TF32)."""
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, allow_tf32=False if cfg.exact_dots else None)


class TileInputs(NamedTuple):
    """The optional inputs that shape each score tile (each None when absent): segment ids
    (int32 [B, T_pad], [B, S_pad]; padding masks are folded into them), ALiBi slopes (float32
    [N], raw-score units), a dense mask (int8 [b, n, T_pad, S_pad]) with its tile kinds
    (mask_info: [b, n, nq, nk_pad] on a query-block grid, transposed on a key-block grid) and a
    dense bias ([b, n, T_pad, S_pad]). Kernels receive the same tuple of refs."""

    q_segment: object = None
    kv_segment: object = None
    alibi: object = None
    mask: object = None
    kinds: object = None
    bias: object = None


class RowContext:
    """Per-row (query) context of one query block and head: positions, lengths, segments, and
    the tile inputs read tile by tile. ``head``: the query head within a key-block grid's
    group (None on a query-block grid, whose refs hold one head)."""

    def __init__(self, cfg: KernelConfig, q_block, q_len, kv_len, refs: TileInputs, head: int | None = None):
        self.cfg = cfg
        self.q_block = q_block
        self.q_start = q_block * cfg.block_q
        self.q_pos = query_positions(cfg, q_block)
        self.q_len = q_len
        self.kv_len = kv_len
        self.refs = refs
        self.head = head
        # ALiBi slope per head, in raw-score units (slope / scale), or None
        self.alibi_slope = refs.alibi[head or 0] if cfg.has_alibi else None

    @classmethod
    def of_query_block(cls, cfg: KernelConfig, q_block, q_len_ref, kv_len_ref, refs: TileInputs):
        """The context of a kernel whose grid runs over query blocks (τ, forward, dQ): one head's row."""
        return cls(cfg, q_block, q_len_ref[...], kv_len_ref[...], refs)

    @property
    def q_segment(self):
        """Segment ids [block_q, 1] of the block's queries (loaded where used: masked tiles only)."""
        q_segment = load_segment(self.refs.q_segment, self.q_start, self.cfg.block_q)
        return None if q_segment is None else q_segment[:, None]

    def key_block_range(self):
        """(first, end) key blocks this query block can see at all: up to the causal diagonal and
        the kv length, inside the local window."""
        cfg = self.cfg
        kv_start, kv_end = reachable_kv_range(self.q_start, cfg.block_q, self.kv_len, is_causal=cfg.causal,
                                              window=cfg.window)
        block_k = jnp.int32(cfg.block_k)  # lax.div wants equal dtypes (int64 Python ints under x64)
        kv_start, kv_end = jnp.asarray(kv_start, jnp.int32), jnp.asarray(kv_end, jnp.int32)
        return lax.div(kv_start, block_k), lax.div(kv_end + block_k - 1, block_k)

    def interior_end(self):
        """Key blocks [0, e) whose tiles keep every entry of this query block (no mask to apply):
        the block's rows are all valid, and the tile lies below the causal diagonal and within
        the kv length. Segments (and padding masks, folded into them), local windows and dense
        masks make no tile interior."""
        return interior_key_blocks(self.cfg, self.q_start, self.q_len, self.kv_len)

    def allowed_keys(self):
        """Keys each row may attend to without segments or windows: a prefix [0, limit) of the keys."""
        cfg = self.cfg
        limit = jnp.broadcast_to(self.kv_len, self.q_pos.shape)
        if cfg.causal:
            limit = jnp.minimum(limit, self.q_pos + 1)
        return jnp.where(self.q_pos < self.q_len, limit, 0)[:, 0]

    def _plane(self, ref, layout, kv_block):
        """The [block_q, block_k] tile of a dense input's [T, S] plane."""
        cfg = self.cfg
        index = (pl.ds(self.q_start, cfg.block_q), pl.ds(kv_block * cfg.block_k, cfg.block_k))
        if self.head is not None and layout[1]:
            index = (self.head, *index)
        return ref[index]

    def mask_kind(self, kv_block):
        """EMPTY / PARTIAL / FULL of this tile of the dense mask."""
        kinds = self.refs.kinds
        if self.head is None:
            return kinds[kv_block]
        return kinds[self.head, self.q_block] if self.cfg.mask_layout[1] else kinds[self.q_block]

    def keep(self, kv_block):
        cfg = self.cfg
        kv_start = kv_block * cfg.block_k
        kv_pos = (kv_start + jnp.arange(cfg.block_k, dtype=jnp.int32))[None, :]
        kv_segment = None
        if self.refs.kv_segment is not None:
            kv_segment = self.refs.kv_segment[pl.ds(kv_start, cfg.block_k)][None, :]
        keep = keep_mask(
            self.q_pos,
            kv_pos,
            is_causal=cfg.causal,
            q_len=self.q_len,
            kv_len=self.kv_len,
            q_segment=self.q_segment,
            kv_segment=kv_segment,
            window=cfg.window,
        )
        if cfg.mask_layout is not None:
            # Only a PARTIAL tile loads its mask; a FULL one keeps everything (EMPTY ones are never visited).
            tile = lax.cond(self.mask_kind(kv_block) == FULL,
                            lambda: jnp.ones((cfg.block_q, cfg.block_k), jnp.int8),
                            lambda: self._plane(self.refs.mask, cfg.mask_layout, kv_block))
            keep = keep & (tile != 0)
        return keep

    def bias(self, kv_block):
        """The additive raw-score tile of ALiBi and the dense bias (bias / scale), or None."""
        cfg = self.cfg
        out = None
        if self.alibi_slope is not None:
            out = alibi_tile(cfg, self.alibi_slope, self.q_pos, kv_block)
        if cfg.bias_layout is not None:
            # A −inf bias entry stays finite (MASKED): the entry gets no weight, as a masked one.
            b = jnp.maximum(self._plane(self.refs.bias, cfg.bias_layout, kv_block).astype(jnp.float32)
                            * (1.0 / cfg.scale), MASKED)
            out = b if out is None else out + b
        return out

    def tile_scores(self, q, k, kv_block, masked=True):
        """Raw score tile d = q·kᵀ (fp32) of a loaded key tile plus the bias, masked entries →
        MASKED (only when ``masked``: an interior tile keeps everything), and its keep mask
        (None when not masked)."""
        d = dot(self.cfg, q, k, trans_b=True)
        bias = self.bias(kv_block)
        if bias is not None:
            d = d + bias
        if not masked:
            return d, None
        keep = self.keep(kv_block)
        return jnp.where(keep, d, MASKED), keep

    def scores(self, q, k_ref, kv_block, masked=True):
        """``tile_scores`` of key block ``kv_block`` loaded from ``k_ref``; also returns the key tile.
        ``q``: the query tile, or a function reading it (``query_tile``)."""
        cfg = self.cfg
        k = k_ref[pl.ds(kv_block * cfg.block_k, cfg.block_k), :]
        d, keep = self.tile_scores(q() if callable(q) else q, k, kv_block, masked)
        return d, keep, k


def query_tile(cfg: KernelConfig, q_ref):
    """The query tile of a query-block kernel for ``RowContext.scores``: loaded once and held across
    the key loop, or (``cfg.reload_query``) read from its ref at every key tile."""
    return (lambda: q_ref[...]) if cfg.reload_query else q_ref[...]


def query_positions(cfg: KernelConfig, q_block):
    """Positions [block_q, 1] of the queries of a query block."""
    return (q_block * cfg.block_q + jnp.arange(cfg.block_q, dtype=jnp.int32))[:, None]


def alibi_tile(cfg: KernelConfig, slope, q_pos, kv_block):
    """The ALiBi bias −slope·|i − j| of one tile, computed from positions (never a [T, S] tensor);
    ``slope`` is in raw-score units (divided by the score scale)."""
    kv_pos = (kv_block * cfg.block_k + jnp.arange(cfg.block_k, dtype=jnp.int32))[None, :]
    return -slope * jnp.abs(q_pos - kv_pos).astype(jnp.float32)


def interior_key_blocks(cfg: KernelConfig, q_start, q_len, kv_len):
    if cfg.irregular:
        return jnp.int32(0)
    end = kv_len // cfg.block_k  # (// not lax.div: Python ints are int64 under x64)
    if cfg.causal:
        end = jnp.minimum(end, (q_start + 1) // cfg.block_k)
    return jnp.where(q_start + cfg.block_q <= q_len, end, 0)


def interior_query_blocks(cfg: KernelConfig, kv_block, q_len, kv_len):
    """Query blocks [lo, hi) whose tiles with key block ``kv_block`` keep every entry."""
    if cfg.irregular:
        return jnp.int32(0), jnp.int32(0)
    kv_end = (kv_block + 1) * cfg.block_k
    lo = (kv_end - 1 + cfg.block_q - 1) // cfg.block_q if cfg.causal else jnp.int32(0)
    hi = jnp.where(kv_end <= kv_len, q_len // cfg.block_q, 0)
    return lo, jnp.maximum(lo, hi)


def split_loop(count, start, end, body, carry, *, down_from=None):
    """``body(t, masked, carry)`` for t in [0, count): slots [start, end) unmasked, the rest masked.

    Slots index an ascending block list (or the blocks themselves), so the interior blocks
    are one contiguous run of slots: one loop over it without masks, one over the rest.
    ``down_from``: the masked slots first, in descending order, then the interior ones in
    descending order from slot ``down_from`` (clamped into the run), wrapping around to its top
    (for a query block: from its diagonal away, where its max usually is)."""
    gap = end - start
    if down_from is not None:
        masked = count - gap
        carry = lax.fori_loop(0, masked, lambda t, c: body(jnp.where(masked - 1 - t < start, masked - 1 - t,
                                                                     masked - 1 - t + gap), True, c), carry)
        return lax.fori_loop(0, gap, lambda t, c: body(wrapped_down(down_from, start, end, t), False, c), carry)
    carry = lax.fori_loop(start, end, lambda t, c: body(t, False, c), carry)
    return lax.fori_loop(0, count - gap, lambda t, c: body(jnp.where(t < start, t, t + gap), True, c), carry)


def wrapped_down(first, start, end, t):
    """The t-th slot of [start, end) counted down from ``first`` (clamped into it), wrapping
    around from ``start`` to ``end − 1``."""
    first = jnp.clip(first, start, end - 1)
    slot = first - t
    return jnp.where(slot < start, slot + (end - start), slot)


def diagonal_key_block(cfg: KernelConfig, q_start):
    """The key block holding the last query position of the block starting at ``q_start``."""
    return (q_start + cfg.block_q - 1) // cfg.block_k


def list_slots_below(blocks, count, bound):
    """How many of the first ``count`` entries of an ascending block list lie below ``bound``."""
    slots = jnp.arange(blocks.shape[-1], dtype=jnp.int32)
    return jnp.sum(((slots < count) & (blocks < bound)).astype(jnp.int32))


def alpha_of(cfg: KernelConfig, alpha_ref, index):
    return cfg.alpha_static if cfg.alpha_static is not None else alpha_ref[index]


def x_multiplier(cfg: KernelConfig, alpha):
    """(α−1)·scale: maps raw scores relative to the row max to the entmax input x."""
    return (alpha - 1.0) * cfg.scale


def _mufu(cfg: KernelConfig, op: str, x, exact):
    """2^x or log2 x as one MUFU instruction on the GPU (ex2/lg2.approx, ~2 ulp); the exact
    function in interpret mode."""
    if cfg.interpret:
        return exact(x)
    [y] = plgpu.elementwise_inline_asm(
        f"{op}.approx.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)],
    )
    return y


def log2_positive(cfg: KernelConfig, z):
    """log2 z where z > 0, 0 elsewhere (one lg2 on the GPU; never the log of z ≤ 0)."""
    return _mufu(cfg, "lg2", jnp.where(z > 0, z, 1.0), jnp.log2)


def powers(cfg: KernelConfig, alpha, z, *, need_c2=True):
    """(z^c0, z^c1, z^c2) for z ≥ 0 with exact zeros where z = 0 (c0 = 1/(α−1), c1 = c0 − 1,
    c2 = c0 − 2), as few instructions as the α allows: α = 2 and 1.5 are polynomials; other α
    use one lg2 and one ex2 per power (z^c0 = z·z^c1 costs a multiply). Never a log of z ≤ 0."""
    pos = z > 0
    if cfg.alpha_static == 2.0:
        return z, pos.astype(z.dtype), jnp.zeros_like(z) if need_c2 else None
    if cfg.alpha_static == 1.5:
        return z * z, z, pos.astype(z.dtype) if need_c2 else None
    c0 = 1.0 / (alpha - 1.0)
    log_z = log2_positive(cfg, z)
    p1 = jnp.where(pos, _mufu(cfg, "ex2", (c0 - 1.0) * log_z, jnp.exp2), 0.0)
    p0 = p1 * z
    p2 = jnp.where(pos, _mufu(cfg, "ex2", (c0 - 2.0) * log_z, jnp.exp2), 0.0) if need_c2 else None
    return p0, p1, p2


def tile_x(cfg: KernelConfig, alpha, d, row_max):
    """Entmax input x = (α−1)·scale·(d − m) of a raw score tile (masked entries far below −1)."""
    return (d - row_max[:, None]) * x_multiplier(cfg, alpha)


def fma(cfg: KernelConfig, a, b, c):
    """a·b + c per entry of a float32 tile (``b``, ``c``: scalars or per-row [rows, 1], broadcast) as
    one fma.rn.f32 on the GPU (the lowering never fuses a multiply and an add itself); a multiply
    and an add in interpret mode."""
    return a * b + c if cfg.interpret else _ptx_fma("rn", a, b, c)


def unit_fma(cfg: KernelConfig, a, b, c):
    """a·b + c clamped to [0, 1] per entry (``b``, ``c`` broadcast as for ``fma``): one fma.rn.sat.f32
    on the GPU, the same clamp in interpret mode. It is [a·b + c]_+ wherever a·b + c ≤ 1, as every z
    of the kernels is (see ``shifted_z``): the clamp to 0 costs no instruction of its own."""
    return jnp.clip(a * b + c, 0.0, 1.0) if cfg.interpret else _ptx_fma("rn.sat", a, b, c)


def ceil_fma(cfg: KernelConfig, a, b, c):
    """⌈a·b + c⌉ per entry for an integer-valued ``c`` (per row [rows, 1]) with the result in [2^23, 2^24):
    one fma.rp.f32 on the GPU (a·b + c rounded up, exact there: those floats are the integers); the
    same value in interpret mode (``ceil_multiply_add``)."""
    return ceil_multiply_add(a, b, c) if cfg.interpret else _ptx_fma("rp", a, b, c)


def fraction_fma(cfg: KernelConfig, a, b, whole):
    """a·b − whole rounded once, for an integer-valued ``whole`` = round(a·b) (the result lies in
    [−½, ½]): one fma.rn.f32 on the GPU, ``product_fraction`` in interpret mode."""
    return product_fraction(a, b, whole) if cfg.interpret else _ptx_fma("rn", a, b, -whole)


def _exact_product(a, b):
    """(p, e) with a·b = p + e exactly, p the rounded product (Dekker: each factor split in two
    halves of 12 significant bits, whose products are exact; no fma, which plain jnp lacks)."""
    def split(x):
        t = 4097.0 * x
        hi = t - (t - x)
        return hi, x - hi

    p = a * b
    (a_hi, a_lo), (b_hi, b_lo) = split(a), split(b)
    return p, ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo


def product_fraction(a, b, whole):
    """a·b − whole of the exact product, rounded once, for an integer-valued ``whole`` within ½ of
    the rounded a·b (plain jnp): p − whole is exact, e adds the product's own rounding."""
    p, e = _exact_product(a, b)
    return (p - whole) + e


def ceil_multiply_add(a, b, c):
    """⌈a·b + c⌉ of the exact product, in float32 without an fma (interpret mode, plain jnp): what
    fma.rp.f32 gives where the result lies in [2^23, 2^24), for an integer-valued ``c`` with
    |a·b| < 2^23. a·b = P + f with P = round(a·b) and f its exact fraction, so the sum is the
    integer c + P plus f ∈ [−½, ½], whose rounding keeps its sign: its ceiling is 1 where it is
    positive, else 0. Elsewhere (an entry far outside the histogram's window, which the caller
    clamps) the result is as far out, if not exact."""
    whole = jnp.round(a * b)
    return (c + whole) + jnp.where(product_fraction(a, b, whole) > 0, 1.0, 0.0)


def _ptx_fma(rounding: str, a, b, c):
    """One fma.{rounding}.f32 per entry of ``a`` (``b``, ``c`` broadcast to it)."""
    [y] = plgpu.elementwise_inline_asm(
        f"fma.{rounding}.f32 $0, $1, $2, $3;",
        args=[a] + [jnp.broadcast_to(t, a.shape).astype(a.dtype) for t in (b, c)],
        constraints="=f,f,f,f", pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, a.dtype)],
    )
    return y


def shifted_z(cfg: KernelConfig, d, row_max, mult, shift):
    """[(d − m)·mult + shift]_+ of a raw score tile; ``mult`` and ``shift``: scalars or per-row
    vectors [block_q]. ``cfg.fold_row_max``: one fma per entry, d·mult + (shift − m·mult), the row
    constants formed once per row (a row with no score, m MASKED, gets z = 0: its m·mult would
    not cancel), clamped to [0, 1] by the fma itself (``unit_fma``: no z of a kernel exceeds 1, so
    the clamp is the [·]_+; τ ≥ −1, the bracket's lower end max − 1, so x − τ ≤ 1 in the τ and
    forward kernels, and the backward's ẑ = p^(α−1) ≤ 1); otherwise (fp32, and d ≤ 32 below sm_90, where
    ptxas is short of registers: the saturating fma spills 4–12 B there) a subtraction, an fma and
    a max, [(d − m)·mult + shift]_+."""
    if cfg.fold_row_max:
        return folded_z(cfg, d, *fold_row_max(row_max, mult, shift))
    return jnp.maximum(fma(cfg, d - row_max[:, None], _as_rows(mult), _as_rows(shift)), 0.0)


def _as_rows(t):
    """A per-row vector [rows] as a column [rows, 1]; a scalar stays a scalar (one register)."""
    return t[:, None] if jnp.ndim(t) == 1 else t


def fold_row_max(row_max, mult, shift):
    """``folded_z``'s constants for [(d − m)·mult + shift]_+: ``mult`` as given (a scalar stays a
    scalar: one register, not one per row) and per row shift − m·mult; a row with no score (m
    MASKED) gets shift 0, so its z = [MASKED·mult]_+ = 0 (its m·mult would not cancel under the fma's
    single rounding); a NaN row stays NaN."""
    has_scores = ~(row_max <= 0.5 * MASKED)
    return mult, jnp.where(has_scores, shift - row_max * mult, 0.0)


def folded_z(cfg: KernelConfig, d, mult, shift):
    """[d·mult + shift]_+ of a raw score tile where it is at most 1 (every z of the kernels: see
    ``shifted_z``), one saturating fma per entry (``mult``: a scalar or per row [block_q]; ``shift``:
    per row)."""
    return unit_fma(cfg, d, _as_rows(mult), shift[:, None])


def tile_z(cfg: KernelConfig, alpha, d, tau, row_max):
    """z = [x − τ]_+ of a raw score tile, x = (α−1)·scale·(d − m) (τ is relative to the shifted row,
    whose max is 0)."""
    return shifted_z(cfg, d, row_max, x_multiplier(cfg, alpha), -tau)


def tile_powers(cfg: KernelConfig, alpha, d, tau, row_max):
    """(z, z^c0, z^c1) with z = [x − τ]_+ of a raw score tile (masked entries give z = 0)."""
    z = tile_z(cfg, alpha, d, tau, row_max)
    p0, p1, _ = powers(cfg, alpha, z, need_c2=False)
    return z, p0, p1


def load_segment(ref, start, size):
    return None if ref is None else ref[pl.ds(start, size)]


# A row max that keeps NaN. Pallas lowers jnp.max / jnp.maximum to maxnumf on the GPU, which
# drops a NaN operand; the τ kernel's max pass needs a NaN score to reach its row max (the
# library's NaN policy: such a row comes out NaN). maximumf (max.NaN.f32, one FMNMX.NAN: the cost
# of the max itself) keeps it. Interpret mode runs XLA's max, which keeps NaN already.
def _nan_max_primitives():
    try:
        from jax._src import core as jax_core
        from jax._src.lib.mlir.dialects import arith as arith_dialect
        from jax._src.pallas.triton import lowering as triton_lowering
        reduce_lowering = triton_lowering._reduce_lowering
    except (ImportError, AttributeError):  # another jax: the fallback in row_max_keeping_nan
        return None, None
    pair = jax_core.Primitive("adasplash_maximum_keeping_nan")
    pair.def_abstract_eval(lambda x, y: jax_core.ShapedArray(x.shape, x.dtype))
    rows = jax_core.Primitive("adasplash_row_max_keeping_nan")
    rows.def_abstract_eval(lambda x: jax_core.ShapedArray(x.shape[:-1], x.dtype))
    triton_lowering.triton_lowering_rules[pair] = lambda ctx, x, y: arith_dialect.maximumf(x, y)
    triton_lowering.triton_lowering_rules[rows] = (
        lambda ctx, x: reduce_lowering(lambda a, b: pair.bind(a, b), ctx, x, axes=(len(ctx.avals_in[0].shape) - 1,)))
    return pair, rows


_MAXIMUM_KEEPING_NAN, _ROW_MAX_KEEPING_NAN = _nan_max_primitives()


def row_max_keeping_nan(cfg: KernelConfig, d):
    """max over the last axis of ``d``, NaN where that row holds a NaN."""
    if cfg.interpret:
        return jnp.max(d, axis=-1)
    if _ROW_MAX_KEEPING_NAN is None:  # a NaN as +inf, which the τ kernel treats as NaN too
        return jnp.max(jnp.where(jnp.isnan(d), jnp.inf, d), axis=-1)
    return _ROW_MAX_KEEPING_NAN.bind(d)


def maximum_keeping_nan(cfg: KernelConfig, a, b):
    """jnp.maximum(a, b) that keeps a NaN of either (for row vectors)."""
    if cfg.interpret or _MAXIMUM_KEEPING_NAN is None:
        # (the fallback's NaN is +inf by then: maxnumf keeps it)
        return jnp.maximum(a, b)
    return _MAXIMUM_KEEPING_NAN.bind(a, b)
