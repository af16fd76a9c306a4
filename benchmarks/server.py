"""The HTTP path of ``lienzo serve`` vs calling the engine directly, on the same loaded model.

One process: a real uvicorn server in a thread, on a free loopback port, with the same Components
object the direct calls use. Runs alternate (direct, HTTP, direct, ...) and the table shows medians.
Then queue throughput: C clients submit at once (``?wait=true``) vs the same images made one
after another by the engine. Weights are random: speed does not depend on their values.

Two more parts run ``lienzo serve`` itself, as subprocesses over a models dir holding the model as one
single-file checkpoint, each with its own data dir (its own jobs.db):

- workers: jobs per minute with one local worker (``--devices cpu``: a thread of the server with all the
  cores) and with two (``--devices cpu,cpu``: a process each with half the cores): J jobs submitted at
  once through ``POST /api/v1/txt2img``, followed with ``GET /api/v1/jobs/{id}``; the time is the
  server's own, from the first job's creation to the last one's end. Bursts alternate between the servers.
- ray: the Ray backend's overhead on the same job: ``--cluster ADDRESS --workers 1`` on a local Ray this
  script starts (``ray.init``) vs ``--devices cpu``, both with torch's default CPU threads: seconds per
  job of sequential ``?wait=true`` jobs, alternating. Skipped when ray is not installed.

    python benchmarks/server.py [--model sd15|tiny] [--size 256] [--steps 4] [--repeats 5] [--clients 8]
                                [--jobs 8] [--parts http,workers,ray]
"""

import argparse
import asyncio
import importlib.util
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import uvicorn  # noqa: E402

from lienzo.generation import engine  # noqa: E402
from lienzo.generation.request import build_request  # noqa: E402
from lienzo.server.app import create_app  # noqa: E402
from lienzo.settings import Settings  # noqa: E402

HERE = Path(__file__).resolve().parent


def components_for(name: str):
    if name == "sd15":
        sys.path.insert(0, str(HERE))
        from speed import sd15

        return sd15()
    sys.path.insert(0, str(HERE.parent / "tests"))
    from tiny_models import build_tiny

    return build_tiny("sd1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load() -> str:
    return "load average " + ", ".join(f"{x:.1f}" for x in os.getloadavg())


def http_overhead(args, root: Path, components, fields: dict) -> None:
    """The in-process server's HTTP path vs engine.generate, and C concurrent clients vs one after another.
    The server's loader hands it the same Components the direct calls use (root/models has the file the
    queue resolves the model name to)."""
    settings = Settings(data_dir=root / "data-http", models_dir=root / "models", outputs_dir=root / "out-http", default_model=args.model)
    app = create_app(settings, loader=lambda _path, _cancel: components)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/api/v1/txt2img?wait=true"

    def direct(seed: int) -> float:
        started = time.perf_counter()
        engine.generate(components, build_request(**fields, seed=seed))
        return time.perf_counter() - started

    # One client for all requests, as real clients keep theirs (creating an httpx client costs ~50 ms).
    client = httpx.Client(timeout=600)

    def http(seed: int) -> float:
        started = time.perf_counter()
        response = client.post(url, json={**fields, "seed": seed})
        response.raise_for_status()
        client.get(f"http://127.0.0.1:{port}{response.json()['images'][0]['url']}").raise_for_status()
        return time.perf_counter() - started

    http(0)  # first job loads the model into the queue's slot and warms both paths
    direct(0)
    times: dict[str, list[float]] = {"engine": [], "HTTP": []}
    for i in range(args.repeats):
        times["engine"].append(direct(i + 1))
        times["HTTP"].append(http(i + 1))

    async def burst() -> float:
        async with httpx.AsyncClient(timeout=3600) as client:
            started = time.perf_counter()
            responses = await asyncio.gather(*(client.post(url, json={**fields, "seed": 100 + i}) for i in range(args.clients)))
            elapsed = time.perf_counter() - started
        assert all(r.status_code == 200 and r.json()["status"] == "done" for r in responses)
        return elapsed

    concurrent = asyncio.run(burst())
    sequential = sum(direct(100 + i) for i in range(args.clients))
    client.close()
    server.should_exit = True
    thread.join(30)

    engine_s, http_s = statistics.median(times["engine"]), statistics.median(times["HTTP"])
    print(f"model {args.model}, {args.size}x{args.size}, {args.steps} steps, Euler, CPU threads {os.cpu_count()}, medians of {args.repeats}, {load()}")
    print(f"{'path':<28}{'s/image':>10}")
    print(f"{'engine.generate':<28}{engine_s:>10.3f}")
    print(f"{'POST /api/v1/txt2img?wait':<28}{http_s:>10.3f}")
    print(f"HTTP overhead: {(http_s / engine_s - 1) * 100:+.1f}% ({http_s - engine_s:+.3f} s)")
    print(f"{args.clients} concurrent clients: {concurrent:.2f} s = {args.clients / concurrent:.2f} images/s; "
          f"engine one after another: {sequential:.2f} s = {args.clients / sequential:.2f} images/s; ratio {sequential / concurrent:.2f}")


def checkpoint_home(components, name: str) -> Path:
    """A temporary root whose ``models`` folder holds ``components`` as ``name.safetensors``, one single
    file as users have them (float16, as published SD 1.5 checkpoints are)."""
    import torch

    from lienzo.models.single_file_save import save_single_file

    root = Path(tempfile.mkdtemp(prefix="lienzo-bench-serve-"))
    (root / "models").mkdir()
    save_single_file(components, root / "models" / f"{name}.safetensors", dtype=torch.float16)
    return root


@contextmanager
def lienzo_serve(root: Path, label: str, *serve_args: str, env: dict[str, str] | None = None, timeout: float = 300) -> Iterator[str]:
    """``lienzo serve`` over ``root/models`` in a subprocess on a free port, with its own data dir
    (``root/data-<label>``) and ``env`` added; yields its base URL. Its log is ``root/serve-<label>.log``."""
    port = free_port()
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "LIENZO_MODELS_DIR": str(root / "models"),
        "LIENZO_DATA_DIR": str(root / f"data-{label}"), "LIENZO_OUTPUTS_DIR": str(root / f"out-{label}"), **(env or {}),
    }
    log_path = root / f"serve-{label}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "lienzo", "serve", "--port", str(port), *serve_args], stdout=log, stderr=subprocess.STDOUT, env=env
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise SystemExit(f"lienzo serve {' '.join(serve_args)} exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"lienzo serve {' '.join(serve_args)} did not start in {timeout} s:\n{log_path.read_text()[-3000:]}") from None
                    time.sleep(0.2)
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def burst(client: httpx.Client, url: str, fields: dict, seeds: range) -> float:
    """Submit a job per seed at once, wait for all; seconds from the first job's creation to the last
    one's end, by the server's clock (the client's polling interval does not count)."""
    ids = []
    for seed in seeds:
        response = client.post(f"{url}/api/v1/txt2img", json={**fields, "seed": seed})
        response.raise_for_status()
        ids.append(response.json()["id"])
    jobs: dict[str, dict] = {}
    while len(jobs) < len(ids):
        time.sleep(0.1)
        for job_id in ids:
            if job_id not in jobs:
                job = client.get(f"{url}/api/v1/jobs/{job_id}").raise_for_status().json()
                if job["status"] not in ("queued", "running"):
                    jobs[job_id] = job
    failed = [job for job in jobs.values() if job["status"] != "done"]
    if failed:
        raise SystemExit(f"{len(failed)} jobs did not finish: {failed[0]['status']}: {failed[0].get('error')}")
    return max(job["finished"] for job in jobs.values()) - min(job["created"] for job in jobs.values())


def workers_throughput(args, root: Path, fields: dict) -> None:
    """Jobs per minute with one and with two local CPU workers, J jobs at once, bursts alternating."""
    servers = {"1 worker (cpu)": ("cpu",), "2 workers (cpu,cpu)": ("cpu", "cpu")}
    times: dict[str, list[float]] = {label: [] for label in servers}
    with httpx.Client(timeout=3600) as client:
        with lienzo_serve(root, "one", "--devices", "cpu", "-m", args.model) as one, lienzo_serve(
            root, "two", "--devices", "cpu,cpu", "-m", args.model
        ) as two:
            urls = dict(zip(servers, (one, two)))
            for label, devices in servers.items():  # every worker loads the model before the clock runs
                burst(client, urls[label], fields, range(len(devices)))
            load_before = load()
            for i in range(args.repeats):
                for label in servers:
                    times[label].append(burst(client, urls[label], fields, range(1000 * (i + 1), 1000 * (i + 1) + args.jobs)))
            load_after = load()
    print(f"\n{args.jobs} jobs at once, model {args.model} (single file), {args.size}x{args.size}, {args.steps} steps, "
          f"CPU threads {os.cpu_count()}, medians of {args.repeats}; {load_before} before, {load_after} after")
    print(f"{'server':<24}{'s/burst':>10}{'jobs/min':>10}")
    rates = {}
    for label in servers:
        seconds = statistics.median(times[label])
        rates[label] = args.jobs / seconds * 60
        print(f"{label:<24}{seconds:>10.2f}{rates[label]:>10.2f}")
    one_rate, two_rate = rates.values()
    print(f"2 workers / 1 worker: {two_rate / one_rate:.2f}x")


def ray_overhead(args, root: Path, fields: dict) -> None:
    """Seconds per job through the Ray backend (a local Ray) vs a local worker, the same sequential jobs."""
    if importlib.util.find_spec("ray") is None:
        print("\nray backend overhead: ray not installed, skipped (pip install ray)")
        return
    import ray
    import torch

    # A Ray of this process's own, which ray.shutdown() ends with everything it started; the server joins
    # it by address (--cluster auto joins only a cluster the server itself runs in).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING").address_info["gcs_address"]
    # Ray gives an actor OMP_NUM_THREADS = its num_cpus (1 here); both servers get torch's default for this
    # machine instead, so that the rows differ by Ray's path only.
    threads = {"LIENZO_THREADS": str(torch.get_num_threads())}
    servers = {"local (--devices cpu)": ("--devices", "cpu"), "ray (--cluster, 1 actor)": ("--cluster", address, "--workers", "1")}
    times: dict[str, list[float]] = {label: [] for label in servers}

    def job(client: httpx.Client, url: str, seed: int) -> float:
        started = time.perf_counter()
        response = client.post(f"{url}/api/v1/txt2img?wait=true", json={**fields, "seed": seed})
        response.raise_for_status()
        if response.json()["status"] != "done":
            raise SystemExit(f"job did not finish: {response.json()}")
        return time.perf_counter() - started

    local_args, ray_args = servers.values()
    try:
        with httpx.Client(timeout=3600) as client:
            with lienzo_serve(root, "local", *local_args, "-m", args.model, env=threads) as local, lienzo_serve(
                root, "ray", *ray_args, "-m", args.model, env=threads
            ) as cluster:
                urls = dict(zip(servers, (local, cluster)))
                for url in urls.values():  # loads the model in each worker before the clock runs
                    job(client, url, 0)
                load_before = load()
                for i in range(args.repeats):
                    for label in servers:
                        times[label].append(job(client, urls[label], i + 1))
                load_after = load()
    finally:
        ray.shutdown()
    print(f"\nsequential jobs, model {args.model} (single file), {args.size}x{args.size}, {args.steps} steps, "
          f"{threads['LIENZO_THREADS']} CPU threads in each worker, medians of {args.repeats}; {load_before} before, {load_after} after")
    print(f"{'server':<24}{'s/job':>10}")
    for label in servers:
        print(f"{label:<24}{statistics.median(times[label]):>10.3f}")
    local_s, ray_s = (statistics.median(times[label]) for label in servers)
    print(f"Ray overhead: {(ray_s / local_s - 1) * 100:+.1f}% ({ray_s - local_s:+.3f} s per job; target < 5% at 256² SD 1.5)")


PARTS = ("http", "workers", "ray")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=8, help="jobs per burst in the workers part")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"which measurements, comma-separated: {', '.join(PARTS)}")
    args = parser.parse_args()
    parts = args.parts.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"--parts: {', '.join(sorted(unknown))} is not one of {', '.join(PARTS)}")

    components = components_for(args.model)
    components.name = args.model
    fields = {"prompt": "a lighthouse at dusk, oil painting", "steps": args.steps, "width": args.size, "height": args.size, "sampler": "Euler"}
    root = checkpoint_home(components, args.model)
    try:
        if "http" in parts:
            http_overhead(args, root, components, fields)
        del components  # the subprocess servers load their own copies from root/models
        if "workers" in parts:
            workers_throughput(args, root, fields)
        if "ray" in parts:
            ray_overhead(args, root, fields)
    finally:
        shutil.rmtree(root)  # SD 1.5's file is 2 GB


if __name__ == "__main__":
    main()
