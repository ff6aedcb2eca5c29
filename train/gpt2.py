"""Train a GPT-2 style causal language model: ``python -m train.gpt2 [--preset tiny] [--steps N] ...``.

With no arguments: the tiny preset, byte-level, on the Python standard library's sources, entmax attention
(α = 1.5), 300 steps — a few minutes on a 2-core CPU; outputs in ``runs/gpt2``. ``--help`` lists every option.
"""

import sys

from train.config import TrainConfig
from train.tasks import main as _main

DEFAULTS = TrainConfig(task="lm")
TASK_DEFAULTS = {"lm": dict(out="runs/gpt2")}


def main(argv=None) -> int:
    return _main(argv, prog="python -m train.gpt2", description=__doc__.splitlines()[0], defaults=DEFAULTS,
                 task_defaults=TASK_DEFAULTS)


if __name__ == "__main__":
    sys.exit(main())
