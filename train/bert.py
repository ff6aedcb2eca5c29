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

DEFAULTS = TrainConfig(task="mlm")
# chosen by --task in the same parse as every other option; options given on the command line win
TASK_DEFAULTS = {
    "mlm": dict(out="runs/bert"),
    "classify": dict(out="runs/bert-classify", lr=1e-3, eval_batches=16),
}


def main(argv=None) -> int:
    return _main(argv, prog="python -m train.bert", description=__doc__.splitlines()[0], defaults=DEFAULTS,
                 task_defaults=TASK_DEFAULTS)


if __name__ == "__main__":
    sys.exit(main())
