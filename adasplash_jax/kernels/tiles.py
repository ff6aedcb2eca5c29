"""Tile logic shared by every kernel: the score tile, its keep mask, entmax powers on a tile."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from adasplash_jax.kernels.config import MASKED, KernelConfig
from adasplash_jax.masking import keep_mask, reachable_kv_range
from adasplash_jax.solver import powers


def dot(cfg: KernelConfig, a, b, *, trans_a=False, trans_b=False):
    """fp32-accumulating tile matmul; fp32 inputs use full precision (no TF32)."""
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, allow_tf32=False if cfg.exact_dots else None)


class RowContext:
    """Per-row (query) context loaded once per query block: positions, lengths, segments."""

    def __init__(self, cfg: KernelConfig, q_block, q_len, kv_len, q_segment):
        self.cfg = cfg
        self.q_start = q_block * cfg.block_q
        self.q_pos = (self.q_start + jnp.arange(cfg.block_q, dtype=jnp.int32))[:, None]
        self.q_len = q_len
        self.kv_len = kv_len
        self.q_segment = None if q_segment is None else q_segment[:, None]

    def key_block_range(self):
        """(first, end) key blocks this query block can see at all: up to the causal diagonal and
        the kv length, inside the local window."""
        cfg = self.cfg
        kv_start, kv_end = reachable_kv_range(self.q_start, cfg.block_q, self.kv_len, is_causal=cfg.causal,
                                              window=cfg.window)
        block_k = jnp.int32(cfg.block_k)  # lax.div wants equal dtypes (int64 Python ints under x64)
        kv_start, kv_end = jnp.asarray(kv_start, jnp.int32), jnp.asarray(kv_end, jnp.int32)
        return lax.div(kv_start, block_k), lax.div(kv_end + block_k - 1, block_k)

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
            window=cfg.window,
        )

    def scores(self, q, k_ref, kv_block, kv_segment_ref):
        """Entmax input s = scale·q·kᵀ of one tile (fp32) and its keep mask; masked → MASKED."""
        cfg = self.cfg
        k = k_ref[pl.ds(kv_block * cfg.block_k, cfg.block_k), :]
        s = dot(cfg, q, k, trans_b=True) * cfg.scale
        keep = self.keep(kv_block, kv_segment_ref)
        return jnp.where(keep, s, MASKED), keep, k


def alpha_of(cfg: KernelConfig, alpha_ref, index):
    return cfg.alpha_static if cfg.alpha_static is not None else alpha_ref[index]


def tile_powers(cfg: KernelConfig, alpha, s, tau, row_max):
    """(z, z^c0, z^c1) with z = [(α−1)·(s − m) − τ]_+, m the row's score max (masked entries
    give z = 0). τ is relative to the shifted row, whose max is 0."""
    z = jnp.maximum((alpha - 1.0) * (s - row_max[:, None]) - tau[:, None], 0.0)
    p0, p1, _ = powers(cfg.alpha_static, alpha, z)
    return z, p0, p1


def load_segment(ref, start, size):
    return None if ref is None else ref[pl.ds(start, size)]


