"""The HTTP path of ``lienzo serve`` vs calling the engine directly, on the same loaded model.

One process: a real uvicorn server in a thread, on a free loopback port, with the same Components
object the direct calls use. Runs alternate (direct, HTTP, direct, ...) and the table shows medians.
Then queue throughput: C clients submit at once (``?wait=true``) vs the same images made one
after another by the engine. Weights are random: speed does not depend on their values.

    python benchmarks/server.py [--model sd15|tiny] [--size 256] [--steps 4] [--repeats 5] [--clients 8]
"""

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()

    components = components_for(args.model)
    components.name = args.model
    fields = {"prompt": "a lighthouse at dusk, oil painting", "steps": args.steps, "width": args.size, "height": args.size, "sampler": "Euler"}
    root = Path(tempfile.mkdtemp(prefix="lienzo-bench-"))
    settings = Settings(data_dir=root / "data", models_dir=root / "models", outputs_dir=root / "out", default_model=str(root))
    app = create_app(settings, loader=lambda _name: components)
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
    print(f"model {args.model}, {args.size}x{args.size}, {args.steps} steps, Euler, CPU threads {os.cpu_count()}, medians of {args.repeats}")
    print(f"{'path':<28}{'s/image':>10}")
    print(f"{'engine.generate':<28}{engine_s:>10.3f}")
    print(f"{'POST /api/v1/txt2img?wait':<28}{http_s:>10.3f}")
    print(f"HTTP overhead: {(http_s / engine_s - 1) * 100:+.1f}% ({http_s - engine_s:+.3f} s)")
    print(f"{args.clients} concurrent clients: {concurrent:.2f} s = {args.clients / concurrent:.2f} images/s; "
          f"engine one after another: {sequential:.2f} s = {args.clients / sequential:.2f} images/s; ratio {sequential / concurrent:.2f}")


if __name__ == "__main__":
    main()
