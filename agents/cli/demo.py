"""``make demo``: the whole service on embedded defaults, on a fresh machine.

1. Redis at REDIS_URL, or a local ``redis-server`` started for the demo.
2. Kafka at KAFKA_BOOTSTRAP_SERVERS, or an embedded Tansu broker on a free port.
3. A worker process (``hybridrag worker``) with a Milvus Lite file under ./data/.
4. The shipped corpus published to ``documents``; wait until it is searchable.
5. The shipped questions published to ``queries``; print each answer.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path

import orjson
import typer

from hybridrag.agents.kafka.broker import EmbeddedBroker, free_port, wait_for_port
from hybridrag.agents.settings import RESOURCES, Settings
from hybridrag.agents.worker_process import start_worker, stop_worker, wait_healthy
from hybridrag.models.paths import data_dir

DEMO_DIR = RESOURCES / "demo"


def ensure_redis(url: str) -> subprocess.Popen | None:
    """Return a redis-server we started, None if one was already up; exit with advice if neither."""
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
        return None
    except Exception:
        pass
    binary = shutil.which("redis-server")
    if binary is None:
        typer.secho(
            f"No Redis at {url} and no redis-server binary. Install one (apt-get install redis-server, "
            "brew install redis) or set REDIS_URL to a reachable Redis.", fg="red", err=True,
        )
        raise typer.Exit(2)
    from urllib.parse import urlparse

    port = urlparse(url).port or 6379
    typer.echo(f"starting redis-server on port {port}")
    proc = subprocess.Popen([binary, "--port", str(port), "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_port("127.0.0.1", port)
    return proc


def start_embedded_broker(base: Settings, data: Path) -> EmbeddedBroker:
    """The demo's Tansu, with a per-topic JSON Schema registry when broker-side validation is on."""
    registry = None
    if base.broker_schema_validation:
        from hybridrag.agents.kafka.contract import write_broker_schemas

        registry = data / "demo-broker-schemas"
        write_broker_schemas(registry, base.topology)
    return EmbeddedBroker(log_path=data / "demo-broker.log", schema_registry=registry).start()


def run_demo(questions: Path | None = None, corpus: Path | None = None) -> int:
    from hybridrag.agents.cli.output import print_answer
    from hybridrag.agents.kafka.client import AsyncClient
    from hybridrag.agents.rag.chunking import chunk_document
    from hybridrag.agents.rag.ingest_files import iter_documents

    corpus = corpus or DEMO_DIR / "corpus.jsonl"
    questions = questions or DEMO_DIR / "questions.jsonl"
    data = data_dir()
    data.mkdir(parents=True, exist_ok=True)
    base = Settings()
    redis_proc = ensure_redis(base.redis_url)
    broker = None
    bootstrap = base.kafka_bootstrap_servers
    if not bootstrap:
        broker = start_embedded_broker(base, data)
        bootstrap = broker.bootstrap
        typer.echo(f"embedded Tansu broker on {bootstrap}")
    web_port = free_port()
    if "HYBRIDRAG_MILVUS_URI" not in os.environ:
        # each demo indexes the corpus it was given, not what an earlier run left
        shutil.rmtree(data / "demo-milvus.db", ignore_errors=True)
        (data / "demo-milvus.db").unlink(missing_ok=True)
    env = dict(os.environ)
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=bootstrap,
        HYBRIDRAG_WEB_PORT=str(web_port),
        HYBRIDRAG_MILVUS_URI=os.environ.get("HYBRIDRAG_MILVUS_URI", str(data / "demo-milvus.db")),
        # a fresh group each run joins at once instead of waiting out the last run's session
        HYBRIDRAG_APP_ID=f"hybridrag-demo-{int(time.time())}",
        HYBRIDRAG_KAFKA_SESSION_TIMEOUT_S="10",
        HYBRIDRAG_KAFKA_REBALANCE_TIMEOUT_S="5",
        HYBRIDRAG_LOG_LEVEL=os.environ.get("HYBRIDRAG_LOG_LEVEL", "info"),
    )
    settings = Settings(kafka_bootstrap_servers=bootstrap)
    log = open(data / "demo-worker.log", "ab")
    typer.echo(f"starting the worker (log: {data / 'demo-worker.log'})")
    worker = start_worker(env, log)
    try:
        docs = list(iter_documents(corpus))
        n_chunks = sum(len(chunk_document(d.doc_id, d.text, d.title, settings.chunk_size, settings.chunk_overlap)) for d in docs)
        t0 = time.perf_counter()

        async def publish() -> int:
            async with AsyncClient(settings) as c:
                return await c.publish_documents(docs)

        # the worker creates the topics before it joins; wait for them
        wait_healthy(web_port, worker, 0, 180, poll_s=0.5)
        asyncio.run(publish())
        health = wait_healthy(web_port, worker, n_chunks, 300, poll_s=0.5)
        typer.echo(
            f"indexed {len(docs)} documents ({health['rows']} chunks) in {time.perf_counter() - t0:.1f}s "
            f"with encoder {health['encoder_version']}\n"
        )
        qs = [orjson.loads(line)["question"] for line in questions.read_text().splitlines() if line.strip()]

        async def ask_all():
            async with AsyncClient(settings) as c:
                for q in qs:
                    t = time.perf_counter()
                    ans = await c.ask(q, timeout_s=60)
                    print_answer(q, ans, time.perf_counter() - t)
                    typer.echo("")
                t = time.perf_counter()
                answers = await c.ask_many(qs, timeout_s=60)
                typer.echo(f"all {len(answers)} questions at once: {(time.perf_counter() - t) * 1e3:.0f} ms "
                           f"(batches of {sorted({a.batch_size for a in answers})})")

        asyncio.run(ask_all())
        return 0
    finally:
        stop_worker(worker)
        if broker:
            broker.stop()
        if redis_proc:
            redis_proc.terminate()
