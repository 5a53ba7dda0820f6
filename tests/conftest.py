"""Shared fixtures: a real Tansu broker per session, real Redis, worker processes.

Every test gets a fresh app id (consumer group) and uuid topic names, so tests
never see each other's records; group timeouts are short so joins are quick.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hybridrag.agents.kafka.broker import EmbeddedBroker, free_port
from hybridrag.agents.worker_process import health as worker_health
from hybridrag.agents.worker_process import start_worker, stop_worker, wait_healthy

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    log = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with EmbeddedBroker(log_path=log) as b:
        yield b


@pytest.fixture(scope="session")
def redis_url():
    import redis

    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except Exception as e:  # the suite needs the real thing; .ci/run starts it
        pytest.fail(f"Redis is not reachable at {url}: {e}. Start it: redis-server --daemonize yes --port 6379")
    return url


@pytest.fixture
def make_settings(broker, tmp_path, redis_url):
    """Settings for one isolated deployment: its own group, topics, Milvus file and Redis prefix."""
    from hybridrag.agents.settings import Settings

    def factory(**overrides):
        tag = uuid.uuid4().hex[:10]
        values = dict(
            kafka_bootstrap_servers=broker.bootstrap,
            app_id=f"test-{tag}",
            topic_prefix=f"t{tag}-",
            milvus_uri=str(tmp_path / f"milvus-{tag}.db"),
            redis_url=redis_url,
            redis_prefix=f"test-{tag}",
            web_port=free_port(),
            kafka_session_timeout_s=6.0,
            kafka_rebalance_timeout_s=4.0,
            kafka_heartbeat_interval_s=1.0,
            kafka_commit_interval_s=0.5,
            encoder="original",
            synth_sample_rate=0.0,  # the diffusion models only where a test asks for them
            log_level="info",
        )
        values.update(overrides)
        return Settings(**values)

    return factory


def settings_env(settings) -> dict:
    """The environment a worker process needs to load ``settings``."""
    env = dict(os.environ)
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"HYBRIDRAG_{name.upper()}"] = str(value)
    env["KAFKA_BOOTSTRAP_SERVERS"] = settings.kafka_bootstrap_servers
    env["REDIS_URL"] = settings.redis_url
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class WorkerProcess:
    settings: object
    log_path: Path
    proc: subprocess.Popen | None = None
    starts: list = field(default_factory=list)

    def start(self, wait: bool = True) -> "WorkerProcess":
        log = open(self.log_path, "ab")
        self.proc = start_worker(settings_env(self.settings), log, cwd=REPO)
        self.starts.append(time.monotonic())
        if wait:
            self.wait_ready()
        return self

    def health(self) -> dict:
        return worker_health(self.settings.web_port)

    def wait_ready(self, min_rows: int = 0, timeout_s: float = 120) -> dict:
        assert self.proc is not None
        return wait_healthy(self.settings.web_port, self.proc, min_rows, timeout_s, explain=self.log_tail)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int | None:
        if self.proc is None:
            return None
        return stop_worker(self.proc, sig, timeout_s)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""


@pytest.fixture
def make_worker(tmp_path):
    workers: list[WorkerProcess] = []

    def factory(settings, start: bool = True) -> WorkerProcess:
        w = WorkerProcess(settings, tmp_path / f"worker-{len(workers)}.log")
        workers.append(w)
        if start:
            w.start()
        return w

    yield factory
    for w in workers:
        w.stop(signal.SIGKILL if w.proc and w.proc.poll() is None else signal.SIGTERM, timeout_s=10)


async def read_topic(settings, topic: str, expect: int, timeout_s: float = 60) -> list:
    """Every record of ``topic`` from the beginning, once ``expect`` have arrived (or the timeout)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.kafka_bootstrap_servers,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    out = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(out) < expect and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                out.extend(records)
    finally:
        await consumer.stop()
    return out


def run(coro):
    return asyncio.run(coro)
