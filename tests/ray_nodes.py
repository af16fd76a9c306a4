"""A Ray cluster of this test's own on loopback: ``ray start --block`` processes (a head and more nodes),
ended by their pids afterwards (``ray stop`` would end every Ray process on the machine)."""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

OBJECT_STORE = 200 * 2**20  # the machine running tests is small; events and model chunks fit easily


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: each socket stays bound until all are picked (one at a time, the system
    may hand the same port out twice)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait(check, what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the test cluster did not come up: {what}")
        time.sleep(0.5)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def ray_env(temp: str) -> dict[str, str]:
    """The environment of every process of the test cluster, its drivers included."""
    return {**os.environ, "RAY_TMPDIR": temp, "HOME": temp, "RAY_USAGE_STATS_ENABLED": "0"}


# Ray's other listening ports default to fixed numbers (the Ray Client server to 10001, the agents to 52365, ...):
# each node gets free ones, so that another cluster on the machine (a second test run) cannot take them. A raylet
# whose agent fails to bind exits, and takes its drivers, this test process included, with it.
_PORTS = (
    "--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
    "--metrics-export-port", "--runtime-env-agent-port",
)


def _node(temp: str, env: dict, cpus: int, *args: str) -> subprocess.Popen:
    flags = [*_PORTS, *(["--ray-client-server-port"] if "--head" in args and "--ray-client-server-port" not in args else [])]
    ports = [item for flag, port in zip(flags, free_ports(len(flags))) for item in (flag, str(port))]
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1",
        "--num-cpus", str(cpus),
        "--num-gpus", "0", "--object-store-memory", str(OBJECT_STORE), "--disable-usage-stats", *ports, *args,
    ]
    log = open(Path(temp) / f"node-{len(os.listdir(temp))}.log", "wb")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@contextmanager
def ray_nodes(temp: str, head_cpus: int, others: list[tuple[int, dict]], head_args: tuple[str, ...] = ()) -> Iterator[int]:
    """A head with ``head_cpus`` CPUs and one node per ``(cpus, extra env)`` in ``others``; yields the head's
    GCS port once every node is up. ``temp``: a short folder (Ray's socket paths must fit 107 characters)."""
    import ray

    env = ray_env(temp)
    port = free_port()
    head = ["--head", "--port", str(port), "--include-dashboard", "false", "--temp-dir", temp, *head_args]
    nodes = [_node(temp, env, head_cpus, *head)]
    try:
        wait(lambda: port_open(port), "the head's port")
        for cpus, extra in others:
            nodes.append(_node(temp, {**env, **extra}, cpus, "--address", f"127.0.0.1:{port}"))
        ray.init(address=f"127.0.0.1:{port}", _temp_dir=temp, logging_level="WARNING")
        try:
            wait(lambda: sum(n["Alive"] for n in ray.nodes()) == 1 + len(others), f"{1 + len(others)} nodes")
        except BaseException:
            ray.shutdown()
            raise
        yield port
    finally:
        for node in nodes:
            node.terminate()
        for node in nodes:
            try:
                node.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait(10)
