"""``python -m adasplash_jax.aot``: compile the kernels for GPU targets and print the per-kernel table.

Examples:
  python -m adasplash_jax.aot                               # d = 64, 128; bf16; causal; α = 1.5; sm_80, sm_90
  python -m adasplash_jax.aot --head-dims 32,64,128,256 --alphas 1.5,2,1.8,head,learned --full
  python -m adasplash_jax.aot --matrix --no-sass            # everything CI compiles (--matrix full: more)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time

from adasplash_jax.aot import AotToolsMissing, Variant, compile_variants, format_table, matrix


def _alpha(s: str):
    return s if s in ("head", "learned") else float(s)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adasplash_jax.aot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="sm_80,sm_90")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--dtypes", default="bfloat16")
    ap.add_argument("--alphas", default="1.5", help="floats, 'head' (per-head array) or 'learned'")
    ap.add_argument("--full", action="store_true", help="non-causal too")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--matrix", nargs="?", const="ci", choices=("ci", "full"),
                    help="the variants tests/test_aot.py compiles ('full': every fp16 combination too)")
    ap.add_argument("--no-sass", action="store_true", help="skip nvdisasm (no loop counts)")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--json", help="also write the records to this file")
    args = ap.parse_args(argv)

    if args.matrix:
        variants = matrix(full=args.matrix == "full")
    else:
        variants = [
            Variant(head_dim=int(d), dtype=dt, causal=c, alpha=_alpha(a), seq_len=args.seq_len,
                    num_heads=args.heads, num_kv_heads=args.kv_heads)
            for d, dt, c, a in itertools.product(args.head_dims.split(","), args.dtypes.split(","),
                                                 (True, False) if args.full else (True,), args.alphas.split(","))
        ]
    t0 = time.perf_counter()
    try:
        records = compile_variants(variants, args.targets.split(","), sass=not args.no_sass, jobs=args.jobs)
    except AotToolsMissing as e:
        print(e, file=sys.stderr)
        return 2
    print(format_table(records))
    spilling = [r.id for r in records if r.spills]
    print(f"\n{len(records)} kernels from {len(variants)} variants in {time.perf_counter() - t0:.0f} s; "
          f"{len(spilling)} spill" + (": " + ", ".join(spilling) if spilling else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(dataclasses.asdict(r), variant=r.variant.name, label=r.label) for r in records], f,
                      indent=1, default=str)
    return 1 if any(r.error for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
