"""Training throughput: softmax vs entmax attention train steps, side by side in one run.

    python benchmarks/train_cpu.py [--steps 30] [--batch-size 16] [--seq-len 128] [--alpha 1.5] [--task lm|mlm]

The defaults are the CPU benchmark (tiny preset, softmax vs dense entmax). On a GPU the same script times the
issue's GPT-2 124M comparison, e.g.
    python benchmarks/train_cpu.py --preset gpt2 --seq-len 1024 --batch-size 8 --kinds softmax adasplash
    python benchmarks/train_cpu.py --preset gpt2 --positions 8192 --seq-len 8192 --batch-size 1 --kinds softmax adasplash

For each attention kind: builds the same model and train step as ``python -m train.gpt2`` (or ``train.bert``),
compiles it and runs warm-up steps, then times ``--steps`` steps one at a time (each waited for, the two kinds
interleaved step by step so that background load hits both alike) and reports the median step time as steps/s and
tokens/s, plus the entmax / softmax ratio. Compile time is reported separately and excluded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

from train.config import make_config
from train.tasks import make_task
from train.trainer import setup


class Runner:
    """One attention kind: its own model, state and compiled step."""

    def __init__(self, kind: str, args):
        self.kind = kind
        self.cfg = make_config(task=args.task, preset=args.preset, positions=args.positions, attention=kind,
                               alpha=None if kind == "softmax" else args.alpha, batch_size=args.batch_size,
                               seq_len=args.seq_len, steps=args.warmup + args.steps, progress=False,
                               out=tempfile.mkdtemp(prefix="bench-"))
        self.s = setup(self.cfg, make_task(self.cfg, log=lambda *_: None))
        self.state, self.i, self.times = self.s.state, 0, []
        t0 = time.perf_counter()
        self.step(record=False)
        self.compile_s = time.perf_counter() - t0

    def step(self, record: bool = True):
        batch = self.s.train_batch(self.i)
        jax.block_until_ready(batch)
        t = time.perf_counter()
        self.state, m = self.s.train_step(self.state, batch, self.s.alpha_arg(self.i))
        jax.block_until_ready(m)
        if record:
            self.times.append(time.perf_counter() - t)
        self.i += 1
        self.loss = m["loss"]

    def summary(self) -> dict:
        assert self.s.train_step._cache_size() == 1
        med = statistics.median(self.times)
        return {"attention": self.kind, "compile_s": self.compile_s, "median_step_s": med, "steps_per_s": 1 / med,
                "tokens_per_s": self.cfg.run.batch_size * self.cfg.data.seq_len / med, "loss": float(self.loss),
                "p10_step_s": float(np.percentile(self.times, 10)),
                "p90_step_s": float(np.percentile(self.times, 90))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="lm", choices=["lm", "mlm"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--alpha", type=float, default=1.5)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--positions", type=int, default=None, help="position table size (long context, e.g. 8192)")
    p.add_argument("--kinds", nargs=2, default=["softmax", "entmax"], metavar=("BASELINE", "OTHER"),
                   choices=["softmax", "entmax", "adasplash"], help="the two attention kinds to compare")
    args = p.parse_args(argv)
    print(f"# jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s); {args.preset} preset "
          f"{args.task}, batch {args.batch_size} × seq {args.seq_len}, {args.steps} timed steps (median)")
    runners = [Runner(kind, args) for kind in args.kinds]
    for _ in range(args.warmup - 1):
        for r in runners:
            r.step(record=False)
    for _ in range(args.steps):  # interleaved, so that background load affects both alike
        for r in runners:
            r.step()
    rows = [r.summary() for r in runners]
    print(f"{'attention':<10} {'steps/s':>9} {'tokens/s':>10} {'median ms':>10} {'p10–p90 ms':>14} {'compile s':>10}")
    for r in rows:
        print(f"{r['attention']:<10} {r['steps_per_s']:>9.2f} {r['tokens_per_s']:>10,.0f} "
              f"{1e3 * r['median_step_s']:>10.1f} {1e3 * r['p10_step_s']:>6.1f}–{1e3 * r['p90_step_s']:<7.1f} "
              f"{r['compile_s']:>10.1f}")
    ratio = rows[1]["steps_per_s"] / rows[0]["steps_per_s"]
    print(f"{args.kinds[1]} / {args.kinds[0]} throughput ratio: {ratio:.2f} (median step time ×{1 / ratio:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
