"""adasplash-jax: adaptive sparse (α-entmax) flash attention for JAX."""

from adasplash_jax.attention import entmax_attention
from adasplash_jax.entmax import entmax, entmax15, entmax_threshold, sparsemax
from adasplash_jax.losses import entmax_loss, sparsemax_loss

__all__ = [
    "entmax",
    "entmax15",
    "sparsemax",
    "entmax_threshold",
    "entmax_attention",
    "entmax_loss",
    "sparsemax_loss",
]
__version__ = "0.1.0"
