"""Train several variants of splat-ext concurrently on one GPU (for ablations), then evaluate them with the same
code as bench_splat.py. Variants are given as NAME='flags ...'.

    python benchmarks/ablate.py --data DATA --steps 30000 --out-dir bench/ablate base='' absgrad='--pipeline.model.strategy.absgrad True'
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_splat import evaluate, markdown, train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30_000)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--skip-train", action="store_true", help="only evaluate the runs of an earlier invocation")
    parser.add_argument("variants", nargs="+", help="NAME='flags'")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    variants = dict(v.split("=", 1) for v in args.variants)

    def run(item):
        name, flags = item
        result = train("splat-ext", args.data, args.steps, args.out_dir, shlex.split(flags), label=name)
        result["method"] = name
        return result

    runs_file = args.out_dir / "ablation_runs.json"
    if args.skip_train:
        runs = [r for r in json.loads(runs_file.read_text()) if r["method"] in variants]
    else:
        with ThreadPoolExecutor(max_workers=len(variants)) as pool:
            runs = list(pool.map(run, variants.items()))
        runs_file.write_text(json.dumps(runs, indent=2))  # a later --skip-train invocation can evaluate them
    results = [evaluate(r, {}) for r in runs]
    for r in results:
        r["flags"] = variants[r["method"]]
    (args.out_dir / "ablation.json").write_text(json.dumps(results, indent=2))
    print(markdown(results))


if __name__ == "__main__":
    main()
