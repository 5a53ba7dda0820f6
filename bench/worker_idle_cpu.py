"""The CPU an idle worker burns per second, at each batch window: the cost paid per second, not per query.

    python bench/worker_idle_cpu.py --windows 0.005 0.02 0.05

A worker (MiniLM, one torch thread, no documents, no queries) on the embedded broker, with
``query_batch_timeout_s`` and ``ingest_batch_timeout_s`` both set to each window in turn: after
it is healthy and 5 s have passed, its CPU seconds over ``--seconds``. Every take loop wakes once
a window and the consumer fetches every ``kafka_fetch_max_wait_ms``, so this is what a query pays
on top of its own work at low rates: (CPU per second) / (answers per second).
Results: bench/results/worker_idle_cpu.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import orjson

from hybridrag.agents.kafka.admin import create_topics
from hybridrag.agents.kafka.broker import EmbeddedBroker, free_port
from hybridrag.agents.settings import Settings
from hybridrag.agents.worker_process import start_worker, stop_worker, wait_healthy

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(broker: EmbeddedBroker, run_dir: Path, window: float, seconds: float) -> float:
    """CPU milliseconds per second of an idle worker whose two batch windows are ``window`` seconds."""
    s = Settings(kafka_bootstrap_servers=broker.bootstrap, topic_prefix=f"idle{uuid.uuid4().hex[:8]}-")
    asyncio.run(create_topics(s))
    port = free_port()
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap, HYBRIDRAG_TOPIC_PREFIX=s.topic_prefix,
               HYBRIDRAG_APP_ID=f"{s.topic_prefix}app", HYBRIDRAG_REDIS_PREFIX=f"{s.topic_prefix}redis",
               HYBRIDRAG_MILVUS_URI=str(run_dir / f"{s.topic_prefix}.db"), HYBRIDRAG_WEB_PORT=str(port),
               HYBRIDRAG_ENCODER="original", HYBRIDRAG_TORCH_THREADS="1", HYBRIDRAG_LOG_LEVEL="warning",
               HYBRIDRAG_SYNTH_SAMPLE_RATE="0", HYBRIDRAG_QUERY_BATCH_TIMEOUT_S=str(window),
               HYBRIDRAG_INGEST_BATCH_TIMEOUT_S=str(window))
    proc = start_worker(env, open(run_dir / "worker.log", "ab"))
    try:
        wait_healthy(port, proc, 0, 300)
        time.sleep(5)
        c0, t0 = cpu_seconds(proc.pid), time.perf_counter()
        time.sleep(seconds)
        return (cpu_seconds(proc.pid) - c0) / (time.perf_counter() - t0) * 1e3
    finally:
        stop_worker(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=float, nargs="+", default=[0.005, 0.02, 0.05])
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="idle-cpu-"))
    out = {"args": vars(args), "load_average_start": os.getloadavg(), "cpu_ms_per_s": {}}
    with EmbeddedBroker(log_path=run_dir / "broker.log") as broker:
        for w in args.windows:
            out["cpu_ms_per_s"][str(w)] = idle_cpu(broker, run_dir, w, args.seconds)
            print(f"windows {w * 1e3:g} ms: an idle worker uses {out['cpu_ms_per_s'][str(w)]:.0f} ms of CPU a second",
                  flush=True)
    out["load_average_end"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "worker_idle_cpu.json").write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
