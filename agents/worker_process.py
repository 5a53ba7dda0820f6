"""Start a worker process and wait until its ``/health`` says it is ready.

The demo, the benchmarks and the tests start workers the same way: ``hybridrag
worker`` in a child process configured by environment variables, polled on its
web port until the runtime is built (and, if asked, enough chunks are indexed).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from typing import IO, Callable

import orjson

WORKER_COMMAND = [sys.executable, "-m", "hybridrag.agents.cli.main", "worker"]


def settings_env(settings) -> dict:
    """This environment plus every field of ``settings`` as its ``HYBRIDRAG_*`` variable: a worker configured alike."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", KAFKA_BOOTSTRAP_SERVERS=settings.kafka_bootstrap_servers,
               REDIS_URL=settings.redis_url)
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        env[f"HYBRIDRAG_{name.upper()}"] = str(value.get_secret_value() if hasattr(value, "get_secret_value") else value)
    return env


def health(port: int, host: str = "127.0.0.1") -> dict:
    """The worker's ``/health`` body, or ``{}`` while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2) as r:
            return orjson.loads(r.read())
    except Exception:
        return {}


def start_worker(env: dict, log: IO[bytes], **popen_kw) -> subprocess.Popen:
    """``hybridrag worker`` in a child process, its output appended to ``log``."""
    return subprocess.Popen(WORKER_COMMAND, env=env, stdout=log, stderr=subprocess.STDOUT, **popen_kw)


def wait_healthy(port: int, proc: subprocess.Popen, min_rows: int = 0, timeout_s: float = 120,
                 poll_s: float = 0.3, explain: Callable[[], str] = lambda: "") -> dict:
    """Poll ``/health`` until the worker is ready with at least ``min_rows`` chunks; raise if it exits or times out.

    ``explain`` adds context (a log's tail, say) to the error.
    """
    deadline = time.monotonic() + timeout_s
    last: dict = {}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}:\n{explain()}")
        last = health(port)
        if last.get("status") == "ok" and (last.get("rows") or 0) >= min_rows:
            return last
        time.sleep(poll_s)
    raise TimeoutError(f"worker not ready with {min_rows} rows in {timeout_s:.0f}s; last {last}\n{explain()}")


def stop_worker(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int | None:
    """Signal the worker and wait for it; kill it if it outlives ``timeout_s``."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(sig)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def process_figures(pid: int) -> tuple[int | None, float | None]:
    """(resident bytes, CPU seconds used so far) of a process, from /proc; (None, None) once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return rss, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (FileNotFoundError, ProcessLookupError, StopIteration):
        return None, None
