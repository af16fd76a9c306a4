"""Wall time of the ``lienzo generate`` command, as a user runs it: start-up, model load, images, PNGs.

Each run is a fresh process (``python -m lienzo generate PROMPT --batch-size 4``), timed from launch to
exit, with its own empty outputs and data folders so no run finds another's gallery. Runs of three
commands alternate, so the machine's noise falls on all of them alike:

- ``--help``: the interpreter and lienzo's command line alone (no torch);
- ``load``: start-up, torch, and loading the model (``lienzo models --details`` does not load it, so a
  two-line Python program calls ``lienzo.load_model`` the way ``generate`` does);
- ``generate``: the whole command, 4 images at the model's default settings, written as PNGs.

The table gives the median, min and max of each; ``generate`` minus ``load`` is the images' own time.

    python benchmarks/cli.py                              # the shipped default model, 5 runs
    python benchmarks/cli.py --model MODEL --runs 7 -- --steps 30 --sampler "Euler a"
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path


def timed(argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a checkpoint or folder; default: the model lienzo picks by itself")
    parser.add_argument("--prompt", default="a red apple")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("extra", nargs="*", help="more `lienzo generate` options, after --")
    args = parser.parse_args()

    model = ["--model", args.model] if args.model else []
    load_code = f"import lienzo; lienzo.load_model({args.model!r})"
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "LIENZO_DATA_DIR": f"{tmp}/data", "LIENZO_OUTPUTS_DIR": f"{tmp}/out"}
        commands = {
            "--help": [sys.executable, "-m", "lienzo", "--help"],
            "load": [sys.executable, "-c", load_code],
            "generate": [sys.executable, "-m", "lienzo", "generate", args.prompt, *model,
                         "--batch-size", str(args.batch_size), *args.extra],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.runs):
            for name, argv in commands.items():
                times[name].append(timed(argv, env))
        pngs = len(list(Path(tmp, "out").rglob("*.png")))
    if pngs != args.runs * args.batch_size:
        raise SystemExit(f"expected {args.runs * args.batch_size} PNGs, found {pngs}")

    print(f"lienzo generate {args.prompt!r} --batch-size {args.batch_size} {' '.join(model + args.extra)}".rstrip())
    print(f"{date.today()} · {platform.processor() or platform.machine()} · {os.cpu_count()} CPUs · "
          f"{args.runs} runs each, alternating · {pngs} PNGs written\n")
    print("| command | median s | min s | max s |\n|---|---:|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")
    per_image = (statistics.median(times["generate"]) - statistics.median(times["load"])) / args.batch_size
    print(f"\nimages alone (generate - load, medians): {per_image:.2f} s per image")


if __name__ == "__main__":
    main()
