"""Debug instrumentation, kept apart from the production entry point: tile-visit counts."""

from __future__ import annotations

from adasplash_jax.inputs import AttentionInputs
from adasplash_jax.kernels.attention import kernel_inputs
from adasplash_jax.kernels.backward import backward
from adasplash_jax.kernels.config import BlockSizes, make_config
from adasplash_jax.kernels.forward import forward
from adasplash_jax.tiling import pad_axis


def tile_visits(inp: AttentionInputs, d_out, *, block_sizes: BlockSizes | None = None, interpret: bool | None = None):
    """Debug: tiles visited by the forward, dK/dV and dQ kernels, next to the block mask.

    Returns a dict of int arrays: ``tau`` [B, N, nq] (key blocks the τ kernel's max pass and
    first solver pass visit, per query block), ``tau_passes`` [B, N, nq] (solver passes after
    the max pass), ``tau_solver`` [B, N, nq] (tiles visited by all the solver passes together),
    ``tau_grid_starts`` [B, N, nq] (max-pass tiles on which the histogram started a row's grid:
    the max pass's one branch, histogram.grid_started),
    ``forward`` [B, N, nq] (per query block), ``dkdv``
    [B, K, nk] (per key block, summed over the group's heads), ``dq`` [B, N, nq] and
    ``block_mask`` [B, N, nq, nk]. Skipping is real when the visits equal the mask's counts.
    """
    cfg = make_config(inp, block_sizes, interpret, debug=True)
    q, k, v, alpha, q_len, kv_len, tile_inputs = kernel_inputs(cfg, inp)
    outs, stats = forward(cfg, alpha, q_len, kv_len, q, k, v, tile_inputs, True)
    out, out_tilde, fwd_visits, tau_visits, tau_passes, tau_solver, tau_grid_starts = outs
    d_out = pad_axis(pad_axis(d_out, 1, cfg.q_len_padded), 3, cfg.head_dim_padded)
    (_, _, dkdv_visits), (_, *rest), _ = backward(cfg, alpha, q_len, kv_len, q, k, v, tile_inputs, stats, out_tilde,
                                                  d_out, False)
    return dict(tau=tau_visits, tau_passes=tau_passes, tau_solver=tau_solver, tau_grid_starts=tau_grid_starts,
                forward=fwd_visits, dkdv=dkdv_visits, dq=rest[0], block_mask=stats["block_mask"])

