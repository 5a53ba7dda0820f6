"""Soak: one worker at half its maximum rate for an hour, killed every 10 minutes, Redis restarted once.

    python bench/soak.py                  # 60 minutes
    python bench/soak.py --minutes 3 --kill-every 60 --warmup 60   # a short run

In one run, on the embedded Tansu broker, a Redis server the bench starts and
owns (its own port, append-only file), and a Milvus Lite file:

1. one ``hybridrag worker`` (MiniLM, memory manager on, synthesizer off;
   group session timeout 6 s, as the reliability tests use, so the group
   notices a killed worker quickly) indexes the demo corpus (300 passages);
2. its maximum rate is measured briefly in a closed loop (``--concurrency``
   queries in flight for ``--measure-s``, :func:`loadgen.closed_loop`);
3. queries then arrive at ``--load`` (50%) of that rate for ``--minutes``
   (Poisson arrivals, :func:`loadgen.offered_load`),
   drawn from a fixed pool of 600 wordings about the corpus, each with a
   unique ``query_id``. The worker gets a SIGKILL every ``--kill-every``
   seconds and is restarted at once; Redis is shut down and restarted once,
   midway between two kills;
4. every ``--sample-s`` seconds: the worker's RSS, Redis ``used_memory`` and
   key count, the embedded broker's RSS and CPU, the rows the worker holds,
   the queries sent and not yet answered, the group's committed-offset lag,
   answers and dead letters; ``MEMORY USAGE`` of every Redis key at the end of
   the warm-up and at the end, to say where Redis memory went.

Targets, after ``--warmup`` (and ``--settle`` seconds after each restart of
the worker or of Redis, whose memory starts over):

- worker RSS and Redis memory grow by less than 1% per 10 minutes (the slope
  of a regression within each process's or server's lifetime, pooled);
- within 60 s of each kill, the queries sent and not yet answered are back
  under one second's worth (and stay there for ``--hold-s``, 5 s: answers
  arrive a batch at a time, so one reading under the line is not enough);
- every query is answered, and each once after the client drops duplicates by
  ``query_id`` (the raw duplicates are reported);
- the memory manager's counts equal what the answers cited: one query and one
  access per distinct cited document for each answered query.

Writes bench/results/soak.json and bench/results/soak.png. Not part of CI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

import numpy as np
import orjson
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from hybridrag.agents.evaluation import loadgen
from hybridrag.agents.kafka.admin import create_topics
from hybridrag.agents.kafka.broker import EmbeddedBroker, free_port, wait_for_port
from hybridrag.agents.kafka.schemas import Answer, Query, decode, encode
from hybridrag.agents.rag.chunking import chunk_document
from hybridrag.agents.rag.ingest_files import iter_documents
from hybridrag.agents.retention.memory_manager import MemoryConfig, MemoryManager
from hybridrag.agents.settings import RESOURCES, Settings
from hybridrag.agents.worker_process import (health, process_figures, settings_env, start_worker, stop_worker,
                                             wait_healthy)


# ----------------------------------------------------------------------------- the parts the bench owns


class OwnedRedis:
    """A redis-server on its own port and directory, which the bench may restart (never the shared one)."""

    def __init__(self, directory: Path):
        self.port = free_port()
        self.dir = directory
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port("127.0.0.1", self.port)
        client = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                if client.ping():
                    break
            except redis.RedisError:  # loading the append-only file
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        """SHUTDOWN: Redis writes its append-only file out and exits."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            redis.Redis(port=self.port, socket_timeout=5).shutdown(nosave=False)
        except redis.ConnectionError:  # the reply is the closed connection
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> float:
        """Shut down and start again; returns the seconds Redis was unreachable."""
        t0 = time.monotonic()
        self.stop()
        self.start()
        return time.monotonic() - t0

    def info(self) -> dict:
        c = redis.Redis(port=self.port, socket_timeout=2)
        try:
            return {"used_memory": int(c.info("memory")["used_memory"]), "keys": int(c.dbsize())}
        except redis.RedisError:
            return {"used_memory": None, "keys": None}
        finally:
            c.close()

    def memory_breakdown(self) -> dict:
        """Where ``used_memory`` goes: ``MEMORY USAGE`` of every key, and the server's own overheads."""
        c = redis.Redis(port=self.port, socket_timeout=10)
        try:
            keys = [k.decode() for k in c.scan_iter(count=1000)]
            pipe = c.pipeline(transaction=False)
            for k in keys:
                pipe.memory_usage(k, samples=0)
            per_key = {k: int(v or 0) for k, v in zip(keys, pipe.execute())}
            m = c.info("memory")
            return {"keys": per_key, "server": {f: m.get(f) for f in (
                "used_memory", "used_memory_dataset", "used_memory_overhead", "used_memory_scripts",
                "used_memory_lua", "mem_clients_normal", "mem_aof_buffer", "mem_fragmentation_ratio")}}
        except redis.RedisError:
            return {}
        finally:
            c.close()


class Worker:
    def __init__(self, settings: Settings, log_path: Path):
        self.settings, self.log_path = settings, log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = start_worker(settings_env(self.settings), open(self.log_path, "ab"), cwd=REPO)

    def wait_ready(self, min_rows: int = 0, timeout_s: float = 300) -> dict:
        return wait_healthy(self.settings.web_port, self.proc, min_rows, timeout_s)

    def kill(self) -> None:
        stop_worker(self.proc, signal.SIGKILL)

    def rss_bytes(self) -> int | None:
        return process_figures(self.proc.pid)[0] if self.proc else None

    def rows(self) -> int | None:
        return health(self.settings.web_port).get("rows")


# ----------------------------------------------------------------------------- the client side


class Traffic:
    """Sends queries and reads every answer: what was sent, answered (first time), duplicated, dead-lettered."""

    def __init__(self, settings: Settings, texts: list[str]):
        self.settings, self.texts = settings, texts
        topo = settings.topology
        self.queries, self.answers, self.dlq = topo["queries"].name, topo["answers"].name, topo["queries"].dlq
        self.sent: dict[str, float] = {}
        # query id -> the doc ids its first answer cited: every answer on the topic, the closed loop's too,
        # since the memory manager counts them all
        self.answered: dict[str, list[str]] = {}
        self.answered_sent = 0  # of them, answers to the queries this object sent
        self.duplicates = 0
        self.waiters: dict[str, asyncio.Future] = {}
        self.n = 0

    async def start(self) -> None:
        bootstrap = self.settings.kafka_bootstrap_servers
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
        await self.producer.start()
        self.consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20)
        await self.consumer.start()
        tps = [TopicPartition(self.answers, p) for p in sorted(self.consumer.partitions_for_topic(self.answers) or [])]
        if not tps:
            await self.consumer._client.force_metadata_update()
            tps = [TopicPartition(self.answers, p) for p in sorted(self.consumer.partitions_for_topic(self.answers))]
        self.consumer.assign(tps)
        await self.consumer.seek_to_beginning(*tps)
        # the group's committed offsets and the topics' ends, for the lag and the dead letters
        self.admin = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=self.settings.app_id,
                                      enable_auto_commit=False)
        await self.admin.start()
        self.reader = asyncio.create_task(self._read())

    async def stop(self) -> None:
        self.reader.cancel()
        await self.producer.stop()
        await self.consumer.stop()
        await self.admin.stop()

    async def _read(self) -> None:
        async for msg in self.consumer:
            ans = decode(Answer, msg.value, max_bytes=16 * 1024 * 1024)
            if ans.query_id in self.answered:
                self.duplicates += 1
                continue
            self.answered[ans.query_id] = [s.doc_id for s in ans.sources]
            if ans.query_id not in self.sent:
                continue
            self.answered_sent += 1
            fut = self.waiters.pop(ans.query_id, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    async def send(self, prefix: str, wait: bool = False):
        qid = f"{prefix}-{self.n}"
        text = self.texts[self.n % len(self.texts)]
        self.n += 1
        if wait:
            self.waiters[qid] = asyncio.get_running_loop().create_future()
        self.sent[qid] = time.monotonic()
        await self.producer.send(self.queries, encode(Query(query_id=qid, text=text)), key=qid.encode())
        return self.waiters.get(qid)

    @property
    def outstanding(self) -> int:
        return len(self.sent) - self.answered_sent

    async def broker_figures(self) -> dict:
        """The group's committed-offset lag on ``queries`` and the records on ``queries.dlq``."""
        if not self.admin.partitions_for_topic(self.queries):
            await self.admin._client.force_metadata_update()
        parts = self.admin.partitions_for_topic(self.queries) or set()
        tps = [TopicPartition(self.queries, p) for p in parts]
        dlq = [TopicPartition(self.dlq, p) for p in (self.admin.partitions_for_topic(self.dlq) or {0})]
        ends = await self.admin.end_offsets(tps + dlq)
        lag = 0
        for tp in tps:
            lag += max(0, ends[tp] - ((await self.admin.committed(tp)) or 0))
        return {"committed_lag": lag, "dead_letters": sum(ends[tp] for tp in dlq)}


# ----------------------------------------------------------------------------- figures


def growth_pct_per_10min(t: np.ndarray, y: np.ndarray, segment: np.ndarray) -> tuple[float, list[dict]]:
    """Pooled within-segment least-squares slope of ``y`` over ``t`` (seconds), as % of the mean per 10 minutes.

    Each segment (one worker process, or one Redis server's lifetime) has its
    own level; only the trend inside segments counts, so a restart's drop is
    neither growth nor its absence.
    """
    num = den = 0.0
    per = []
    for s in np.unique(segment):
        m = segment == s
        if m.sum() < 3:
            continue
        tc, yc = t[m] - t[m].mean(), y[m] - y[m].mean()
        num += float((tc * yc).sum())
        den += float((tc * tc).sum())
        slope = float((tc * yc).sum() / (tc * tc).sum())
        per.append({"segment": int(s), "samples": int(m.sum()), "minutes": round(float(np.ptp(t[m])) / 60, 1),
                    "pct_per_10min": round(100 * slope * 600 / float(y[m].mean()), 3)})
    if den == 0:
        return float("nan"), per
    return 100 * (num / den) * 600 / float(y.mean()), per


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["samples"]
    t = np.array([x["t"] for x in s]) / 60
    series = [
        ("worker RSS (MiB)", [x["rss"] / 2**20 if x["rss"] else np.nan for x in s]),
        ("Redis used_memory (MiB)", [x["redis_used_memory"] / 2**20 if x["redis_used_memory"] else np.nan for x in s]),
        ("Redis keys", [x["redis_keys"] if x["redis_keys"] is not None else np.nan for x in s]),
        ("Milvus rows (worker)", [x["milvus_rows"] if x["milvus_rows"] is not None else np.nan for x in s]),
        ("broker RSS (MiB)", [x["broker_rss"] / 2**20 if x.get("broker_rss") else np.nan for x in s]),
        ("broker CPU (cores)", [x["broker_cpu"] if x.get("broker_cpu") is not None else np.nan for x in s]),
        ("lag: sent, not yet answered", [x["outstanding"] for x in s]),
        ("lag: committed offsets behind", [x["committed_lag"] for x in s]),
        ("answers (distinct, cumulative)", [x["answered"] for x in s]),
        ("dead letters (cumulative)", [x["dead_letters"] for x in s]),
    ]
    fig, axes = plt.subplots(len(series), 1, figsize=(9, 2.0 * len(series)), sharex=True)
    for ax, (name, ys) in zip(axes, series):
        ax.plot(t, ys, lw=1.2)
        ax.set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
        for k in result["kills"]:
            ax.axvline(k["t"] / 60, color="tab:red", lw=0.8, ls="--")
        if result.get("redis_restart"):
            ax.axvline(result["redis_restart"]["t"] / 60, color="tab:blue", lw=0.8, ls=":")
        ax.axvspan(0, result["args"]["warmup"] / 60, color="0.9", lw=0)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("minutes (grey: warm-up; red dashes: SIGKILL of the worker; blue dots: Redis restart)")
    fig.suptitle(f"soak: {result['minutes']:.1f} min at {result['rate_qps']:.1f} q/s "
                 f"(50% of the {result['max_qps']:.1f} q/s measured)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------- the run


def memory_growth(before: dict, after: dict, top: int = 8) -> dict:
    """Which keys and which server overheads grew between two :meth:`OwnedRedis.memory_breakdown` readings."""
    if not before or not after:
        return {}
    b, a = before["keys"], after["keys"]
    grown = sorted(((a.get(k, 0) - b.get(k, 0), k) for k in set(a) | set(b)), reverse=True)
    return {"keys_before": len(b), "keys_after": len(a),
            "keys_bytes_before": sum(b.values()), "keys_bytes_after": sum(a.values()),
            "top_growers": [{"key": k, "bytes": d} for d, k in grown[:top] if d > 0],
            "server_before": before["server"], "server_after": after["server"]}


async def soak(args, settings: Settings, worker: Worker, owned: OwnedRedis, texts: list[str],
               broker_pid: int | None) -> dict:
    traffic = Traffic(settings, texts)
    await traffic.start()
    print("[soak] measuring the closed-loop maximum ...", flush=True)
    max_qps = (await loadgen.closed_loop(settings, texts, args.concurrency, args.measure_s))["qps"]
    rate = args.load * max_qps
    print(f"[soak] maximum {max_qps:.1f} q/s; soaking at {rate:.1f} q/s for {args.minutes} min", flush=True)

    duration = args.minutes * 60
    kill_at = list(np.arange(args.kill_every, duration - 1, args.kill_every))
    k = int(0.5 * duration // args.kill_every)
    redis_at = (k + 0.5) * args.kill_every if (k + 0.5) * args.kill_every < duration else None
    samples: list[dict] = []
    kills: list[dict] = []
    redis_restart: dict = {}
    worker_segment = [0]
    redis_segment = [0]
    recoveries: list[asyncio.Task] = []
    restarted_at = [0.0]  # when the current worker process (and Redis) started, in soak time
    ready_at = [0.0]  # when the current worker process became ready (inf until it is)
    redis_started_at = [0.0]
    t0 = time.monotonic()
    started_at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    stop = asyncio.Event()

    async def generate():
        async def send(_: int) -> None:
            await traffic.send("soak")

        await loadgen.offered_load(send, rate, until=stop.is_set, rng=random.Random(25))

    broker_cpu = [time.monotonic(), process_figures(broker_pid)[1] if broker_pid else None]
    redis_keys_memory = {}

    async def sample():
        while not stop.is_set():
            b = await traffic.broker_figures()
            r = await asyncio.to_thread(owned.info)
            now = time.monotonic() - t0
            b_rss, b_cpu = process_figures(broker_pid) if broker_pid else (None, None)
            b_share = None
            if b_cpu is not None and broker_cpu[1] is not None:
                b_share = round((b_cpu - broker_cpu[1]) / (time.monotonic() - broker_cpu[0]), 3)
            broker_cpu[:] = [time.monotonic(), b_cpu]
            if "warm" not in redis_keys_memory and now >= args.warmup:
                redis_keys_memory["warm"] = await asyncio.to_thread(owned.memory_breakdown)
            samples.append({
                "broker_rss": b_rss, "broker_cpu": b_share,
                "t": round(now, 2), "rss": worker.rss_bytes(), "redis_used_memory": r["used_memory"],
                "redis_keys": r["keys"], "milvus_rows": await asyncio.to_thread(worker.rows),
                "outstanding": traffic.outstanding, "committed_lag": b["committed_lag"],
                "answered": traffic.answered_sent, "sent": len(traffic.sent), "duplicates": traffic.duplicates,
                "dead_letters": b["dead_letters"], "worker_segment": worker_segment[0],
                "worker_age": round(now - restarted_at[0], 2),
                "worker_ready_age": round(now - ready_at[0], 2) if ready_at[0] != float("inf") else -1.0,
                "redis_segment": redis_segment[0],
                "redis_age": round(now - redis_started_at[0], 2), "load_1m": os.getloadavg()[0],
            })
            await asyncio.sleep(args.sample_s)

    async def faults():
        events = sorted([(t, "kill") for t in kill_at] + ([(redis_at, "redis")] if redis_at else []))
        for at, what in events:
            await asyncio.sleep(max(0.0, at - (time.monotonic() - t0)))
            if stop.is_set():
                return
            if what == "redis":
                t = time.monotonic() - t0
                outage = await asyncio.to_thread(owned.restart)
                redis_segment[0] += 1
                redis_started_at[0] = time.monotonic() - t0
                redis_restart.update({"t": round(t, 2), "outage_s": round(outage, 2)})
                print(f"[soak] {t / 60:.1f} min: Redis restarted ({outage:.2f} s down)", flush=True)
                continue
            t = time.monotonic() - t0
            await asyncio.to_thread(worker.kill)
            ready_at[0] = float("inf")
            worker.start()
            worker_segment[0] += 1
            restarted_at[0] = time.monotonic() - t0
            # watched beside the schedule, so a slow recovery does not move the next fault
            recoveries.append(asyncio.create_task(recover(t)))

    async def recover(t: float):
        """Back under one second's worth of queries sent and not answered, after the new process is up."""
        peak = traffic.outstanding
        await asyncio.to_thread(worker.wait_ready)
        ready = time.monotonic() - t0 - t
        ready_at[0] = time.monotonic() - t0
        # answers arrive a batch at a time, so one reading under the line is not a recovery: it must hold
        under_since = None
        while time.monotonic() - t0 - t < 600:
            now = time.monotonic() - t0
            peak = max(peak, traffic.outstanding)
            if traffic.outstanding > rate:
                under_since = None
            elif under_since is None:
                under_since = now
            elif now - under_since >= args.hold_s:
                break
            await asyncio.sleep(0.25)
        recovered = (under_since if under_since is not None else time.monotonic() - t0) - t
        kills.append({"t": round(t, 2), "ready_s": round(ready, 2), "recovery_s": round(recovered, 2),
                      "peak_outstanding": peak})
        print(f"[soak] {t / 60:.1f} min: SIGKILL; ready in {ready:.1f} s, lag under {rate:.0f} queries "
              f"in {recovered:.1f} s (peak {peak})", flush=True)

    tasks = [asyncio.create_task(f()) for f in (generate, sample, faults)]
    await asyncio.sleep(duration)
    stop.set()
    soak_s = time.monotonic() - t0
    await asyncio.gather(*tasks)  # every fault is scheduled before the end
    await asyncio.gather(*recoveries)  # a kill's recovery still running finishes
    kills.sort(key=lambda k: k["t"])
    print(f"[soak] {soak_s / 60:.1f} min done; draining ...", flush=True)
    deadline = time.monotonic() + 300
    while traffic.outstanding and time.monotonic() < deadline:
        await asyncio.sleep(0.5)

    # the memory counts: what the worker's memory manager recorded against what the answers cited
    memory = MemoryManager(MemoryConfig.from_settings(settings))

    def cited() -> dict:
        return {"queries": len(traffic.answered),
                "queries_with_hits": sum(1 for d in traffic.answered.values() if d),
                "accesses": sum(len(set(d)) for d in traffic.answered.values())}

    deadline = time.monotonic() + 120
    while memory.stats()["queries"] < len(traffic.answered) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    await asyncio.sleep(3)  # anything counted twice would arrive now
    # both read at one moment: a worker still answering a backlog counts on between two reads
    expected, stats = cited(), memory.stats()
    redis_growth = memory_growth(redis_keys_memory.get("warm", {}), await asyncio.to_thread(owned.memory_breakdown))
    counted = {k: stats[k] for k in expected}
    memory.close()
    unanswered = traffic.outstanding
    await traffic.stop()

    t = np.array([s["t"] for s in samples])
    # from the process's readiness, not its start: loading the models takes from seconds to minutes
    keep_w = (t >= args.warmup) & (np.array([s["worker_ready_age"] for s in samples]) >= args.settle)
    keep_r = (t >= args.warmup) & (np.array([s["redis_age"] for s in samples]) >= args.settle)
    rss = np.array([s["rss"] or np.nan for s in samples], float)
    red = np.array([s["redis_used_memory"] or np.nan for s in samples], float)
    keep_w &= np.isfinite(rss)
    keep_r &= np.isfinite(red)
    rss_growth, rss_per = growth_pct_per_10min(t[keep_w], rss[keep_w],
                                               np.array([s["worker_segment"] for s in samples])[keep_w])
    red_growth, red_per = growth_pct_per_10min(t[keep_r], red[keep_r],
                                               np.array([s["redis_segment"] for s in samples])[keep_r])
    keys_after_warmup = [s["redis_keys"] for s in samples if s["t"] >= args.warmup and s["redis_keys"] is not None]
    checks = {
        "rss_growth_pct_per_10min": {"value": round(rss_growth, 3), "target": "< 1", "pass": bool(rss_growth < 1)},
        "redis_memory_growth_pct_per_10min": {"value": round(red_growth, 3), "target": "< 1",
                                              "pass": bool(red_growth < 1)},
        "recovery_s_after_each_kill": {"value": [k["recovery_s"] for k in kills], "target": "<= 60",
                                       "pass": all(k["recovery_s"] <= 60 for k in kills)},
        "unanswered": {"value": unanswered, "target": "0", "pass": unanswered == 0},
        # only comparable once the backlog is drained: a worker still answering keeps counting after the read
        "memory_counts": {"value": counted, "target": expected,
                          "pass": counted == expected if unanswered == 0 else None},
    }
    return {
        "args": vars(args), "cpu_count": os.cpu_count(), "started_at": started_at,
        "ended_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "minutes": round(soak_s / 60, 2), "max_qps": round(max_qps, 1), "rate_qps": round(rate, 1),
        "sent": len(traffic.sent), "answered": traffic.answered_sent, "answers_on_topic": len(traffic.answered),
        # answers the broker delivered again (a replay after a kill); the client keeps the first per query id
        "duplicates_dropped_by_dedup": traffic.duplicates,
        "redis_keys_after_warmup": {"min": min(keys_after_warmup, default=None),
                                    "max": max(keys_after_warmup, default=None)},
        "rss_mib": {"min": round(float(np.nanmin(rss)) / 2**20, 1), "max": round(float(np.nanmax(rss)) / 2**20, 1)},
        "redis_used_memory_mib": {"min": round(float(np.nanmin(red)) / 2**20, 2),
                                  "max": round(float(np.nanmax(red)) / 2**20, 2)},
        "growth_segments": {"rss": rss_per, "redis": red_per},
        # where Redis memory went between the end of the warm-up and the end (a restart in between resets it)
        "redis_memory_growth": redis_growth,
        "broker_rss_mib": {"min": _mib_min(samples, "broker_rss"), "max": _mib_max(samples, "broker_rss"),
                           "last": _mib_last(samples, "broker_rss")},
        "kills": kills, "redis_restart": redis_restart, "checks": checks,
        "passed": all(c["pass"] is not False for c in checks.values()) and unanswered == 0, "samples": samples,
    }


def _mib(xs: list) -> list[float]:
    return [x / 2**20 for x in xs if x]


def _mib_min(samples: list[dict], key: str) -> float | None:
    xs = _mib([s.get(key) for s in samples])
    return round(min(xs), 1) if xs else None


def _mib_max(samples: list[dict], key: str) -> float | None:
    xs = _mib([s.get(key) for s in samples])
    return round(max(xs), 1) if xs else None


def _mib_last(samples: list[dict], key: str) -> float | None:
    xs = _mib([s.get(key) for s in samples])
    return round(xs[-1], 1) if xs else None


def query_pool() -> list[str]:
    """600 wordings about the corpus: a bounded set of query patterns, as real traffic repeats itself."""
    titles = [d.title or d.doc_id for d in iter_documents(RESOURCES / "demo" / "corpus.jsonl")]
    return [f"What is {t}?" for t in titles] + [f"Explain {t} briefly" for t in titles]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=60.0, help="length of the soak, after the measurement")
    ap.add_argument("--load", type=float, default=0.5, help="share of the measured maximum rate")
    ap.add_argument("--kill-every", type=float, default=600.0, help="seconds between SIGKILLs of the worker")
    ap.add_argument("--sample-s", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--warmup", type=float, default=300.0, help="seconds left out of the growth figures")
    ap.add_argument("--settle", type=float, default=120.0,
                    help="seconds after the worker is ready again, or Redis is back, left out of the growth figures")
    ap.add_argument("--hold-s", type=float, default=5.0,
                    help="seconds the lag must stay under one second's worth for a kill to count as recovered")
    ap.add_argument("--measure-s", type=float, default=30.0, help="seconds of the closed-loop measurement")
    ap.add_argument("--concurrency", type=int, default=64, help="queries in flight in the closed loop")
    ap.add_argument("--bootstrap", default="", help="a Kafka to run against instead of the embedded Tansu broker")
    ap.add_argument("--out", default="soak", help="results name: bench/results/NAME.json and NAME.png")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hybridrag-soak-"))
    owned = OwnedRedis(work)
    owned.start()
    tag = str(int(time.time()))
    try:
        # the embedded broker keeps every record in memory (Tansu's memory:// storage): fine for minutes,
        # and the bottleneck within half an hour at this rate; --bootstrap points the soak at a real Kafka
        broker_cm = (contextlib.nullcontext(SimpleNamespace(bootstrap=args.bootstrap)) if args.bootstrap
                     else EmbeddedBroker(log_path=work / "broker.log"))
        if not args.bootstrap and args.minutes > 10:
            print("[soak] the embedded broker keeps every record batch and slows down as it holds more "
                  "(README, Reliability); for the hour-long targets pass --bootstrap host:9092", flush=True)
        with broker_cm as broker:
            settings = Settings(
                kafka_bootstrap_servers=broker.bootstrap, app_id=f"soak-{tag}", topic_prefix=f"soak{tag}-",
                milvus_uri=str(work / "milvus.db"), redis_url=owned.url, redis_prefix=f"soak-{tag}",
                web_port=free_port(), encoder="original", synth_sample_rate=0.0, memory_enabled=True,
                kafka_session_timeout_s=6.0, kafka_rebalance_timeout_s=4.0, kafka_heartbeat_interval_s=1.0,
                log_level="warning", data_dir=str(REPO / "data"))
            asyncio.run(create_topics(settings))
            docs = list(iter_documents(RESOURCES / "demo" / "corpus.jsonl"))
            n_chunks = sum(len(chunk_document(d.doc_id, d.text, d.title, settings.chunk_size, settings.chunk_overlap))
                           for d in docs)
            worker = Worker(settings, work / "worker.log")
            worker.start()

            async def publish():
                p = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
                await p.start()
                for d in docs:
                    await p.send(settings.topology["documents"].name, encode(d), key=d.doc_id.encode())
                await p.stop()

            asyncio.run(publish())
            worker.wait_ready(min_rows=n_chunks)
            result = asyncio.run(soak(args, settings, worker, owned, query_pool(),
                                      getattr(getattr(broker, "proc", None), "pid", None)))
            worker.kill()
    finally:
        owned.stop()
        print(f"[soak] logs in {work}", flush=True)
    (RESULTS / f"{args.out}.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    plot(result, RESULTS / f"{args.out}.png")
    print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "growth_segments")}, indent=1))


if __name__ == "__main__":
    main()
