"""Catch-up after a SIGKILL: how fast a restarted worker drains a backlog, against a bare consumer on the same records.

    python bench/catchup.py --backlog 2000 --history 40000
    python bench/catchup.py --broker-only --backlog 2000 --history 24000   # the broker alone, no worker
    python bench/catchup.py --bounds-only     # does the broker apply retention.ms / DeleteRecords?

In one run, on the embedded Tansu broker, a Redis prefix of its own and a
Milvus Lite file:

1. one ``hybridrag worker`` (MiniLM, memory manager on, synthesizer off, the
   soak's group timeouts) indexes the demo corpus; its live maximum is
   measured in a closed loop (``--concurrency`` in flight);
2. **fresh log**: the worker gets a SIGKILL; ``--backlog`` queries are
   published while it is down, each in a record batch of its own (what a
   client at a moderate rate sends); a bare aiokafka consumer (no group,
   assigned the partitions, from the group's committed offsets) reads them:
   the broker's fetch rate; the worker is started again and drains them:
   seconds until ready, first and last answer, answers/s;
3. **long-run log** (``--history``): the same, after ``--history`` queries and
   as many answers (copies of a real one) were added to the topics, one
   record batch each, and the group's offsets moved past them: what the
   topics hold after ``history / rate`` seconds of a soak.

The broker's and the worker's RSS and CPU are sampled every second. Printed
ratios: the fresh drain over the live maximum (a restart should drain as
fast as the worker answers), and the long-run log's drain and bare fetch
rate over the fresh log's (does what the broker holds slow it down). Writes
bench/results/catchup.json (and catchup-bounds.json with ``--bounds-only``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor

from hybridrag.agents.evaluation import loadgen
from hybridrag.agents.kafka.admin import create_topics
from hybridrag.agents.kafka.broker import EmbeddedBroker, free_port
from hybridrag.agents.kafka.schemas import Answer, Query, decode, encode
from hybridrag.agents.rag.chunking import chunk_document
from hybridrag.agents.rag.ingest_files import iter_documents
from hybridrag.agents.retention.memory_manager import MemoryConfig, MemoryManager
from hybridrag.agents.settings import RESOURCES, Settings
from hybridrag.agents.worker_process import process_figures, settings_env, start_worker, stop_worker, wait_healthy


class Sampler:
    """Every second: RSS and CPU share of the broker and of the current worker process."""

    def __init__(self, broker_pid: int):
        self.broker_pid, self.worker = broker_pid, None
        self.samples: list[dict] = []
        self._last: dict[str, tuple[float, float]] = {}

    def _one(self, name: str, pid: int | None, now: float, row: dict) -> None:
        rss, cpu = process_figures(pid) if pid else (None, None)
        row[f"{name}_rss_mib"] = round(rss / 2**20, 1) if rss else None
        prev = self._last.get(f"{name}:{pid}")
        row[f"{name}_cpu"] = round((cpu - prev[1]) / (now - prev[0]), 2) if prev and cpu is not None else None
        if cpu is not None:
            self._last[f"{name}:{pid}"] = (now, cpu)

    async def run(self, t0: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            now = time.monotonic()
            row = {"t": round(now - t0, 2), "load_1m": os.getloadavg()[0]}
            self._one("broker", self.broker_pid, now, row)
            self._one("worker", self.worker.pid if self.worker else None, now, row)
            self.samples.append(row)
            await asyncio.sleep(1.0)


async def publish_one_per_batch(settings: Settings, topic: str, records: list[tuple[bytes, bytes]],
                                parallel: int = 32) -> None:
    """Publish ``(key, value)`` records each in a record batch of its own, as clients at a moderate rate do.

    A client that sends 81 queries/s with a 5 ms linger puts about one record in
    each batch; the broker then holds as many record batches as records.
    """
    producers = [AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all", linger_ms=0)
                 for _ in range(parallel)]
    for p in producers:
        await p.start()

    async def one(k: int, p: AIOKafkaProducer) -> None:
        for key, value in records[k::parallel]:
            await p.send_and_wait(topic, value, key=key)

    await asyncio.gather(*[one(k, p) for k, p in enumerate(producers)])
    for p in producers:
        await p.stop()


async def publish_backlog(settings: Settings, texts: list[str], n: int) -> list[str]:
    """``n`` queries, one record batch each; returns their ids."""
    ids = [f"backlog-{i}-{uuid.uuid4().hex[:6]}" for i in range(n)]
    await publish_one_per_batch(settings, settings.topology["queries"].name, [
        (qid.encode(), encode(Query(query_id=qid, text=texts[i % len(texts)]))) for i, qid in enumerate(ids)])
    return ids


async def bare_consumer_rate(settings: Settings, n: int, start: dict | None = None) -> dict:
    """Read ``n`` query records with a plain consumer from ``start`` (default: the group's committed offsets)."""
    topic = settings.topology["queries"].name
    group = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, group_id=settings.app_id,
                             enable_auto_commit=False)
    await group.start()
    tps = [TopicPartition(topic, p) for p in sorted(group.partitions_for_topic(topic) or range(4))]
    if start is None:
        start = {tp: (await group.committed(tp)) or 0 for tp in tps}
    await group.stop()
    c = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, enable_auto_commit=False,
                         fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms)
    await c.start()
    c.assign(tps)
    for tp in tps:
        c.seek(tp, start[tp])
    got, fetches = 0, 0
    t0 = time.perf_counter()
    while got < n and time.perf_counter() - t0 < 300:
        batch = await c.getmany(timeout_ms=1000)
        fetches += 1
        for records in batch.values():
            for r in records:
                decode(Query, r.value, max_bytes=settings.max_message_bytes)  # the decode the worker does too
            got += len(records)
    seconds = time.perf_counter() - t0
    await c.stop()
    return {"records": got, "seconds": round(seconds, 3), "records_per_s": round(got / seconds, 1),
            "getmany_calls": fetches}


async def drain(settings: Settings, ids: list[str], worker_start: float, timeout_s: float) -> dict:
    """Read ``answers`` until every id in ``ids`` is answered: first/last answer times and the drain rate."""
    want = set(ids)
    c = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, enable_auto_commit=False,
                         fetch_max_wait_ms=20)
    await c.start()
    topic = settings.topology["answers"].name
    tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or range(4))]
    c.assign(tps)
    await c.seek_to_end(*tps)
    first = last = None
    seen: set[str] = set()
    duplicates = 0
    times: list[float] = []
    while want - seen and time.monotonic() - worker_start < timeout_s:
        batch = await c.getmany(timeout_ms=500)
        now = time.monotonic()
        for records in batch.values():
            for r in records:
                qid = decode(Answer, r.value, max_bytes=16 * 2**20).query_id
                if qid not in want:
                    continue
                if qid in seen:
                    duplicates += 1
                    continue
                seen.add(qid)
                times.append(now - worker_start)
                first = first if first is not None else now - worker_start
                last = now - worker_start
    await c.stop()
    # the drain rate over the middle 90% of the backlog: the first and last batches' edges left out
    lo, hi = times[int(0.05 * len(times))] if times else 0, times[int(0.95 * len(times)) - 1] if times else 0
    rate = (0.9 * len(times)) / (hi - lo) if hi > lo else float("nan")
    return {"answered": len(seen), "unanswered": len(want - seen), "duplicates": duplicates,
            "first_answer_s": round(first, 2) if first is not None else None,
            "last_answer_s": round(last, 2) if last is not None else None, "answers_per_s": round(rate, 1)}


class FaustNamedAssignor(RoundRobinPartitionAssignor):
    name = "faust"


async def fill_history(settings: Settings, texts: list[str], n: int) -> float:
    """What a long run leaves on the topics: ``n`` queries the group has consumed and ``n`` answers; seconds taken.

    Published while the worker is down, one record batch each; the group's
    committed offsets are then moved to the end of ``queries``, so the worker
    does not answer them. The answers are copies of a real one (real size).
    """
    t0 = time.perf_counter()
    topo = settings.topology
    await publish_one_per_batch(settings, topo["queries"].name, [
        (f"history-{i}".encode(), encode(Query(query_id=f"history-{i}", text=texts[i % len(texts)])))
        for i in range(n)])
    probe = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, enable_auto_commit=False)
    await probe.start()
    tps = [TopicPartition(topo["answers"].name, p) for p in sorted(probe.partitions_for_topic(topo["answers"].name))]
    probe.assign(tps)
    await probe.seek_to_beginning(*tps)
    sample = next(r.value for rs in (await probe.getmany(timeout_ms=5000)).values() for r in rs)
    await probe.stop()
    await publish_one_per_batch(settings, topo["answers"].name, [(f"history-{i}".encode(), sample) for i in range(n)])
    # join the worker's group and commit the ends. A group takes one assignment protocol, and the killed
    # member registered Faust's, so this consumer offers a protocol of that name (it is the only live member
    # and the leader, so it only ever reads its own metadata)
    group = AIOKafkaConsumer(topo["queries"].name, bootstrap_servers=settings.kafka_bootstrap_servers,
                             group_id=settings.app_id, enable_auto_commit=False,
                             partition_assignment_strategy=(FaustNamedAssignor,),
                             session_timeout_ms=int(settings.kafka_session_timeout_s * 1000),
                             rebalance_timeout_ms=int(settings.kafka_rebalance_timeout_s * 1000),
                             heartbeat_interval_ms=int(settings.kafka_heartbeat_interval_s * 1000))
    await group.start()
    while not group.assignment():
        await group.getmany(timeout_ms=500)
    await group.commit(await group.end_offsets(list(group.assignment())))
    await group.stop()
    return time.perf_counter() - t0


async def restart_drain(settings: Settings, texts: list[str], backlog: int, log_path: Path, sampler: Sampler,
                        t0: float, prepare=None) -> dict:
    """Kill the worker, publish a backlog, time a bare consumer on it, restart the worker and time its drain."""
    stop_worker(sampler.worker, signal.SIGKILL)
    marks = {"killed_at": round(time.monotonic() - t0, 2)}
    prepared_s = await prepare() if prepare else 0.0
    ids = await publish_backlog(settings, texts, backlog)
    bare = await bare_consumer_rate(settings, backlog)
    print(f"[catchup] bare consumer: {bare['records_per_s']:.0f} records/s", flush=True)
    started = time.monotonic()
    marks["restarted_at"] = round(started - t0, 2)
    sampler.worker = start_worker(settings_env(settings), open(log_path, "ab"), cwd=REPO)
    draining = asyncio.create_task(drain(settings, ids, started, 900))
    await asyncio.to_thread(wait_healthy, settings.web_port, sampler.worker, 0, 900)
    ready_s = time.monotonic() - started
    res = await draining
    marks["drained_at"] = round(time.monotonic() - t0, 2)
    print(f"[catchup] worker drained {backlog} at {res['answers_per_s']} answers/s", flush=True)
    window = [s for s in sampler.samples if marks["restarted_at"] + ready_s <= s["t"] <= marks["drained_at"]]

    def mean(key):
        xs = [s[key] for s in window if s.get(key) is not None]
        return round(sum(xs) / len(xs), 2) if xs else None

    return {"prepare_s": round(prepared_s, 1), "bare_consumer": bare, "ready_s": round(ready_s, 2), "drain": res,
            "marks": marks, "worker_drain_over_bare_consumer": round(res["answers_per_s"] / bare["records_per_s"], 4),
            "while_draining": {"broker_cpu": mean("broker_cpu"), "worker_cpu": mean("worker_cpu"),
                               "broker_rss_mib": max((s["broker_rss_mib"] or 0 for s in window), default=None),
                               "load_1m": mean("load_1m")}}


async def measure(args, settings: Settings, broker, texts: list[str], log_path: Path) -> dict:
    t0 = time.monotonic()
    sampler = Sampler(broker.proc.pid)
    stop = asyncio.Event()
    sampling = asyncio.create_task(sampler.run(t0, stop))
    sampler.worker = start_worker(settings_env(settings), open(log_path, "ab"), cwd=REPO)
    docs = list(iter_documents(RESOURCES / "demo" / "corpus.jsonl"))
    await loadgen.publish(settings, docs)
    n_chunks = sum(len(chunk_document(d.doc_id, d.text, d.title, settings.chunk_size, settings.chunk_overlap))
                   for d in docs)
    await asyncio.to_thread(wait_healthy, settings.web_port, sampler.worker, n_chunks, 900)
    live = await loadgen.closed_loop(settings, texts, args.concurrency, args.measure_s)
    print(f"[catchup] live maximum {live['qps']:.1f} q/s", flush=True)
    fresh = await restart_drain(settings, texts, args.backlog, log_path, sampler, t0)
    long_run = None
    if args.history:
        long_run = await restart_drain(settings, texts, args.backlog, log_path, sampler, t0,
                                       prepare=lambda: fill_history(settings, texts, args.history))
    stop_worker(sampler.worker, signal.SIGKILL)
    stop.set()
    await sampling
    return {"live_max_qps": round(live["qps"], 1), "fresh_log": fresh, "long_run_log": long_run,
            "samples": sampler.samples}


async def broker_bounds(bootstrap: str) -> dict:
    """Can the broker bound what it holds? ``retention.ms`` of 2 s honoured after 15 s, and DeleteRecords."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic, RecordsToDelete

    topic = f"retention-check-{uuid.uuid4().hex[:6]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"retention.ms": "2000", "segment.ms": "1000"})])
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    for i in range(200):
        await producer.send_and_wait(topic, b"record %d" % i)
    await producer.stop()
    await asyncio.sleep(15)
    tp = TopicPartition(topic, 0)
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await c.start()
    c.assign([tp])
    c.seek(tp, 0)
    readable = sum(len(v) for v in (await c.getmany(timeout_ms=3000)).values())
    first = (await c.beginning_offsets([tp]))[tp]
    await c.stop()
    try:
        await admin.delete_records({tp: RecordsToDelete(100)}, timeout_ms=5000)
        delete = "accepted"
    except Exception as exc:  # Tansu 0.6.0 panics in the request handler and drops the connection
        delete = f"failed: {type(exc).__name__}: {exc}"
    await admin.close()
    return {"retention_ms": 2000, "waited_s": 15, "records": 200, "readable_from_offset_0": readable,
            "beginning_offset": first, "retention_applied": readable < 200 or first > 0,
            "delete_records_before_100": delete}


async def broker_only(settings: Settings, texts: list[str], backlog: int, history: int, broker_pid: int) -> dict:
    """The bare consumer alone on a backlog, on a fresh log and after ``history`` more records: no worker."""
    topic = settings.topology["queries"].name

    async def ends() -> dict:
        c = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
        await c.start()
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or range(4))]
        out = await c.end_offsets(tps)
        await c.stop()
        return out

    async def one() -> dict:
        start = await ends()
        await publish_backlog(settings, texts, backlog)
        cpu0 = process_figures(broker_pid)[1]
        res = await bare_consumer_rate(settings, backlog, start)
        res["broker_cpu_s_per_1000_records"] = round((process_figures(broker_pid)[1] - cpu0) / backlog * 1000, 3)
        res["broker_rss_mib"] = round(process_figures(broker_pid)[0] / 2**20, 1)
        return res

    fresh = await one()
    await publish_one_per_batch(settings, topic, [(f"h{i}".encode(), encode(Query(query_id=f"h{i}", text=texts[i % len(texts)])))
                                                  for i in range(history)])
    long_run = await one()
    return {"fresh_log": fresh, "long_run_log": long_run,
            "long_run_bare_over_fresh_bare": round(long_run["records_per_s"] / fresh["records_per_s"], 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backlog", type=int, default=10_000, help="queries published while the worker is down")
    ap.add_argument("--history", type=int, default=0, help="queries answered before the measurement")
    ap.add_argument("--concurrency", type=int, default=64, help="queries in flight for the live maximum")
    ap.add_argument("--measure-s", type=float, default=20.0, help="seconds of the live maximum's closed loop")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--out", default="catchup", help="results name: bench/results/NAME.json")
    ap.add_argument("--broker-only", action="store_true",
                    help="only the bare consumer on a fresh and a long-run log (no worker): the broker's share")
    ap.add_argument("--bounds-only", action="store_true",
                    help="only check whether the broker applies retention and DeleteRecords")
    args = ap.parse_args()
    if args.broker_only:
        tag = uuid.uuid4().hex[:8]
        texts = [f"What is {d.title or d.doc_id}?" for d in iter_documents(RESOURCES / "demo" / "corpus.jsonl")]
        with EmbeddedBroker() as broker:
            settings = Settings(kafka_bootstrap_servers=broker.bootstrap, app_id=f"catchup-{tag}",
                                topic_prefix=f"catchup{tag}-")
            asyncio.run(create_topics(settings))
            res = {"args": vars(args), "broker": "embedded Tansu (memory://)", "load_1m_before": os.getloadavg()[0],
                   "measured_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                   **asyncio.run(broker_only(settings, texts, args.backlog, args.history, broker.proc.pid)),
                   "load_1m_after": os.getloadavg()[0]}
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{args.out}-broker.json").write_bytes(orjson.dumps(res, option=orjson.OPT_INDENT_2))
        print(json.dumps(res, indent=1))
        return
    if args.bounds_only:
        with EmbeddedBroker() as broker:
            bounds = {"broker": "embedded Tansu (memory://)", "measured_at": time.strftime("%Y-%m-%d %H:%M:%S UTC"),
                      **asyncio.run(broker_bounds(broker.bootstrap))}
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{args.out}-bounds.json").write_bytes(orjson.dumps(bounds, option=orjson.OPT_INDENT_2))
        print(json.dumps(bounds, indent=1))
        return
    work = Path(tempfile.mkdtemp(prefix="hybridrag-catchup-"))
    tag = uuid.uuid4().hex[:8]
    texts = [f"What is {d.title or d.doc_id}?" for d in iter_documents(RESOURCES / "demo" / "corpus.jsonl")]
    with EmbeddedBroker(log_path=work / "broker.log") as broker:
        settings = Settings(
            kafka_bootstrap_servers=broker.bootstrap, app_id=f"catchup-{tag}", topic_prefix=f"catchup{tag}-",
            milvus_uri=str(work / "milvus.db"), redis_url=args.redis_url, redis_prefix=f"catchup-{tag}",
            web_port=free_port(), encoder="original", synth_sample_rate=0.0, memory_enabled=True,
            kafka_session_timeout_s=6.0, kafka_rebalance_timeout_s=4.0, kafka_heartbeat_interval_s=1.0,
            log_level="warning", data_dir=str(REPO / "data"))
        asyncio.run(create_topics(settings))
        result = asyncio.run(measure(args, settings, broker, texts, work / "worker.log"))
    memory = MemoryManager(MemoryConfig.from_settings(settings))
    memory.clear()
    memory.close()
    ratios = {"fresh_drain_over_live_max": round(result["fresh_log"]["drain"]["answers_per_s"]
                                                 / result["live_max_qps"], 3)}
    if result["long_run_log"]:
        f, g = result["fresh_log"], result["long_run_log"]
        ratios["long_run_drain_over_fresh_drain"] = round(g["drain"]["answers_per_s"] / f["drain"]["answers_per_s"], 3)
        ratios["long_run_bare_over_fresh_bare"] = round(g["bare_consumer"]["records_per_s"]
                                                        / f["bare_consumer"]["records_per_s"], 4)
    result = {
        "args": vars(args), "cpu_count": os.cpu_count(),
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        **result, "ratios": ratios, "worker_log": str(work / "worker.log"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))


if __name__ == "__main__":
    main()
