"""The memory manager counts every answered query once, however often the worker is killed.

A worker answers queries under load with the memory manager on and gets a
SIGKILL twice while answers are flowing, so each kill lands inside a
batch: answers already published whose hits are not recorded yet, or hits
recorded whose records are not committed yet. The new process is handed those
records again and answers them again (the duplicates on ``answers``). The
counts in Redis must equal what the distinct answers on the topic cited: one
query per distinct query id, one access per distinct cited document.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time

import pytest

from hybridrag.agents.kafka.client import AsyncClient
from hybridrag.agents.kafka.schemas import Answer, Query, decode
from hybridrag.agents.retention.memory_manager import MemoryConfig, MemoryManager
from tests.conftest import read_topic, run
from tests.reliability.test_faults import QUESTIONS, _publish, many_documents, record

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.timeout(1800)]

N_QUERIES = 400
KILLS = 2


def cited_counts(records) -> tuple[dict, int, int]:
    """What the answers on the topic cited, first answer per query id; the duplicates; the replays that differ."""
    first: dict[str, list[str]] = {}
    duplicates = differing = 0
    for r in records:
        ans = decode(Answer, r.value, max_bytes=16 * 2**20)
        docs = sorted({s.doc_id for s in ans.sources})
        if ans.query_id in first:
            duplicates += 1
            differing += first[ans.query_id] != docs
            continue
        first[ans.query_id] = docs
    return ({"queries": len(first), "queries_with_hits": sum(1 for d in first.values() if d),
             "accesses": sum(len(d) for d in first.values())}, duplicates, differing)


def test_counts_equal_answers_after_kills_mid_batch(make_settings, make_worker):
    """400 queries in flight, SIGKILL the worker twice while it answers; Redis counts each query once."""
    settings = make_settings(query_batch_max=16)
    worker = make_worker(settings, start=False)
    worker.start(wait=False)
    run(_publish(settings, many_documents(50)))
    worker.wait_ready(min_rows=50, timeout_s=600)  # a shared machine can take minutes to load the models
    memory = MemoryManager(MemoryConfig.from_settings(settings))
    rng = random.Random(25)
    kills: list[dict] = []

    async def load() -> tuple[int, int]:
        async with AsyncClient(settings) as c:
            futures = [await c.submit(Query(query_id=f"x{i}", text=QUESTIONS[i % len(QUESTIONS)]))
                       for i in range(N_QUERIES)]
            await c.producer.flush()
            for _ in range(KILLS):
                # mid-batch: the process is answering (an answer came since its start), then a short random wait
                before = sum(f.done() for f in futures)
                while sum(f.done() for f in futures) == before and not all(f.done() for f in futures):
                    await asyncio.sleep(0.02)
                await asyncio.sleep(rng.uniform(0.1, 1.5))
                kills.append({"answered_before": sum(f.done() for f in futures),
                              "counted_before": memory.stats()["queries"]})
                worker.stop(signal.SIGKILL)
                await asyncio.to_thread(worker.start, False)
            done, pending = await asyncio.wait(futures, timeout=900)
            return len(done), len(pending)

    try:
        done, pending = run(load())
        assert pending == 0 and done == N_QUERIES
        records = run(read_topic(settings, settings.topology["answers"].name, expect=N_QUERIES, timeout_s=120))
        expected, duplicates, differing = cited_counts(records)
        # the worker counts a batch's hits after publishing its answers: wait for the last batch's count
        deadline = time.monotonic() + 60
        while memory.stats()["queries"] < expected["queries"] and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)  # a hit counted twice would show up now
        stats = memory.stats()
        counted = {k: stats[k] for k in expected}
        record("exact_counts_after_kills", {
            "queries": N_QUERIES, "kills": kills, "answers_on_topic": len(records), "duplicates_on_topic": duplicates,
            "replays_citing_other_documents": differing, "expected": expected, "counted": counted,
            "offset_marks": memory.offset_marks(),
        })
        assert expected["queries"] == N_QUERIES
        assert differing == 0  # a replay retrieves what the first answer cited, so the expectation is well defined
        assert counted == expected
    finally:
        memory.clear()
        memory.close()
