"""Past one process: workers share a Milvus server (``milvus-lite server``, Milvus's gRPC API)
through the same code that uses a Milvus Lite file, on Tansu and MiniLM."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agents.broker import free_port, wait_for_port
from agents.client import AsyncClient
from tests.conftest import run
from tests.integration.test_end_to_end import demo_docs, demo_questions, publish

pytestmark = pytest.mark.integration


@pytest.fixture
def milvus_server(tmp_path):
    exe = Path(sys.executable).with_name("milvus-lite")
    if not exe.exists():
        pytest.skip("milvus-lite server is not installed")
    port = free_port()
    proc = subprocess.Popen([str(exe), "server", "--data-dir", str(tmp_path / "milvus-server"), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port("127.0.0.1", port, timeout_s=60)
    yield f"http://127.0.0.1:{port}"
    proc.kill()
    proc.wait()


def test_two_workers_share_a_milvus_server(make_settings, make_worker, milvus_server):
    """Two workers in one consumer group, one Milvus server. The corpus is ingested once
    across both; every question is answered with its expected passage, and once the group has
    settled both workers answer in the same round (the query partitions are split between them)."""
    first = make_settings(milvus_uri=milvus_server)
    second = first.model_copy(update={"web_port": free_port()})
    w1 = make_worker(first)
    w2 = make_worker(second)
    docs = demo_docs()
    run(publish(first, docs))
    w1.wait_ready(min_rows=len(docs))
    w2.wait_ready(min_rows=len(docs))
    qs = demo_questions() * 2

    async def ask():
        """Rounds of questions until both workers have answered (the group may still be rebalancing)."""
        out = []
        async with AsyncClient(first) as c:
            for _ in range(30):
                out.append(await c.ask_many([q["question"] for q in qs], timeout_s=120))
                if len({a.worker for a in out[-1]}) == 2:
                    break
        return out

    rounds = run(ask())
    for answers in rounds:
        assert len(answers) == len(qs)
        for q, a in zip(qs, answers):
            assert q["expected_doc_id"] in [s.doc_id for s in a.sources]
    assert len({a.worker for a in rounds[-1]}) == 2, [{a.worker for a in r} for r in rounds]
    assert w1.health()["collection"] == w2.health()["collection"]
