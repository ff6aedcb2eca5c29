"""BlockSpecs and the pallas_call shared by the kernels."""

from __future__ import annotations

from jax.experimental import pallas as pl

from adasplash_jax.kernels.config import KernelConfig


def block_specs(cfg: KernelConfig, grid_over: str):
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


def segment_specs(cfg, specs):
    """Specs of the optional position inputs: query and key segment ids, ALiBi slopes (None when absent)."""
    segments = [specs["q_segment"], specs["kv_segment"]] if cfg.has_segments else [None, None]
    return segments + [specs["alpha"] if cfg.has_alibi else None]


def call(kernel, cfg, grid, in_specs, out_specs, out_shape, name):
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


