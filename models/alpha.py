"""α in the models: how a config gives it (per model, layer or head) and how a layer learns it."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from adasplash_jax.entmax import check_alpha

# Learned α = ALPHA_MIN + (2 - ALPHA_MIN)·sigmoid(logit): strictly above 1 even in float32
# (α → 1 is softmax, where entmax's 1/(α−1) powers blow up), at most 2.
ALPHA_MIN = 1.01


def check_alpha_config(alpha, n_layer: int | None = None, n_head: int | None = None, field: str = "alpha"):
    """α per model (a float), per layer (n_layer entries) or per layer and head (n_layer tuples of n_head).

    Every value goes through the library's ``check_alpha`` (the range entmax supports);
    lists become tuples so configs stay hashable. Returns the normalised α. Without
    ``n_layer`` / ``n_head`` (e.g. a CLI value checked before the model exists) the lengths
    are not checked; the model's config checks them again.
    """

    def one(a, where: str) -> float:
        name = f"{field}{where}"
        if isinstance(a, bool) or not isinstance(a, numbers.Real):
            raise ValueError(f"`{name}` must be a float, got {a!r}")
        return check_alpha(float(a), name)

    if not isinstance(alpha, (list, tuple)):
        return one(alpha, "")
    if n_layer is not None and len(alpha) != n_layer:
        raise ValueError(f"`{field}` given per layer must have n_layer = {n_layer} entries, got {len(alpha)}")
    out = []
    for i, a in enumerate(alpha):
        if isinstance(a, (list, tuple)):
            if n_head is not None and len(a) != n_head:
                raise ValueError(f"`{field}[{i}]` given per head must have {n_head} entries, got {len(a)}")
            out.append(tuple(one(x, f"[{i}][{h}]") for h, x in enumerate(a)))
        else:
            out.append(one(a, f"[{i}]"))
    return tuple(out)


def layer_alpha(alpha, layer: int):
    """This layer's entry of a checked α config: a float or a tuple per head."""
    return alpha[layer] if isinstance(alpha, tuple) else alpha


def alpha_logit_init(alpha, n_head: int) -> np.ndarray:
    """The logits [n_head] whose learned α equals ``alpha`` (clipped just inside the range)."""
    a = np.broadcast_to(np.asarray(alpha, np.float32), (n_head,))
    frac = np.clip((a - ALPHA_MIN) / (2.0 - ALPHA_MIN), 1e-3, 1.0 - 1e-3)
    return np.log(frac / (1.0 - frac))


def learned_alpha(logit) -> jax.Array:
    """α per head from its logit, in float32, inside [ALPHA_MIN, 2]."""
    return ALPHA_MIN + (2.0 - ALPHA_MIN) * jax.nn.sigmoid(jnp.asarray(logit, jnp.float32))


def check_alpha_override(alpha):
    """A call's ``alpha=`` (None, a float or a float array) through the library's check.

    Concrete values are range-checked; a traced α (inside jit) can only be checked for dtype.
    """
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (numbers.Real, np.ndarray, jax.Array)):
        raise ValueError(f"`alpha` must be a float or a float array, got {alpha!r}")
    return check_alpha(alpha, "alpha")
