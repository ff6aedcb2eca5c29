"""adasplash-jax: adaptive sparse (α-entmax) flash attention for JAX."""

from adasplash_jax.attention import SparsityStats, entmax_attention, entmax_attention_with_stats
from adasplash_jax.entmax import entmax, entmax15, entmax_threshold, sparsemax
from adasplash_jax.inputs import ALPHA_MIN
from adasplash_jax.flax_attention import flax_entmax_attention, make_flax_attention_fn
from adasplash_jax.losses import entmax_loss, sparsemax_loss
from adasplash_jax.kernels import BlockSizes

__all__ = [
    "ALPHA_MIN",
    "entmax",
    "entmax15",
    "sparsemax",
    "entmax_threshold",
    "entmax_attention",
    "entmax_attention_with_stats",
    "SparsityStats",
    "BlockSizes",
    "flax_entmax_attention",
    "make_flax_attention_fn",
    "entmax_loss",
    "sparsemax_loss",
]
__version__ = "0.1.0"
