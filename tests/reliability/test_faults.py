"""Faults under load, on the real parts: SIGKILL, poison pills, rebalances.

Each test reports its figures to ``bench/results/reliability.json`` (the README
quotes them). Asserts are on outcomes: every query answered, every document
stored, every bad record dead-lettered. Timings are reported, never asserted.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from pathlib import Path

import orjson
import pytest

from hybridrag.agents.kafka.client import AsyncClient
from hybridrag.agents.rag.ingest_files import iter_documents
from hybridrag.agents.kafka.schemas import DeadLetter, Document, Query
from hybridrag.agents.settings import RESOURCES
from tests.conftest import read_topic, run

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(1800)]
DEMO = RESOURCES / "demo" / "corpus.jsonl"
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "reliability.json"


def record(name: str, figures: dict) -> None:
    """Merge one test's figures into the results file and print them."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = orjson.loads(RESULTS.read_bytes()) if RESULTS.exists() else {}
    data[name] = {**figures, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    RESULTS.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    print(f"\n{name}: {figures}")


def many_documents(n: int) -> list[Document]:
    """n distinct one-chunk documents from the shipped corpus's real sentences."""
    base = [d for d in iter_documents(DEMO)]
    docs = []
    for i in range(n):
        d = base[i % len(base)]
        words = d.text.split()[:60]
        docs.append(Document(doc_id=f"doc-{i}", text=" ".join(words) + f" (edition {i})", title=d.title))
    return docs


QUESTIONS = ["What does a compiler do?", "What is a cache?", "What is a deadlock?", "What is virtual memory?",
             "What does TCP provide?", "What is recursion?", "What is a hash table?", "What is a firewall?"]


def test_sigkill_under_load_loses_nothing(make_settings, make_worker):
    """2,000 queries and 2,000 documents in flight; SIGKILL the worker 5 times at random
    points and restart it each time. No query goes unanswered and no document is missing."""
    settings = make_settings(query_batch_max=32, ingest_batch_max=128)
    worker = make_worker(settings)
    docs = many_documents(2000)
    rng = random.Random(7)
    recoveries = []

    async def go():
        async with AsyncClient(settings) as c:
            doc_send = asyncio.create_task(c.publish_documents(docs))
            queries = [Query(query_id=f"k{i}", text=QUESTIONS[i % len(QUESTIONS)]) for i in range(2000)]
            futures = [await c.submit(q) for q in queries]
            await c.producer.flush()
            await doc_send
            for _ in range(5):
                await asyncio.sleep(rng.uniform(0.5, 4.0))
                worker.stop(signal.SIGKILL)
                before = sum(f.done() for f in futures)
                t0 = time.monotonic()
                await asyncio.to_thread(worker.start, False)
                # recovery: from the restart to the next answer the new process gives
                while sum(f.done() for f in futures) == before and not all(f.done() for f in futures):
                    await asyncio.sleep(0.05)
                recoveries.append(round(time.monotonic() - t0, 2))
            done, pending = await asyncio.wait(futures, timeout=900)
            return len(done), len(pending), c.duplicates

    done, pending, duplicates = run(go())
    health = worker.wait_ready(min_rows=len(docs), timeout_s=900)
    record("sigkill_under_load", {
        "queries": 2000, "documents": len(docs), "kills": 5, "lost_queries": pending,
        "documents_stored": health["rows"], "duplicates_delivered": duplicates, "recovery_s": recoveries,
    })
    assert pending == 0 and done == 2000
    assert health["rows"] == len(docs)


def test_poison_pills_are_isolated_and_throughput_holds(make_settings, make_worker):
    """200 bad records of 7 kinds mixed into 2,000 good queries: every bad one lands in the
    DLQ with its reason, every good one is answered; throughput is reported against a clean run."""
    settings = make_settings(query_batch_max=64, max_message_bytes=50_000)
    worker = make_worker(settings)
    run(_publish(settings, many_documents(100)))
    worker.wait_ready(min_rows=100)
    topic = settings.topology["queries"].name
    kinds = {
        "malformed JSON": lambda i: b'{"query_id": "p%d", "text": ' % i,
        "wrong schema": lambda i: orjson.dumps({"query_id": f"p{i}", "text": ["not", "a", "string"]}),
        "Field required": lambda i: orjson.dumps({"query_id": f"p{i}", "priority": 1}),
        "oversized record": lambda i: b'{"query_id": "p%d", "text": "' % i + b"y" * 60_000 + b'"}',
        "text is empty": lambda i: orjson.dumps({"query_id": f"p{i}", "text": ""}),
        "invalid UTF-8": lambda i: b'{"query_id": "p%d", "text": "\xc3\x28"}' % i,
        "unsupported schema_version": lambda i: orjson.dumps({"query_id": f"p{i}", "text": "x", "schema_version": 0}),
    }
    names = list(kinds)

    async def load(prefix: str, with_poison: bool):
        async with AsyncClient(settings) as c:
            t0 = time.monotonic()
            futures = []
            for i in range(2000):
                futures.append(await c.submit(Query(query_id=f"{prefix}{i}", text=QUESTIONS[i % len(QUESTIONS)])))
                if with_poison and i % 10 == 0:
                    await c.publish_raw(topic, kinds[names[(i // 10) % len(names)]](i), key=b"poison")
            done, pending = await asyncio.wait(futures, timeout=300)
            return len(done), len(pending), 2000 / (time.monotonic() - t0)

    clean_done, clean_pending, clean_qps = run(load("c", False))
    done, pending, mixed_qps = run(load("m", True))
    letters = [DeadLetter.model_validate(orjson.loads(r.value))
               for r in run(read_topic(settings, settings.topology["queries"].dlq, expect=200))]
    # the specific reasons first: "wrong schema" prefixes several of them
    order = ["oversized record", "invalid UTF-8", "malformed JSON", "Field required", "text is empty",
             "unsupported schema_version", "wrong schema"]
    reasons = {name: 0 for name in names}
    for dl in letters:
        reasons[next(n for n in order if n in dl.reason)] += 1
    record("poison_pills", {
        "good": 2000, "bad": 200, "answered": done, "dead_lettered": len(letters), "by_reason": reasons,
        "qps_clean": round(clean_qps, 1), "qps_with_poison": round(mixed_qps, 1),
        "throughput_ratio": round(mixed_qps / clean_qps, 3),
    })
    assert clean_pending == 0 and pending == 0 and done == 2000
    assert len(letters) == 200
    assert all(n > 0 for n in reasons.values()) and sum(reasons.values()) == 200


async def _publish(settings, docs):
    async with AsyncClient(settings) as c:
        await c.publish_documents(docs)


def test_scaling_one_to_two_workers_and_back_loses_nothing(make_settings, make_worker, tmp_path):
    """Queries flow while a second worker joins the group and leaves it again.
    Every query is answered; the longest pause in answers measures the rebalances.

    Milvus Lite is one process's file, so each worker here has its own (empty)
    store and answers say "no confident context"; with a Milvus server the
    workers share one collection. What is tested is the group, not retrieval."""
    settings = make_settings(query_batch_max=16)
    second = settings.model_copy(update={"milvus_uri": str(tmp_path / "second.db"), "web_port": settings.web_port + 1})
    w1 = make_worker(settings)
    w2 = make_worker(second, start=False)
    arrivals: list[tuple[float, str]] = []

    async def go():
        async with AsyncClient(settings) as c:
            futures = []

            async def produce():
                for i in range(2000):
                    fut = await c.submit(Query(query_id=f"r{i}", text=QUESTIONS[i % len(QUESTIONS)]))
                    fut.add_done_callback(lambda f: arrivals.append((time.monotonic(), f.result().worker)))
                    futures.append(fut)
                    await asyncio.sleep(0.01)  # ~100 queries/s for 20 s

            producer = asyncio.create_task(produce())
            await asyncio.sleep(3)
            t_join = time.monotonic()
            await asyncio.to_thread(w2.start)
            await asyncio.sleep(4)
            t_leave = time.monotonic()
            await asyncio.to_thread(w2.stop, signal.SIGTERM)
            await producer
            done, pending = await asyncio.wait(futures, timeout=300)
            return len(done), len(pending), c.duplicates, t_join, t_leave

    done, pending, dups, t_join, t_leave = run(go())
    workers = {w for _, w in arrivals}
    times = sorted(t for t, _ in arrivals)
    gaps = [(b - a, a) for a, b in zip(times, times[1:])]
    pause_join = max((g for g, a in gaps if a >= t_join - 1), default=0.0)
    record("rebalance_1_2_1", {"queries": 2000, "lost": pending, "duplicates_delivered": dups,
                               "workers_that_answered": len(workers),
                               "longest_pause_in_answers_s": round(max(g for g, _ in gaps), 2),
                               "longest_pause_after_join_s": round(pause_join, 2)})
    assert pending == 0 and done == 2000


async def _members(settings) -> list[str]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        (resp,) = await admin.describe_consumer_groups([settings.app_id])
        return sorted(m[0] for g in resp.groups for m in g[5])
    finally:
        await admin.close()


def test_a_batch_longer_than_the_poll_interval_keeps_the_worker_in_its_group(make_settings, make_worker):
    """An ingest batch that computes for several times max.poll.interval does not make the worker
    leave its group, because the model runs off the event loop; queries keep being answered meanwhile."""
    settings = make_settings(kafka_max_poll_interval_s=3.0, ingest_batch_max=32, chunk_size=100, chunk_overlap=0)
    worker = make_worker(settings)
    base = many_documents(128)
    # 32 documents of ~20 chunks each: one batch of ~650 chunks, many times the 3 s poll interval to encode
    big = [Document(doc_id=f"big-{i}", text=" ".join(d.text for d in base[i * 4 : i * 4 + 4]) * 12) for i in range(32)]
    members_before = run(_members(settings))
    from hybridrag.agents.rag.chunking import chunk_document

    n_chunks = sum(len(chunk_document(d.doc_id, d.text, d.title, 100, 0)) for d in big)

    async def go():
        async with AsyncClient(settings) as c:
            t0 = time.monotonic()
            await c.publish_documents(big)
            answered_during = 0
            while worker.health().get("rows", 0) < n_chunks and time.monotonic() - t0 < 600:
                await c.ask("What is a cache?", timeout_s=120)
                answered_during += 1
            return answered_during, time.monotonic() - t0

    answered, batch_s = run(go())
    members_after = run(_members(settings))
    record("slow_batch", {"batch_seconds": round(batch_s, 1), "max_poll_interval_s": 3.0,
                          "queries_answered_during_batch": answered,
                          "group_members_before": len(members_before), "same_member_after": members_before == members_after})
    assert batch_s > 2 * 3.0, "the batch was not slow enough to test anything"
    assert members_before and members_before == members_after
    assert answered > 0


def test_redis_outage_degrades_answers_nothing_and_loses_no_memory_update(make_settings, make_worker, tmp_path):
    """Redis (a private one, with an append-only file) is killed mid-run and started again.
    Queries keep being answered throughout; the memory updates of the outage are buffered,
    replayed once Redis is back, and counted exactly once."""
    import shutil
    import subprocess

    from hybridrag.agents.kafka.broker import free_port, wait_for_port
    from hybridrag.agents.retention.memory_manager import MemoryConfig, MemoryManager

    port = free_port()
    redis_cmd = [shutil.which("redis-server"), "--port", str(port), "--dir", str(tmp_path), "--appendonly", "yes",
                 "--appendfsync", "always", "--save", ""]
    redis_proc = subprocess.Popen(redis_cmd, stdout=subprocess.DEVNULL)
    wait_for_port("127.0.0.1", port)
    settings = make_settings(redis_url=f"redis://127.0.0.1:{port}/0")
    worker = make_worker(settings)
    run(_publish(settings, many_documents(30)))
    worker.wait_ready(min_rows=30)

    async def ask(prefix, n):
        async with AsyncClient(settings) as c:
            futs = [await c.submit(Query(query_id=f"{prefix}{i}", text=QUESTIONS[i % len(QUESTIONS)])) for i in range(n)]
            done, pending = await asyncio.wait(futs, timeout=120)
            return len(done), len(pending)

    try:
        before = run(ask("up", 30))
        redis_proc.kill()
        redis_proc.wait()
        during = run(ask("down", 30))
        redis_proc = subprocess.Popen(redis_cmd, stdout=subprocess.DEVNULL)
        wait_for_port("127.0.0.1", port)
        after = run(ask("back", 30))
        memory = MemoryManager(MemoryConfig.from_settings(settings))
        # the memory lane runs after each answer is produced: let it catch up, then settle
        deadline = time.monotonic() + 60
        while memory.stats()["queries"] < 90 and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(3)
        stats = memory.stats()
        record("redis_outage", {"answered_before": before[0], "answered_during_outage": during[0],
                                "answered_after": after[0], "memory_queries_counted": stats["queries"],
                                "expected": 90})
        assert before == (30, 0) and during == (30, 0) and after == (30, 0)
        assert stats["queries"] == 90  # the outage's updates replayed, none counted twice
    finally:
        redis_proc.kill()
