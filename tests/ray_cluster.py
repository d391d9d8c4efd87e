"""A local two-node Ray cluster for tests: a head and a second node, each with its own raylet
process on 127.0.0.1, so that tasks really cross processes (and one can be killed)."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

RAY = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str, env: dict[str, str]) -> None:
    subprocess.run([RAY, *args], check=True, env=env, timeout=START_TIMEOUT_S,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@contextlib.contextmanager
def local_cluster(temp_dir: Path, cpus_per_node: int = 1) -> Iterator[str]:
    """Start a head and one worker node; yield the head's ``host:port``; stop both."""
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    temp_dir.mkdir(parents=True, exist_ok=True)
    try:
        _ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={cpus_per_node}",
             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}", env=env)
        _ray("start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus_per_node}",
             "--disable-usage-stats", env=env)
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, timeout=START_TIMEOUT_S, capture_output=True)
        shutil.rmtree(temp_dir, ignore_errors=True)
