"""Past one process: workers share a Milvus server (``milvus-lite server``, Milvus's gRPC API)
through the same code that uses a Milvus Lite file, on Tansu and MiniLM."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hybridrag.agents.kafka.broker import free_port, wait_for_port
from hybridrag.agents.kafka.client import AsyncClient
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


def test_hubness_on_a_milvus_server_matches_the_exact_value(milvus_server):
    """The same store code against a server (no mirror, HNSW): the upsert's estimate and the
    refresh search the server for each row's neighbours, and the partial updates land."""
    import numpy as np

    from hybridrag.agents.rag.store import Row, VectorStore, mean_top_similarity

    rng = np.random.default_rng(3)
    x = rng.standard_normal((150, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s = VectorStore(milvus_server, "hub_srv", "v1", 16, hubness_k=5)
    assert s.mirror is None and s.has_hubness
    s.upsert([Row(f"d{i}#0", f"d{i}", 0, "t", x[i]) for i in range(150)])
    assert s.hubness_rows == 150
    ids = [f"d{i}#0" for i in range(0, 150, 10)]
    stored = {r["id"]: r["hubness"] for r in s.client.get(s.name, ids=ids, output_fields=["hubness"])}
    for i in range(0, 150, 10):
        exact = float(mean_top_similarity(x[i : i + 1], np.delete(x, i, axis=0), 5)[0])
        assert stored[f"d{i}#0"] == pytest.approx(exact, abs=1e-4)
    (hit,) = s.search(x[:1], 1)[0]
    assert hit.id == "d0#0" and hit.hubness == pytest.approx(stored["d0#0"], abs=1e-6) and hit.vector is None
    (hit,) = s.search(x[:1], 1, with_vectors=True)[0]  # what the query bank's density needs
    assert np.allclose(hit.vector, x[0], atol=1e-6)
    s.drop()
    s.close()
