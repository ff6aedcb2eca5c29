"""Whole jitted programs compiled by XLA:GPU for a compile-only H100 / A100 (no device needed).

``python -m adasplash_jax.aot.programs sm_80 sm_90`` compiles the jitted forward+backward of
``entmax_attention(implementation="pallas")`` and one GPT-2 train step with AdaSplash attention
(learned α, bf16 compute, AdamW) for each target and prints one JSON line per program. It must run
with ``JAX_PLATFORMS=cpu`` on a machine without a GPU (the CUDA plugin then registers its
compile-only topology without looking for a driver); :func:`compile_programs` starts it so.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

TRITON_NAME = re.compile(r'name = \\?"(\w+)\\?", num_stages')  # in a Triton custom call's backend_config


def attention_program(seq_len=1024, heads=4, head_dim=64, dtype="bfloat16"):
    """(fn, structs): value and gradients of a causal α = 1.5 AdaSplash attention."""
    import jax
    import jax.numpy as jnp

    import adasplash_jax

    def loss(q, k, v):
        out = adasplash_jax.entmax_attention(q, k, v, alpha=1.5, is_causal=True, implementation="pallas",
                                             interpret=False)
        return out.astype(jnp.float32).sum()

    s = jax.ShapeDtypeStruct((1, seq_len, heads, head_dim), jnp.dtype(dtype))
    return jax.value_and_grad(loss, argnums=(0, 1, 2)), (s, s, s)


def gpt2_train_step_program(batch=2, seq_len=256, n_embd=128, n_head=2, n_layer=1):
    """(fn, structs): one AdamW step of a small GPT-2 with AdaSplash attention (learned α per head)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import adasplash_jax
    from models import GPT2Config, GPT2LMHeadModel, set_attention_fn

    cfg = GPT2Config(vocab_size=512, n_positions=seq_len, n_embd=n_embd, n_head=n_head, n_layer=n_layer,
                     attention="adasplash", learn_alpha=True, dtype=jnp.bfloat16)
    model = GPT2LMHeadModel(cfg, rngs=nnx.Rngs(0))
    # The real Triton kernels, not interpret mode (which the CPU default backend would pick).
    set_attention_fn(model, functools.partial(adasplash_jax.entmax_attention, implementation="pallas",
                                              interpret=False))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(3e-4)
    opt_state = tx.init(params)

    def step(params, opt_state, rest, ids):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p, rest)(ids[:, :-1]).astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    ids = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)
    to_struct = functools.partial(jax.tree.map, lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype))
    return step, (to_struct(params), to_struct(opt_state), to_struct(rest), ids)


PROGRAMS = {"attention_fwd_bwd": attention_program, "gpt2_train_step": gpt2_train_step_program}


def compile_one(name: str, target: str) -> dict:
    from adasplash_jax.aot import compile_only_device, compile_program

    fn, structs = PROGRAMS[name]()
    t0 = time.perf_counter()
    compiled = compile_program(fn, *structs, target=target)
    seconds = time.perf_counter() - t0
    text = compiled.as_text()
    mem = compiled.memory_analysis()
    return dict(
        program=name, target=target, seconds=round(seconds, 2),
        triton_kernels=sorted({m for line in text.splitlines() if '"__gpu$xla.gpu.triton"' in line
                               for m in TRITON_NAME.findall(line)}),
        temp_bytes=getattr(mem, "temp_size_in_bytes", None),
        device_kind=compile_only_device(target).device_kind,
    )


def compile_programs(targets=("sm_80", "sm_90"), names=tuple(PROGRAMS), timeout=600) -> list[dict]:
    """Run this module in a fresh process (JAX_PLATFORMS=cpu); one result dict per program and target."""
    from adasplash_jax.aot import find_tools

    find_tools(sass=False)  # a clear message when the extra is missing
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.pop("XLA_FLAGS", None)
    p = subprocess.run([sys.executable, "-m", "adasplash_jax.aot.programs", "--names", ",".join(names), *targets],
                       env=env, capture_output=True, text=True, timeout=timeout, cwd=root)
    out = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode != 0:
        raise RuntimeError(f"deviceless compile exited {p.returncode}:\n{p.stderr[-6000:]}")
    return out


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("targets", nargs="*", default=["sm_80", "sm_90"])
    ap.add_argument("--names", default=",".join(PROGRAMS))
    args = ap.parse_args(argv)
    rc = 0
    for target in args.targets:
        for name in args.names.split(","):
            try:
                res = compile_one(name, target)
            except Exception as e:  # noqa: BLE001 - report every program, fail at the end
                res, rc = dict(program=name, target=target, error=f"{type(e).__name__}: {e}"[:4000]), 1
            print(json.dumps(res), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
