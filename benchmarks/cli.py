"""Wall time of the ``lienzo generate`` command, as a user runs it: start-up, model load, images, PNGs.

Each run is a fresh process, timed from launch to exit, with its own empty outputs and data folders so
no run finds another's gallery. Runs of the commands alternate, so the machine's noise falls on all of
them alike:

- ``--help``: the interpreter and lienzo's command line alone (no torch);
- ``bad sampler``: ``generate`` with a misspelt sampler, which must fail (exit 2) before torch loads;
- ``load``: start-up, torch, and loading the model (``lienzo models --details`` does not load it, so a
  two-line Python program calls ``lienzo.load_model`` the way ``generate`` does);
- ``generate --local``: the whole command in one process, 4 images at the model's default settings,
  written as PNGs: what every run costs without a server;
- ``generate`` with ``lienzo serve`` running (started once, beside the runs, on the same data folder):
  the command sends the request to the server, which holds the model, and prints the paths it saved.
  One untimed run first, so the server has loaded the model, as it has after its first job.

The table gives the median, min and max of each; ``generate --local`` minus ``load`` is the images' own time.

    python benchmarks/cli.py                              # the shipped default model, 5 runs
    python benchmarks/cli.py --model MODEL --runs 7 -- --steps 30 --sampler "Euler a"
"""

import argparse
import contextlib
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import date
from pathlib import Path


def timed(argv: list[str], env: dict, code: int = 0, says: str = "") -> float:
    """Seconds from launch to exit; the run must end with ``code`` and write ``says`` on stderr."""
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != code or says not in done.stderr:
        raise SystemExit(f"{' '.join(argv)} ended with {done.returncode}, not {code} saying {says!r}:\n{done.stderr[-2000:]}")
    return elapsed


@contextlib.contextmanager
def server(env: dict, model: list[str]):
    """``lienzo serve`` on a free port of this machine, with ``env``'s data folder, until the block ends."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "lienzo", "serve", "--port", str(port), *model], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/queue", timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("lienzo serve did not start") from None
                time.sleep(0.2)
        yield
    finally:
        process.terminate()
        process.wait(30)


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
    lienzo = [sys.executable, "-m", "lienzo"]
    generate = [*lienzo, "generate", args.prompt, *model, "--batch-size", str(args.batch_size), *args.extra]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "LIENZO_DATA_DIR": f"{tmp}/data", "LIENZO_OUTPUTS_DIR": f"{tmp}/out"}
        commands = {  # name: (command, exit code, what stderr must say)
            "--help": ([*lienzo, "--help"], 0, ""),
            "bad sampler": ([*lienzo, "generate", args.prompt, "--sampler", "Eulr a"], 2, "unknown sampler"),
            "load": ([sys.executable, "-c", load_code], 0, ""),
            "generate --local": ([*generate, "--local"], 0, ""),
            "generate, lienzo serve running": (generate, 0, "sent to lienzo serve"),
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        with server(env, model):
            served, code, says = commands["generate, lienzo serve running"]
            timed(served, env, code, says)  # untimed: the server loads its model
            for _ in range(args.runs):
                for name, (argv, code, says) in commands.items():
                    times[name].append(timed(argv, env, code, says))
        pngs = len(list(Path(tmp, "out").rglob("*.png")))
    if pngs != (2 * args.runs + 1) * args.batch_size:
        raise SystemExit(f"expected {(2 * args.runs + 1) * args.batch_size} PNGs, found {pngs}")

    print(f"lienzo generate {args.prompt!r} --batch-size {args.batch_size} {' '.join(model + args.extra)}".rstrip())
    print(f"{date.today()} · {platform.processor() or platform.machine()} · {os.cpu_count()} CPUs · "
          f"{args.runs} runs each, alternating · {pngs} PNGs written\n")
    print("| command | median s | min s | max s |\n|---|---:|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")
    per_image = (statistics.median(times["generate --local"]) - statistics.median(times["load"])) / args.batch_size
    print(f"\nimages alone (generate - load, medians): {per_image:.2f} s per image")


if __name__ == "__main__":
    main()
