"""Launching MultiWorkerMirroredStrategy workers as processes on 127.0.0.1, for tests."""

import json
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest


def free_ports(n: int) -> list[int]:
    """`n` TCP ports on 127.0.0.1 that were free a moment ago."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tf_configs(n: int) -> list[str]:
    """The TF_CONFIG of each of `n` workers of one cluster on 127.0.0.1 (worker 0: chief)."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(n)]}
    return [
        json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}) for i in range(n)
    ]


def run_workers(
    commands: Sequence[Sequence[str]],
    envs: Sequence[dict],
    *,
    cwd: Path,
    timeout: float,
    what: str,
) -> list[subprocess.CompletedProcess]:
    """Starts one process per command (all at once, the i-th with `envs[i]`) and waits
    for all; fails the test if any is still running after `timeout` seconds."""
    procs = [
        subprocess.Popen(
            list(cmd),
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cmd, env in zip(commands, envs, strict=True)
    ]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.communicate()
        pytest.fail(f"{what}: a worker did not finish within {timeout:.0f} s (a hung collective?).")
    return [
        subprocess.CompletedProcess(p.args, p.returncode, out, err)
        for p, (out, err) in zip(procs, outputs, strict=True)
    ]
