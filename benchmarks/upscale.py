"""Seconds and peak memory of a tiled 4x upscale with RealESRGAN x4plus's architecture, on the CPU.

The model is RRDBNet at Real-ESRGAN x4plus's size (64 filters, 23 blocks, 4x; 16.7 M parameters) with random
weights, saved as a .safetensors file in a temporary models dir and used through ``lienzo.upscale.upscale``
as any model file is (spandrel loads it). Speed and memory do not depend on the weights' values.
Each run is a fresh process, so that its peak RSS is its own; runs of the sizes alternate, so the
machine's noise falls on all of them alike. The table gives the median (min-max) of each, the windows
the image was cut into, the seconds per window, and the load average around the runs.

A 2048² input is not run by default (hours on a small CPU): its time is extrapolated from the largest
size measured by the input pixels its windows cover (overlaps counted each time), and its memory from what
the runs measured plus the 4x result's float32 accumulator, which grows with the output's pixels.

    python benchmarks/upscale.py                       # 256² and 512², 3 runs each
    python benchmarks/upscale.py --sizes 256 --runs 5 --tile 256
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

NAME = "RealESRGAN_x4plus-random"


def make_model(models_dir: Path) -> None:
    from safetensors.torch import save_file

    from lienzo.upscale.upscalers import import_spandrel

    import torch

    import_spandrel()
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    model = ESRGAN(in_nc=3, out_nc=3, num_filters=64, num_blocks=23, scale=4)
    (models_dir / "RealESRGAN").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(models_dir / "RealESRGAN" / f"{NAME}.safetensors"))


def one_run(models_dir: Path, size: int, tile: int) -> dict:
    """In this process: load the model and upscale a size² picture 4x; seconds of the upscale, peak RSS."""
    import resource

    import numpy as np
    from PIL import Image

    from lienzo.upscale.tiles import windows
    from lienzo.upscale.upscalers import find_upscaler, load_model, upscale

    upscaler = find_upscaler(NAME, models_dir)
    load_model(upscaler)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    start = time.perf_counter()
    out = upscale(image, upscaler, 4, tile=tile)
    seconds = time.perf_counter() - start
    assert out.size == (4 * size, 4 * size)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {"seconds": seconds, "peak_mib": peak_mib, "windows": len(windows(size, tile)[0]) ** 2, "window_pixels": window_pixels(size, tile)}


def window_pixels(size: int, tile: int) -> int:
    """The input pixels the model runs over for a size² image: its windows' area, overlaps counted each time."""
    from lienzo.upscale.tiles import windows

    starts, side = windows(size, tile)
    return (len(starts) * side) ** 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tile", type=int, default=192)
    parser.add_argument("--one", nargs=2, metavar=("MODELS_DIR", "SIZE"), help=argparse.SUPPRESS)  # a child run
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(Path(args.one[0]), int(args.one[1]), args.tile)))
        return

    from lienzo.upscale.tiles import windows

    with tempfile.TemporaryDirectory() as folder:
        models_dir = Path(folder) / "models"
        make_model(models_dir)
        results: dict[int, list[dict]] = {size: [] for size in args.sizes}
        load_before = os.getloadavg()
        for _ in range(args.runs):
            for size in args.sizes:
                argv = [sys.executable, __file__, "--one", str(models_dir), str(size), "--tile", str(args.tile)]
                done = subprocess.run(argv, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
                results[size].append(json.loads(done.stdout.strip().splitlines()[-1]))
        load_after = os.getloadavg()

    import torch

    print(f"# 4x upscale, RealESRGAN x4plus architecture (random weights), tile {args.tile}, CPU, {torch.get_num_threads()} threads")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {date.today()}")
    print(f"# load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after; median (min-max) of {args.runs} runs\n")
    print("| input | output | windows | seconds | s / window | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for size, runs in results.items():
        seconds = [r["seconds"] for r in runs]
        peaks = [r["peak_mib"] for r in runs]
        count = runs[0]["windows"]
        print(
            f"| {size}² | {4 * size}² | {count} | {statistics.median(seconds):.1f} ({min(seconds):.1f}-{max(seconds):.1f}) "
            f"| {statistics.median(seconds) / count:.2f} | {statistics.median(peaks):.0f} ({min(peaks):.0f}-{max(peaks):.0f}) |"
        )
    largest = max(results)
    per_pixel = statistics.median(r["seconds"] for r in results[largest]) / results[largest][0]["window_pixels"]
    count = len(windows(2048, args.tile)[0]) ** 2
    seconds = per_pixel * window_pixels(2048, args.tile)
    # The runs' peak less the largest output's accumulator (3 float32 channels) and results (two uint8 copies),
    # plus those at 8192².
    per_output_pixel = 3 * 4 + 2 * 3
    base = statistics.median(r["peak_mib"] for r in results[largest]) - (4 * largest) ** 2 * per_output_pixel / 2**20
    estimate = base + 8192**2 * per_output_pixel / 2**20
    print(f"| 2048² (extrapolated) | 8192² | {count} | ~{seconds:.0f} | {seconds / count:.2f} | ~{estimate:.0f} |")


if __name__ == "__main__":
    main()
