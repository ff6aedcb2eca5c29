"""Run an attention function under ``jax.shard_map``: each device attends over its own batch (and head) shard.

Attention is independent across batch elements and heads, so a kernel that XLA cannot partition (a Pallas call)
can run per shard with no communication. ``shard_attention(fn, mesh)`` returns a function with ``fn``'s keyword
signature (``entmax_attention``'s: ``fn(query, key, value, *, alpha, mask=None, is_causal=False, scale=None,
query_seq_lengths=None, key_value_seq_lengths=None, segment_ids=None)``, layout ``[batch, length, heads,
head_dim]``) whose array arguments are split along batch over ``batch_axes`` and, if ``head_axis`` is given, along
heads. α given as one value per head is sliced per head shard. A dimension that does not divide evenly (say a
batch of 2 on 8 devices) is left unsplit for that call instead of failing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from adasplash_jax.inputs import mask_to_rank

__all__ = ["shard_attention"]

# keyword arguments that are arrays with a leading batch dimension
_BATCHED = ("query_seq_lengths", "key_value_seq_lengths", "segment_ids")


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def shard_attention(fn: Callable, mesh: Mesh, batch_axes: Sequence[str] = ("data", "fsdp"),
                    head_axis: str | None = None) -> Callable:
    """Wrap `fn` so that it runs under `shard_map` over `mesh` (batch over `batch_axes`, heads over `head_axis`)."""
    batch_axes = tuple(a for a in batch_axes if a in mesh.axis_names and mesh.shape[a] > 1)
    if head_axis is not None and (head_axis not in mesh.axis_names or mesh.shape[head_axis] == 1):
        head_axis = None
    if not batch_axes and head_axis is None:
        return fn
    n_batch = _axis_size(mesh, batch_axes)
    n_head = _axis_size(mesh, head_axis)

    def wrapped(query, key, value, *, alpha=None, mask=None, **kwargs):
        b, _, h, _ = query.shape
        kv_heads = key.shape[2]
        bax = (batch_axes if len(batch_axes) > 1 else batch_axes[0]) if batch_axes and b % n_batch == 0 else None
        hax = head_axis if head_axis is not None and h % n_head == 0 and kv_heads % n_head == 0 else None
        if bax is None and hax is None:
            return fn(query, key, value, alpha=alpha, mask=mask, **kwargs)

        names, arrays, specs = [], [], []

        def add(name, value, spec):
            names.append(name)
            arrays.append(value)
            specs.append(spec)

        qkv = P(bax, None, hax, None)
        add("query", query, qkv)
        add("key", key, qkv)
        add("value", value, qkv)
        static = dict(kwargs)
        if isinstance(alpha, (tuple, list)):  # per-head values: an array, so that it is sliced per head shard
            alpha = np.asarray(alpha, np.float32)
        if isinstance(alpha, jax.Array | np.ndarray):
            alpha_arr = jax.numpy.asarray(alpha)
            if alpha_arr.ndim == 0:
                add("alpha", alpha_arr, P())
            elif alpha_arr.ndim == 1 and alpha_arr.shape[0] == h:
                add("alpha", alpha_arr, P(hax))
            else:
                raise ValueError(f"shard_attention: α of shape {alpha_arr.shape} is neither a scalar nor [heads]")
        else:
            static["alpha"] = alpha  # a Python float or tuple: stays static
        if mask is not None:
            m = mask_to_rank(mask, 4)
            add("mask", m, P(bax if m.shape[0] == b and b > 1 else None, hax if m.shape[1] == h and h > 1 else None,
                              None, None))
        for name in _BATCHED:
            v = static.pop(name, None)
            if v is None:
                continue
            if isinstance(v, tuple | list):  # e.g. (query segments, key segments)
                raise NotImplementedError(f"shard_attention: {name} given as a sequence")
            v = jax.numpy.asarray(v)
            add(name, v, P(bax, *([None] * (v.ndim - 1))))

        def body(*xs):
            kw = dict(zip(names, xs))
            q, k, v = kw.pop("query"), kw.pop("key"), kw.pop("value")
            return fn(q, k, v, **kw, **static)

        return jax.shard_map(body, mesh=mesh, in_specs=tuple(specs), out_specs=qkv, check_vma=False)(*arrays)

    wrapped.__wrapped__ = fn
    return wrapped
