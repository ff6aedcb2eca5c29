"""Hugging Face checkpoints ↔ NNX models: ``from_pretrained`` and ``save_pretrained``.

A checkpoint directory holds ``config.json`` and ``model.safetensors`` (or a sharded
``model.safetensors.index.json``, or ``pytorch_model.bin`` when torch is installed).
Each family describes its weights once, as rows (HF name, our parameter paths,
conversion), in ``models/gpt2.py`` and ``models/bert.py``; loading and saving both walk
those rows, so the two directions cannot disagree.
"""

from __future__ import annotations

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import bert, gpt2
from models.attention import attention_layers

# architecture → (family module, model class, model_type)
ARCHITECTURES = {
    "GPT2LMHeadModel": (gpt2, gpt2.GPT2LMHeadModel, "gpt2"),
    "GPT2Model": (gpt2, gpt2.GPT2LMHeadModel, "gpt2"),  # weights of the LM (the head is tied)
    "BertModel": (bert, bert.BertModel, "bert"),
    "BertForMaskedLM": (bert, bert.BertForMaskedLM, "bert"),
    "BertForSequenceClassification": (bert, bert.BertForSequenceClassification, "bert"),
}
_DEFAULT_ARCHITECTURE = {"gpt2": "GPT2LMHeadModel", "bert": "BertModel"}
# Buffers and tied copies found in HF checkpoints that hold no parameter of their own.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "position_ids", "lm_head.weight",
                     "cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
_CONFIG_KEY = "adasplash"  # our extra entry in config.json: attention kind and α per layer/head


# --------------------------------------------------------------------------- reading files


def _read_config(path: str) -> dict:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path!r} has no config.json")
    with open(cfg_path) as f:
        return json.load(f)


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _load_safetensors(file: str) -> dict[str, np.ndarray]:
    """``safetensors.numpy.load_file``, plus bfloat16 (which numpy itself lacks) via ml_dtypes."""
    from safetensors.numpy import load_file

    try:
        return load_file(file)
    except TypeError:  # "data type 'bfloat16' not understood": read the (simple) format directly
        import ml_dtypes

        dtypes = {**_SAFETENSORS_DTYPES, "BF16": ml_dtypes.bfloat16}
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            data = f.read()
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in dtypes:
                raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']}") from None
            start, end = info["data_offsets"]
            arr = np.frombuffer(data[start:end], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
            out[name] = arr.astype(np.float32) if info["dtype"] == "BF16" else arr
        return out


def _read_tensors(path: str) -> dict[str, np.ndarray]:
    st = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    pt = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(st) or os.path.isfile(index):
        if os.path.isfile(st):
            return _load_safetensors(st)
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        out = {}
        for shard in shards:
            out.update(_load_safetensors(os.path.join(path, shard)))
        return out
    if os.path.isfile(pt):
        try:
            import torch
        except ImportError:
            raise ImportError(
                f"{path!r} holds only pytorch_model.bin, which needs torch to read; install torch "
                "or convert the checkpoint to model.safetensors"
            ) from None
        sd = torch.load(pt, map_location="cpu", weights_only=True)
        return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}
    raise FileNotFoundError(
        f"{path!r} has no weights: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def _normalise_names(tensors: dict) -> dict:
    """Old checkpoints name LayerNorm parameters gamma/beta."""
    out = {}
    for k, v in tensors.items():
        if k.endswith(".gamma"):
            k = k[: -len("gamma")] + "weight"
        elif k.endswith(".beta"):
            k = k[: -len("beta")] + "bias"
        out[k] = v
    return out


def _lookup(tensors: dict, name: str):
    """The tensor for ``name``, also under the base-model prefix added or removed."""
    if name in tensors:
        return name
    for prefix in ("transformer.", "bert."):
        if name.startswith(prefix) and name[len(prefix):] in tensors:
            return name[len(prefix):]
    for prefix in ("transformer.", "bert."):
        if prefix + name in tensors:
            return prefix + name
    return None


# --------------------------------------------------------------------------- parameters by path


def _variable(model, path):
    obj = model
    for p in path:
        obj = obj[p] if isinstance(p, int) else getattr(obj, p)
    return obj


def _to_ours(op: str, tensor: np.ndarray, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    if op == "copy":
        return [tensor]
    if op == "transpose":
        return [tensor.T]
    if op == "concat_out":  # q, k, v side by side on the last axis
        return np.split(tensor, len(shapes), axis=-1)
    raise AssertionError(op)


def _to_hf(op: str, arrays: list[np.ndarray]) -> np.ndarray:
    if op == "copy":
        return arrays[0]
    if op == "transpose":
        return arrays[0].T
    if op == "concat_out":
        return np.concatenate(arrays, axis=-1)
    raise AssertionError(op)


# --------------------------------------------------------------------------- public API


def from_pretrained(
    path: str,
    attention: str | None = None,
    alpha=None,
    dtype=None,
    *,
    architecture: str | None = None,
    **config_overrides,
):
    """Builds the NNX model described by a Hugging Face checkpoint directory.

    Args:
      path: directory with config.json and model.safetensors (or pytorch_model.bin).
      attention: "softmax", "entmax" or "adasplash"; None takes the kind saved by
        :func:`save_pretrained` if any, else "softmax".
      alpha: α for entmax attention: float, per layer tuple, or per layer and head; None
        takes the α saved by :func:`save_pretrained` if any, else 1.5.
      dtype: compute dtype (parameters stay ``param_dtype``, float32 unless overridden).
      architecture: override ``config.json``'s architecture (e.g. load a BertModel's
        weights into a BertModel only; heads must be present in the checkpoint).
      **config_overrides: any other config field (learn_alpha, dropout, param_dtype, ...).
    """
    hf = _read_config(path)
    model_type = hf.get("model_type")
    if model_type not in _DEFAULT_ARCHITECTURE:
        raise ValueError(
            f"{path}/config.json: unknown model_type {model_type!r}; supported: {sorted(_DEFAULT_ARCHITECTURE)}"
        )
    if architecture is None:
        archs = hf.get("architectures") or [_DEFAULT_ARCHITECTURE[model_type]]
        architecture = archs[0]
    if architecture not in ARCHITECTURES or ARCHITECTURES[architecture][2] != model_type:
        supported = sorted(a for a, v in ARCHITECTURES.items() if v[2] == model_type)
        raise ValueError(
            f"{path}/config.json: unknown architecture {architecture!r} for model_type {model_type!r}; "
            f"supported: {supported}"
        )
    family, cls, _ = ARCHITECTURES[architecture]
    saved = hf.get(_CONFIG_KEY, {})
    if alpha is None:
        alpha = saved.get("alpha", 1.5)
        alpha = tuple(tuple(a) if isinstance(a, list) else a for a in alpha) if isinstance(alpha, list) else alpha
    if attention is None:
        attention = saved.get("attention", "softmax")
    if "learn_alpha" not in config_overrides and "learn_alpha" in saved:
        config_overrides["learn_alpha"] = bool(saved["learn_alpha"])
    overrides = dict(attention=attention, alpha=alpha, **config_overrides)
    if dtype is not None:
        overrides["dtype"] = dtype
    config = family.config_from_hf(hf, **overrides)
    tensors = _normalise_names(_read_tensors(path))
    model = cls(config, rngs=nnx.Rngs(0))
    load_hf_weights(model, tensors, family.hf_weight_map(config, architecture), source=path)
    return model


def load_hf_weights(model, tensors: dict, rows, *, source: str = "checkpoint") -> None:
    """Copies HF tensors into ``model`` following the family's rows; shapes are checked."""
    used, missing = set(), []
    for name, paths, op in rows:
        key = _lookup(tensors, name)
        if key is None:
            missing.append(name)
            continue
        used.add(key)
        variables = [_variable(model, p) for p in paths]
        parts = _to_ours(op, np.asarray(tensors[key]), [v.shape for v in variables])
        for var, part, p in zip(variables, parts, paths):
            if tuple(part.shape) != tuple(var.shape):
                raise ValueError(
                    f"{source}: tensor {key!r} has shape {tensors[key].shape}, which does not fit "
                    f"parameter {'.'.join(map(str, p))} of shape {var.shape} (config.json mismatch?)"
                )
            var[...] = jnp.asarray(part, var.dtype)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"{source}: missing tensors for {type(model).__name__}: {shown}")
    extra = [k for k in tensors if k not in used and not k.endswith(_IGNORED_SUFFIXES)]
    if extra:
        warnings.warn(f"{source}: ignored {len(extra)} tensors not used by {type(model).__name__}: {extra[:8]}")


def _architecture_of(model) -> str:
    for arch, (_, cls, _) in ARCHITECTURES.items():
        if type(model) is cls and arch != "GPT2Model":
            return arch
    raise ValueError(f"save_pretrained: unsupported model type {type(model).__name__}")


def save_pretrained(model, path: str) -> None:
    """Writes ``config.json`` and ``model.safetensors`` in the Hugging Face layout.

    The files load in transformers (``AutoModel*.from_pretrained(path)``) and back here with
    :func:`from_pretrained`. The attention kind and α (learned α included) are kept under
    config.json's "adasplash" entry, which transformers ignores.
    """
    from safetensors.numpy import save_file

    arch = _architecture_of(model)
    family = ARCHITECTURES[arch][0]
    hf = family.config_to_hf(model.config, arch)
    if model.config.learn_alpha:  # the learned values, per layer and head
        alpha = [np.asarray(layer.current_alpha(), np.float64).tolist() for layer in attention_layers(model)]
    else:
        alpha = model.config.alpha  # float or (nested) tuple, exactly as configured
    hf[_CONFIG_KEY] = {"attention": model.config.attention, "alpha": alpha, "learn_alpha": model.config.learn_alpha}
    tensors = {}
    for name, paths, op in family.hf_weight_map(model.config, arch):
        arrays = [np.asarray(jax.device_get(_variable(model, p)[...]), np.float32) for p in paths]
        tensors[name] = np.ascontiguousarray(_to_hf(op, arrays))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
