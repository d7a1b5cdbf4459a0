"""The real TensorBoard server, started on loopback, serves back the scalars a run wrote.

The test writes scalars with `tf.summary`, starts the `tensorboard` program of this
interpreter's environment on 127.0.0.1 with a free port, and reads the values back over
HTTP from the scalars plugin:

    GET /data/runs                                      -> ["<run>", ...]
    GET /data/plugin/scalars/tags                       -> {"<run>": {"<tag>": {...}}}
    GET /data/plugin/scalars/scalars?run=<run>&tag=<tag> -> [[wall_time, step, value], ...]

The server loads event files in the background, so each endpoint is polled until the
data appears, within one overall deadline. `read_scalars` is the reusable part: it
starts a server on a logdir, reads one tag of one run, and always stops the server.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow as tf

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 90.0
POLL_INTERVAL_S = 0.25
# Loopback requests go straight to the server, whatever http_proxy says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class TensorBoardError(RuntimeError):
    """The server did not start, or did not serve the expected data in time."""


class _PortTaken(TensorBoardError):
    """Another process bound the chosen port between `free_port` and the server's bind."""


def free_port() -> int:
    """A TCP port on the loopback interface that nothing is listening on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _tensorboard_command() -> list[str]:
    script = Path(sys.executable).parent / "tensorboard"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "tensorboard.main"]


@contextlib.contextmanager
def tensorboard_server(logdir: str) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """Starts TensorBoard on `logdir`; yields (base_url, process, stderr_path).

    The server is terminated (then killed, if it does not exit) when the block ends,
    whatever happens inside it.
    """
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="tb_server_") as tmp:
        stderr_path = Path(tmp) / "stderr.txt"
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        cmd = [
            *_tensorboard_command(),
            f"--logdir={logdir}",
            f"--host={HOST}",
            f"--port={port}",
            # The Rust data server is optional and may be missing; the Python loader is not.
            "--load_fast=false",
            "--reload_interval=1",
        ]
        with open(stderr_path, "wb") as stderr:
            proc = subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, stderr=stderr, stdin=subprocess.DEVNULL, env=env
            )
        try:
            yield f"http://{HOST}:{port}", proc, stderr_path
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)


def _server_log(proc: subprocess.Popen, stderr_path: Path) -> str:
    text = stderr_path.read_text(encoding="utf-8", errors="replace")
    return f"server exit code: {proc.poll()}; server stderr (last 4000 chars):\n{text[-4000:]}"


def _poll_json(url, proc, stderr_path, deadline, ready, data=None):
    """GETs (or POSTs `data`) `url` until `ready(json)` is true; returns that JSON."""
    last = "no response yet"
    while True:
        if proc.poll() is not None:
            log = _server_log(proc, stderr_path)
            error = _PortTaken if "already in use" in log else TensorBoardError
            raise error(f"TensorBoard exited before serving {url}.\n{log}")
        try:
            with _OPENER.open(url, data=data, timeout=10) as response:
                body = json.loads(response.read().decode("utf-8"))
            if ready(body):
                return body
            last = f"not ready: {str(body)[:500]}"
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() > deadline:
            raise TensorBoardError(
                f"{url} did not serve the expected data in time; last: {last}\n"
                f"{_server_log(proc, stderr_path)}"
            )
        time.sleep(POLL_INTERVAL_S)


def read_scalars(
    logdir: str,
    tag: str,
    run: str = ".",
    *,
    min_events: int = 1,
    timeout_s: float = STARTUP_TIMEOUT_S,
) -> list[tuple[int, float]]:
    """Starts TensorBoard on `logdir` and returns [(step, value), ...] of `tag` in `run`.

    `run` is the event directory relative to `logdir` ("." for events written into
    `logdir` itself). The scalars are polled until at least `min_events` are served,
    since the server may answer while it is still loading a file. Raises
    `TensorBoardError`, with the server's stderr, when the server does not start or the
    data does not appear within `timeout_s` seconds.
    """
    deadline = time.monotonic() + timeout_s
    for _ in range(2):
        try:
            return _read_scalars_once(logdir, tag, run, min_events, deadline)
        except _PortTaken:
            pass  # Lost the race for the port; pick another.
    return _read_scalars_once(logdir, tag, run, min_events, deadline)


def _read_scalars_once(logdir, tag, run, min_events, deadline):
    with tensorboard_server(logdir) as (base, proc, stderr_path):
        _poll_json(f"{base}/data/runs", proc, stderr_path, deadline, lambda b: run in b)
        _poll_json(
            f"{base}/data/plugin/scalars/tags",
            proc,
            stderr_path,
            deadline,
            lambda b: tag in b.get(run, {}),
        )
        query = urllib.parse.urlencode({"run": run, "tag": tag})
        events = _poll_json(
            f"{base}/data/plugin/scalars/scalars?{query}",
            proc,
            stderr_path,
            deadline,
            lambda b: isinstance(b, list) and len(b) >= min_events,
        )
    # Each event is [wall_time, step, value].
    return [(int(step), float(value)) for _, step, value in events]


def _write_scalars(logdir: str, tag: str, values: list[float]) -> None:
    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        for step, value in enumerate(values):
            tf.summary.scalar(tag, value, step=step)
    writer.flush()
    writer.close()


def test_server_serves_written_scalars(tmp_path):
    values = [2.5, 1.75, 1.125, 0.8, 0.3333333]
    _write_scalars(str(tmp_path), "pt_loss", values)

    events = read_scalars(str(tmp_path), "pt_loss", min_events=len(values))

    assert [step for step, _ in events] == list(range(len(values)))
    np.testing.assert_allclose(
        [value for _, value in events], np.asarray(values, np.float32), rtol=1e-6
    )


def test_server_serves_scalars_of_a_named_run(tmp_path):
    _write_scalars(str(tmp_path / "train"), "pt_loss", [4.0, 3.0, 2.0])
    _write_scalars(str(tmp_path / "eval"), "ft_val_loss", [1.5, 0.5])

    events = read_scalars(str(tmp_path), "ft_val_loss", run="eval", min_events=2)

    assert events == [(0, 1.5), (1, 0.5)]
