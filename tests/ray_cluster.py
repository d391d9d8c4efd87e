"""A local two-node Ray cluster for tests: a head and a second node, each with its own raylet
process on 127.0.0.1, so that tasks really cross processes (and one can be killed).

Each node is a ``ray start --block`` in its own process group, stopped by signalling that
group: ``ray stop`` would stop every Ray on the machine, other test sessions' included.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

RAY = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, node: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        if node.poll() is not None:
            raise RuntimeError(f"ray start exited with {node.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)  # polling a port that is coming up; the deadline decides failure
    raise TimeoutError(f"the Ray head did not listen on {port} within {START_TIMEOUT_S} s")


def _wait_for_nodes(address: str, count: int, deadline: float, env: dict[str, str]) -> None:
    while time.monotonic() < deadline:
        status = subprocess.run([RAY, "status", f"--address={address}"], env=env, capture_output=True, text=True)
        if status.stdout.count("node_") >= count:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{count} Ray nodes did not join within {START_TIMEOUT_S} s")


def _stop(node: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.pid, signal.SIGTERM)
    try:
        node.wait(timeout=5)  # ray start --block stops its node on SIGTERM, given a moment
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.pid, signal.SIGKILL)  # whatever of the group is left (raylet, workers)
    node.wait()


@contextlib.contextmanager
def local_cluster(temp_dir: Path, cpus_per_node: int = 1) -> Iterator[str]:
    """Start a head and one worker node; yield the head's ``host:port``; stop both."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    temp_dir.mkdir(parents=True, exist_ok=True)
    nodes: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        node = subprocess.Popen([RAY, "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus_per_node}",
                                 "--disable-usage-stats", *args], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        nodes.append(node)
        return node

    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        head = start("--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp_dir}")
        _wait_for_port(port, head, deadline)
        start(f"--address={address}")
        _wait_for_nodes(address, 2, deadline, env)
        yield address
    finally:
        for node in reversed(nodes):
            _stop(node)
        shutil.rmtree(temp_dir, ignore_errors=True)
