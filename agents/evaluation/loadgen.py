"""Load generation and answer scoring against a running deployment, for the benchmarks.

``load_workload`` cuts a corpus and judged queries from the built BEIR sets (or
the shipped demo corpus); ``closed_loop`` keeps a number of queries in flight
and ``open_loop`` offers Poisson arrivals at a fixed rate, both through the
public client, as an application would; ``quality`` scores the cited sources.
``bench/pipeline.py``, ``bench/scaling.py`` and ``bench/peers.py`` share them.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
from typing import Awaitable, Callable

import orjson

from hybridrag.agents.evaluation.datasets import beir_dir
from hybridrag.agents.evaluation.harness import ndcg_at_k
from hybridrag.agents.kafka.client import AsyncClient
from hybridrag.agents.kafka.schemas import Document, Query
from hybridrag.agents.settings import RESOURCES
from hybridrag.agents.worker_process import health

def load_workload(n_docs: int, n_queries: int, seed: int = 0):
    """Passages and judged queries from the built BEIR sets, else the demo corpus."""
    beir = sorted(beir_dir().glob("*/corpus.jsonl"))
    docs, queries, qrels = [], [], {}
    for corpus in beir:
        name = corpus.parent.name
        for line in corpus.open("rb"):
            o = orjson.loads(line)
            docs.append(Document(doc_id=f"{name}:{o['_id']}", title=o.get("title") or "", text=o["text"] or o.get("title") or "-"))
        qfile = corpus.parent / "queries.jsonl"
        for line in qfile.open("rb"):
            o = orjson.loads(line)
            queries.append((f"{name}:{o['_id']}", o["text"]))
        for line in (corpus.parent / "qrels" / "test.tsv").read_text().splitlines()[1:]:
            qid, did, score = line.split("\t")[:3]
            if int(score) > 0:
                qrels.setdefault(f"{name}:{qid}", set()).add(f"{name}:{did}")
    if not docs:
        from hybridrag.agents.rag.ingest_files import iter_documents

        docs = list(iter_documents(RESOURCES / "demo" / "corpus.jsonl"))
        for line in (RESOURCES / "demo" / "questions.jsonl").read_text().splitlines():
            o = orjson.loads(line)
            queries.append((o["expected_doc_id"], o["question"]))
            qrels[o["expected_doc_id"]] = {o["expected_doc_id"]}
    rng = random.Random(seed)
    # judged documents first, so every judged query can find its answer in a subset
    judged = set().union(*qrels.values()) if qrels else set()
    docs.sort(key=lambda d: (d.doc_id not in judged, rng.random()))
    base = docs
    while len(docs) < n_docs:  # cycle with distinct ids if the corpus is smaller than asked
        k = len(docs) // len(base)
        docs = docs + [Document(doc_id=f"{d.doc_id}+{k}", title=d.title, text=d.text) for d in base[: n_docs - len(docs)]]
    docs = docs[:n_docs]
    present = {d.doc_id for d in docs}
    queries = [(qid, t) for qid, t in queries if qrels.get(qid, set()) & present]
    rng.shuffle(queries)
    return docs, queries[:n_queries], qrels


def cited_ndcg(doc_ids: list[str], relevant: set[str]) -> float:
    """nDCG@10 of an answer's sources; a document cited twice (two chunks) counts at its first place only."""
    seen: set[str] = set()
    ranked = ["" if d in seen or seen.add(d) else d for d in doc_ids]
    return ndcg_at_k(ranked, dict.fromkeys(relevant, 1))


def pct(xs, p):
    """The p-th percentile of ``xs`` (nearest rank); NaN when empty."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


async def closed_loop(settings, texts, concurrency: int, duration_s: float) -> dict:
    """Keep ``concurrency`` queries in flight for ``duration_s``; answers per second."""
    async with AsyncClient(settings) as c:
        # warm up: the first batches pay for lazy initialisation
        await c.ask_many(texts[:concurrency], timeout_s=300)
        done = 0
        t0 = time.perf_counter()
        deadline = t0 + duration_s
        i = 0

        async def one():
            nonlocal done, i
            while time.perf_counter() < deadline:
                q = Query(query_id=f"cl-{os.getpid()}-{i}-{random.random()}", text=texts[i % len(texts)])
                i += 1
                await asyncio.wait_for(await c.submit(q), 300)
                done += 1

        await asyncio.gather(*[one() for _ in range(concurrency)])
        return {"qps": done / (time.perf_counter() - t0), "answered": done, "concurrency": concurrency}


async def offered_load(send: Callable[[int], Awaitable[None]], rate: float, until: Callable[[], bool],
                       rng: random.Random) -> int:
    """Call ``send(i)`` at Poisson arrivals of ``rate`` per second until ``until()``; returns how many were sent.

    Arrival times are fixed in advance of the sends, so a slow ``send`` or a
    busy event loop delays queries without lowering the offered rate: the
    ones that fell behind go out at once.
    """
    i = 0
    next_t = time.perf_counter()
    while not until():
        await asyncio.sleep(max(0.0, next_t - time.perf_counter()))
        await send(i)
        i += 1
        next_t += rng.expovariate(rate)
    return i


async def open_loop(settings, texts, rate: float, duration_s: float, seed: int = 1) -> dict:
    """Poisson arrivals at ``rate``/s; latency from publish to answer received."""
    rng = random.Random(seed)
    latencies, stages = [], []
    async with AsyncClient(settings) as c:
        await c.ask_many(texts[:8], timeout_s=300)
        tasks = []
        t_end = time.perf_counter() + duration_s

        async def one(q):
            t = time.perf_counter()
            ans = await asyncio.wait_for(await c.submit(q), 300)
            latencies.append((time.perf_counter() - t) * 1e3)
            stages.append({**ans.timings_ms, "batch_size": float(ans.batch_size)})

        async def send(i: int) -> None:
            tasks.append(asyncio.create_task(one(Query(query_id=f"ol-{seed}-{i}-{random.random()}",
                                                       text=texts[i % len(texts)]))))

        i = await offered_load(send, rate, until=lambda: time.perf_counter() >= t_end, rng=rng)
        await asyncio.gather(*tasks)
    breakdown = {k: statistics.fmean(s.get(k, 0.0) for s in stages) for k in stages[0]} if stages else {}
    # where the slowest 1% spent their time; "transport" is the rest: Kafka both ways, decode, produce
    p99 = pct(latencies, 99)
    tail = [{**s, "latency": lat, "transport": lat - s.get("buffer_wait", 0.0) - s.get("compute", 0.0)}
            for lat, s in zip(latencies, stages) if lat >= p99]
    tail_breakdown = {k: statistics.fmean(t.get(k, 0.0) for t in tail) for k in tail[0]} if tail else {}
    return {"rate": rate, "sent": i, "p50_ms": pct(latencies, 50), "p95_ms": pct(latencies, 95),
            "p99_ms": p99, "mean_stage_ms": breakdown, "p99_tail_stage_ms": tail_breakdown,
            "mean_batch": statistics.fmean(s.get("batch_size", 1) for s in stages) if stages else 0}


async def quality(settings, queries, qrels) -> float:
    async with AsyncClient(settings) as c:
        answers = await c.ask_many([t for _, t in queries], timeout_s=600)
    return statistics.fmean(cited_ndcg([s.doc_id for s in a.sources], qrels[qid]) for (qid, _), a in zip(queries, answers))


async def publish(settings, docs) -> float:
    t0 = time.perf_counter()
    async with AsyncClient(settings) as c:
        await c.publish_documents(docs)
    return time.perf_counter() - t0


def health_rows(port: int) -> int:
    """Rows the worker on ``port`` has indexed; -1 while it does not answer ``/health``."""
    h = health(port)
    return (h.get("rows") or 0) if h else -1


# Where the benchmarks pin processes to act as separate machines: the broker and the
# load generator on the last CPU, the system under test on the others.
_ALL_CPUS = sorted(os.sched_getaffinity(0))
BENCH_CPUS = set(_ALL_CPUS[-1:])
WORKER_CPUS = set(_ALL_CPUS[:-1]) or BENCH_CPUS
