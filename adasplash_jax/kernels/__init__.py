"""The AdaSplash kernels in Pallas (Triton backend): τ, forward, dK/dV and dQ, wired into a custom_vjp.

Modules: ``config`` (block sizes, static configuration), ``tiles`` (tile logic shared by
the kernels), ``specs`` (BlockSpecs and the pallas_call), ``threshold``, ``forward`` and
``backward`` (one kernel stage each), ``attention`` (padding, custom_vjp, entry point),
``debug`` (tile-visit counts).
"""

from adasplash_jax.kernels.attention import pallas_attention
from adasplash_jax.kernels.config import BlockSizes

__all__ = ["BlockSizes", "pallas_attention"]
