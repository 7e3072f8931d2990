"""Test helpers: start a real `swakv serve` process on loopback and read its /metrics.

    with ServerProcess.start(["--model", str(tiny_dir)]) as server:
        httpx.get(server.url + "/health")

(a pytest fixture: `with ServerProcess.start(ARGS) as proc: yield proc`.)

The process is always killed on exit (SIGKILL after a grace period), whatever the
test did. Only 127.0.0.1 is ever bound.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path) -> None:
        self.proc, self.port, self.log_path = proc, port, log_path
        self.url = f"http://{HOST}:{port}"

    @classmethod
    def start(cls, args: Sequence[str], timeout: float = 120.0, env: dict | None = None,
              command: Sequence[str] | None = None) -> ServerProcess:
        """Run `python -m swakv.cli serve ARGS --host 127.0.0.1 --port FREE`; wait for /health."""

        port = free_port()
        log = Path(tempfile.mkstemp(prefix="swakv-server-", suffix=".log")[1])
        cmd = list(command or [sys.executable, "-m", "swakv.cli", "serve"])
        cmd += [*args, "--host", HOST, "--port", str(port)]
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env)
        server = cls(proc, port, log)
        try:
            wait_healthy(server.url, proc, timeout, server.log)
        except TimeoutError:
            server.kill()
            raise
        return server

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except OSError:
            return ""

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful drain) and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        """Stop the server; its log file goes too unless an error is on its way out."""
        self.kill()
        if exc_type is None:
            self.log_path.unlink(missing_ok=True)


def openai_client(server: ServerProcess, api_key: str = "unused", timeout: float = 60.0):
    """An `openai.OpenAI` client for `server`'s /v1 API that never retries (tests see
    every failure as it happens)."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0,
                         timeout=timeout)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, log: Callable[[], str]) -> None:
    """Poll `url`/health until it answers 200; RuntimeError if `proc` exits first,
    TimeoutError after `timeout` seconds (both carry the tail of `log()`)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log()}")
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"server not healthy after {timeout}s:\n{log()}")


def scrape(url: str, headers: dict | None = None) -> dict[str, float]:
    """/metrics as {'name{label="v",...}': value}, parsed by prometheus_client's parser."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url.rstrip("/") + "/metrics", timeout=5.0, headers=headers).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def pool(metrics: dict[str, float], pool_name: str, state: str) -> float:
    return metrics[f'swakv_kv_pool_tokens{{pool="{pool_name}",state="{state}"}}']


class InProcessServer:
    """A real uvicorn server on 127.0.0.1 in a background thread of this process, for
    tests that need to reach into the engine (fault injection) while clients talk
    HTTP over loopback:

        with InProcessServer(app) as srv:
            httpx.get(srv.url + "/health")
    """

    def __init__(self, app, startup_timeout: float = 30.0) -> None:
        import threading

        import uvicorn

        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        config = uvicorn.Config(app, host=HOST, port=self.port, log_level="warning",
                                lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)  # off the main thread: no signal handlers
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("in-process server did not start")
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def __enter__(self) -> InProcessServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
