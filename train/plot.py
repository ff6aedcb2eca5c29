"""Plot training curves from ``metrics.jsonl``.

    python -m train.plot RUN_DIR                     # RUN_DIR/loss.png and RUN_DIR/sparsity.png
    python -m train.plot RUN_A RUN_B -o cmp.png      # runs side by side in one figure: loss | sparsity

Loss: the training loss averaged over each logging interval (solid) and the validation loss (dots, dashed).
Sparsity: per-layer fraction of exact zeros in the attention probabilities (mean over heads).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (is {run_dir} a training output folder?)")
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            records.append(json.loads(line))
    return records


def _label(run_dir: Path) -> str:
    cfg = run_dir / "config.json"
    if cfg.exists():
        c = json.loads(cfg.read_text())
        m = c.get("model", c)  # nested config (older runs: flat)
        att = m.get("attention", "?")
        return att if att == "softmax" else f"{att} α={m.get('alpha') or 1.5}"
    return run_dir.name


def _plot_loss(ax, runs):
    for i, (name, recs) in enumerate(runs):
        color = f"C{i}"
        train = [(r["step"], r.get("loss_avg", r["loss"])) for r in recs if "loss" in r]
        if train:
            ax.plot(*zip(*train), color=color, lw=1.2, label=f"{name} train")
        val = [(r["step"], r["val_loss"]) for r in recs if r.get("val_loss") is not None]
        if val:
            ax.plot(*zip(*val), color=color, ls="--", marker="o", ms=3, lw=1, label=f"{name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _plot_sparsity(ax, runs):
    any_data = False
    for i, (name, recs) in enumerate(runs):
        pts = [(r["step"], r["sparsity"]) for r in recs if r.get("sparsity") is not None]
        if not pts:
            continue
        any_data = True
        steps = [s for s, _ in pts]
        n_layers = len(pts[0][1])
        styles = ["-", "--", ":", "-."]
        for layer in range(n_layers):
            ax.plot(steps, [v[layer] for _, v in pts], color=f"C{i}", ls=styles[layer % 4], marker=".", ms=3,
                    label=f"{name} layer {layer}")
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of exact zeros")
    ax.set_title("attention sparsity")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    if any_data:
        ax.legend(fontsize=7)


def plot(run_dirs, out: str | Path | None = None, dpi: int = 90) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dirs = [Path(d) for d in run_dirs]
    runs = [(_label(d) if len(run_dirs) > 1 else d.name, read_metrics(d)) for d in run_dirs]
    written = []
    if out is None and len(run_dirs) == 1:
        for fname, fn in (("loss.png", _plot_loss), ("sparsity.png", _plot_sparsity)):
            fig, ax = plt.subplots(figsize=(5, 3.4))
            fn(ax, runs)
            fig.tight_layout()
            path = run_dirs[0] / fname
            fig.savefig(path, dpi=dpi)
            plt.close(fig)
            written.append(path)
        return written
    out = Path(out) if out is not None else Path("comparison.png")
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    _plot_loss(a, runs)
    _plot_sparsity(b, runs)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return [out]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="training output folders (each with metrics.jsonl)")
    parser.add_argument("-o", "--out", default=None, help="one PNG with all runs (default with one run: "
                                                          "RUN_DIR/loss.png and RUN_DIR/sparsity.png)")
    parser.add_argument("--dpi", type=int, default=90)
    args = parser.parse_args(argv)
    try:
        for p in plot(args.runs, args.out, args.dpi):
            print(f"wrote {p}")
    except FileNotFoundError as e:
        print(f"python -m train.plot: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
