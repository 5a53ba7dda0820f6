"""Hybrid retrieval end to end: Tansu over TCP, a worker, Milvus Lite, MiniLM."""

from __future__ import annotations

import itertools
import json
import urllib.request

import numpy as np
import pytest

from hybridrag.agents.kafka.client import AsyncClient
from hybridrag.agents.kafka.schemas import Document
from hybridrag.agents.rag.chunking import embed_text
from hybridrag.agents.settings import RESOURCES
from tests.conftest import run

pytestmark = pytest.mark.integration

MEANINGS = ["the tape library lost its barcode map", "the disk array is rebuilding a mirror",
            "a fan in the power supply has stopped", "the licence server cannot be reached",
            "the backup window closed before the copy finished", "a controller battery needs replacing",
            "the cooling loop pressure is low", "the clock drifted more than a second",
            "a firmware image failed its checksum", "the spool directory is full",
            "a login was refused three times", "the replication link is saturated"]


def status_documents() -> list[Document]:
    """Twelve passages alike but for a status code whose digits they share: names an encoder blurs."""
    codes = sorted({"E" + "".join(p) for p in itertools.permutations("4471")})
    return [Document(doc_id=f"status-{c.lower()}", title=f"Status {c}",
                     text=f"Status {c} means that {m}; the operator should check the console log before "
                          f"restarting the unit.")
            for c, m in zip(codes, MEANINGS)]


def health(settings) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}/health") as r:
        return json.loads(r.read())


@pytest.mark.timeout(1800)  # 312 passages through MiniLM and a weight choice, on a loaded 2-core machine
def test_a_rare_name_that_dense_search_misses_is_found_and_cited(make_settings, make_worker):
    """Ingest the demo corpus and twelve look-alike status passages; ask what each status code means with one
    source. Exact cosine over the same rows (the dense-only service) puts another passage first for some
    codes; HYBRIDRAG_RETRIEVER=hybrid with a fixed BM25 weight of 0.5 (reported by /health and the metric)
    cites some of those it missed, and is right for at least as many codes as dense search."""
    from hybridrag.models.encoders import OriginalEncoder

    # a fixed weight: the label-free choice picks 0.00 (dense alone) for this corpus, see bench/README.md
    settings = make_settings(retriever="hybrid", retriever_fusion_weight=0.5)
    worker = make_worker(settings, start=False).start(wait=False)
    worker.wait_ready(timeout_s=600)  # a loaded machine starts a worker slowly
    demo = [json.loads(line) for line in (RESOURCES / "demo" / "corpus.jsonl").read_text().splitlines() if line]
    docs = [Document(doc_id=d["_id"], title=d["title"], text=d["text"]) for d in demo] + status_documents()

    async def publish():
        async with AsyncClient(settings) as c:
            await c.publish_documents(docs)

    run(publish())
    worker.wait_ready(min_rows=len(docs), timeout_s=600)  # a loaded machine: MiniLM encodes ~5 passages/s
    fusion = health(settings)["retrieval"]["fusion"]
    assert fusion["weight"] == 0.5 and not fusion["chosen"]
    status = status_documents()
    questions = [f"What does {d.title.lower()} mean?" for d in status]

    async def ask():
        async with AsyncClient(settings) as c:
            return await c.ask_many(questions, timeout_s=120, top_k=1)

    answers = run(ask())
    assert all(a.confident and len(a.sources) == 1 and "[1]" in a.answer for a in answers)
    hybrid_first = [a.sources[0].doc_id for a in answers]
    # what dense search alone ranks first over the same rows (exact cosine: Milvus Lite's FLAT index)
    enc = OriginalEncoder(device="cpu")
    vecs = enc.encode([embed_text(d.title, d.text) for d in docs])
    dense_first = [docs[int(np.argmax(vecs @ q))].doc_id for q in enc.encode(questions)]
    missed = [d.doc_id for d, first in zip(status, dense_first) if first != d.doc_id]
    assert missed, "dense search alone found every code: the test shows nothing"
    found = [d.doc_id for d, first in zip(status, hybrid_first) if first == d.doc_id]
    # hybrid cites passages dense search misses, and is right more often than dense
    assert set(missed) & set(found), (missed, found)
    assert len(found) >= len(status) - len(missed), (found, missed)
    assert health(settings)["retrieval"]["retriever"] == "HybridRetriever"
    with urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}/metrics") as r:
        assert f"hybridrag_fusion_weight {float(fusion['weight'])}" in r.read().decode()
