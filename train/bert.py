"""Pre-train a BERT masked LM, or fine-tune it for classification: ``python -m train.bert [--task classify]``.

With no arguments: masked-LM pre-training, tiny preset, byte-level, on the Python standard library's sources,
entmax attention (α = 1.5), 300 steps; outputs in ``runs/bert``. ``--task classify`` trains a classifier that
tells which top-level stdlib package (asyncio, email, ...) a snippet comes from; outputs in ``runs/bert-classify``.
Fine-tune a pre-trained model with ``--init-from`` (a Hugging Face checkpoint folder, e.g. one written by
``models.save_pretrained``). ``--help`` lists every option.
"""

import sys

from train.config import TrainConfig
from train.tasks import main as _main

DEFAULTS = TrainConfig(task="mlm", out="runs/bert")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    defaults = DEFAULTS
    if _task_of(argv) == "classify":
        defaults = TrainConfig(task="classify", out="runs/bert-classify", lr=1e-3, eval_batches=16)
    return _main(argv, prog="python -m train.bert", description=__doc__.splitlines()[0], defaults=defaults)


def _task_of(argv) -> str | None:
    for i, a in enumerate(argv):
        if a == "--task" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--task="):
            return a.split("=", 1)[1]
    return None


if __name__ == "__main__":
    sys.exit(main())
