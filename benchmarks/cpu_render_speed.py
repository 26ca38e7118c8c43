"""CPU speed of the reference rasterizer (forward + backward) in a fresh interpreter, with torch's default thread
pool and after re-applying the thread count (torch.set_num_threads), each case in its own process.

    python benchmarks/cpu_render_speed.py --gaussians 20000 --size 100
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CASE = r"""
import json, sys, time, torch
from nerfstudio_splat_ext.render.reference import rasterization_reference
args = json.loads(sys.argv[1])
if args["reset"]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_num_threads(n)
torch.manual_seed(0)
n, size = args["gaussians"], args["size"]
focal = size / (2 * 0.3625)  # lego's field of view
means = (torch.rand(n, 3) * 2 - 1) * 1.0
params = [means, torch.randn(n, 4), torch.full((n, 3), 0.02), torch.full((n,), 0.5), torch.rand(n, 16, 3) * 0.1]
for p in params:
    p.requires_grad_(True)
viewmat = torch.eye(4)[None]
viewmat[0, 2, 3] = 4.0
K = torch.tensor([[[focal, 0, size / 2], [0, focal, size / 2], [0, 0, 1.0]]])
times = []
for _ in range(args["repeats"] + 1):
    t0 = time.perf_counter()
    img, alpha, _ = rasterization_reference(*params, viewmat, K, size, size, sh_degree=3, tile_size=args["tile_size"])
    img.sum().backward()
    times.append(time.perf_counter() - t0)
times = sorted(times[1:])  # first call is a warm-up
print(json.dumps({"median_s": times[len(times) // 2], "min_s": times[0], "max_s": times[-1]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gaussians", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--tile-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"reference rasterizer, {args.gaussians} Gaussians, {args.size}x{args.size}, tile size {args.tile_size}, "
          f"forward+backward, median of {args.repeats}")
    for reset in (False, True):
        case = dict(vars(args), reset=reset)
        out = subprocess.run([sys.executable, "-c", CASE, json.dumps(case)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        label = "thread count re-applied" if reset else "torch defaults"
        print(f"| {label} | {r['median_s'] * 1000:.0f} ms (min {r['min_s'] * 1000:.0f}, max {r['max_s'] * 1000:.0f}) |")


if __name__ == "__main__":
    main()
