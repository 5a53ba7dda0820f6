"""State that stays bounded under load: Redis holds no key per answered query.

A worker answers 2,000 queries, each worded differently (so each has a query
pattern of its own), with the memory manager on. The deployment's Redis keys
are counted after the first 200 answers and after all 2,000: the same number,
because the hits' idempotence is one offset per partition and patterns stop at
``memory_max_patterns``. Every query's hits are counted exactly once.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from hybridrag.agents.kafka.client import AsyncClient
from hybridrag.agents.kafka.schemas import Query
from hybridrag.agents.retention.memory_manager import MemoryConfig, MemoryManager
from tests.conftest import run
from tests.reliability.test_faults import QUESTIONS, _publish, many_documents, record

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(600)]


def test_redis_keys_do_not_grow_with_the_queries_answered(make_settings, make_worker):
    """200 queries, then 1,800 more: the deployment's key count is the same after both, and
    the memory counted 2,000 queries."""
    settings = make_settings(query_batch_max=64, memory_max_patterns=100)
    worker = make_worker(settings)
    run(_publish(settings, many_documents(50)))
    worker.wait_ready(min_rows=50)
    memory = MemoryManager(MemoryConfig.from_settings(settings))

    def keys() -> int:
        return sum(1 for _ in memory.client.scan_iter(match=memory.ns + "*", count=1000))

    def counted(n: int, timeout_s: float = 60) -> int:
        deadline = time.monotonic() + timeout_s
        while memory.stats()["queries"] < n and time.monotonic() < deadline:
            time.sleep(0.2)
        return memory.stats()["queries"]

    async def ask(start: int, n: int) -> tuple[int, int]:
        async with AsyncClient(settings) as c:
            futs = [await c.submit(Query(query_id=f"b{i}", text=f"{QUESTIONS[i % len(QUESTIONS)]} item{i}"))
                    for i in range(start, start + n)]
            done, pending = await asyncio.wait(futs, timeout=300)
            return len(done), len(pending)

    try:
        t0 = time.monotonic()
        first = run(ask(0, 200))
        after_200 = (counted(200), keys())
        rest = run(ask(200, 1800))
        after_2000 = (counted(2000), keys())
        seconds = time.monotonic() - t0
        stats = memory.stats()
        record("bounded_redis_keys", {"queries": 2000, "keys_after_200": after_200[1], "keys_after_2000": after_2000[1],
                                      "patterns": stats["patterns"], "memory_queries_counted": stats["queries"],
                                      "seconds": round(seconds, 1)})
        assert first == (200, 0) and rest == (1800, 0)
        assert after_200[0] == 200 and after_2000[0] == 2000
        assert after_2000[1] == after_200[1]
        assert stats["patterns"] == 100
        assert not list(memory.client.scan_iter(match=memory.ns + "q:*"))
    finally:
        memory.clear()
        memory.close()
