"""BlockSpecs and the pallas_call shared by the kernels."""

from __future__ import annotations

from jax.experimental import pallas as pl

from adasplash_jax.kernels.config import KernelConfig
from adasplash_jax.kernels.tiles import TileInputs


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


def _shared(layout, b, n):
    """Batch and head block indices of a dense input whose batch or head dim may be shared (size 1)."""
    return (b if layout[0] else 0, n if layout[1] else 0)


def dense_specs(cfg: KernelConfig, grid_over: str, layout):
    """(whole [T, S] plane, per-block row of tile kinds) specs of a dense mask or bias of this
    ``layout`` (mask_info.layout). grid_over="kv": the plane holds the group's G query heads
    when the input is per head (index it by the head within the group), else the shared head."""
    T, S = cfg.q_len_padded, cfg.kv_len_padded
    if grid_over == "q":
        plane = pl.BlockSpec((None, None, T, S), lambda i, b, n: (*_shared(layout, b, n), 0, 0))
        kinds = pl.BlockSpec((None, None, None, cfg.kv_blocks_padded), lambda i, b, n: (*_shared(layout, b, n), i, 0))
        return plane, kinds
    heads = cfg.groups if layout[1] else None
    plane = pl.BlockSpec((None, heads, T, S), lambda j, b, h: (*_shared(layout, b, h), 0, 0))
    kinds = pl.BlockSpec((None, heads, None, cfg.q_blocks_padded), lambda j, b, h: (*_shared(layout, b, h), j, 0))
    return plane, kinds


def visible_block_specs(cfg: KernelConfig, layout):
    """(count, list) specs of per-query-block key-block lists shaped like a dense input of this
    ``layout`` ([b, n, nq], [b, n, nq, nk_pad]; query-block grid)."""
    return (pl.BlockSpec((None, None, None), lambda i, b, n: (*_shared(layout, b, n), i)),
            pl.BlockSpec((None, None, None, cfg.kv_blocks_padded), lambda i, b, n: (*_shared(layout, b, n), i, 0)))


def tile_input_specs(cfg: KernelConfig, specs, grid_over: str):
    """Specs of the optional inputs that shape each score tile, in the kernels' order: query and
    key segment ids, ALiBi slopes, dense mask, its tile kinds, dense bias (None when absent)."""
    out = [specs["q_segment"], specs["kv_segment"]] if cfg.has_segments else [None, None]
    out.append(specs["alpha"] if cfg.has_alibi else None)
    out += list(dense_specs(cfg, grid_over, cfg.mask_layout)) if cfg.mask_layout is not None else [None, None]
    out.append(dense_specs(cfg, grid_over, cfg.bias_layout)[0] if cfg.bias_layout is not None else None)
    return TileInputs(*out)


def call(kernel, cfg, grid, in_specs, out_specs, out_shape, name, stage, input_output_aliases=None):
    """The pallas_call of one kernel; ``stage`` ("tau", "forward", "backward") picks its launch parameters."""
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=cfg.compiler_params(stage),
        interpret=cfg.interpret,
        name=name,
        input_output_aliases=input_output_aliases or {},
    )


