"""Horizontal scaling: 1, 2 and 4 worker processes sharing one Milvus server, in one run.

    python bench/scaling.py --docs 5000 --duration 20 --workers 1 2 4

Milvus Lite in a file belongs to one process, so several workers need a
Milvus server. This benchmark starts ``milvus-lite server`` (the same gRPC
API as a Milvus cluster; the workers use the server code path: no in-process
mirror, search over gRPC) and the embedded Tansu broker, indexes the corpus
once, then for each worker count runs N ``hybridrag worker`` processes in one
consumer group over the 4 query partitions and measures the closed-loop
maximum queries/s. Scaling efficiency is qps(N) / (N x qps(1)).

On a 2-core machine every extra process competes for the same cores, so the
efficiency printed here measures coordination overhead more than capacity;
the README discusses what to expect with a core (or a host) per worker.

Results go to bench/results/scaling.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]

import orjson

from hybridrag.agents.kafka.admin import create_topics
from hybridrag.agents.kafka.broker import EmbeddedBroker, free_port, wait_for_port
from hybridrag.agents.rag.chunking import chunk_document
from hybridrag.agents.settings import Settings
from hybridrag.agents.worker_process import start_worker
from hybridrag.agents.evaluation.loadgen import closed_loop, health_rows, load_workload, publish

RESULTS = REPO / "bench" / "results"


def start_milvus_server(data_dir: Path, port: int, log) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("milvus-lite")
    proc = subprocess.Popen([str(exe), "server", "--data-dir", str(data_dir), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    wait_for_port("127.0.0.1", port, timeout_s=60)
    return proc


def worker_env(s: Settings, web_port: int, threads: int) -> dict:
    return dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=s.kafka_bootstrap_servers, HYBRIDRAG_TOPIC_PREFIX=s.topic_prefix,
                HYBRIDRAG_APP_ID=s.app_id, HYBRIDRAG_MILVUS_URI=s.milvus_uri, HYBRIDRAG_WEB_PORT=str(web_port),
                HYBRIDRAG_ENCODER=s.encoder, HYBRIDRAG_KAFKA_SESSION_TIMEOUT_S="10",
                HYBRIDRAG_KAFKA_REBALANCE_TIMEOUT_S="5", HYBRIDRAG_LOG_LEVEL="warning",
                HYBRIDRAG_SYNTH_SAMPLE_RATE="0", HYBRIDRAG_MEMORY_ENABLED="false",
                HYBRIDRAG_TORCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads))


def wait_until(pred, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=5000)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--encoder", default="original")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per worker; 0: cores / workers, at least 1")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = REPO / "data" / "bench"
    data.mkdir(parents=True, exist_ok=True)
    tag = str(int(time.time()))
    docs, queries, _ = load_workload(args.docs, 300)
    texts = [t for _, t in queries] or [d.text[:200] for d in docs[:300]]
    log = open(RESULTS / "scaling.log", "wb")
    mport = free_port()
    milvus = start_milvus_server(data / f"milvus-server-{tag}", mport, log)
    result = {"args": vars(args), "cpu_count": os.cpu_count(), "runs": []}
    try:
        with EmbeddedBroker(log_path=data / "broker-scaling.log") as broker:
            s = Settings(kafka_bootstrap_servers=broker.bootstrap, topic_prefix=f"scale{tag}-", app_id=f"scale-{tag}",
                         milvus_uri=f"http://127.0.0.1:{mport}", encoder=args.encoder)
            asyncio.run(create_topics(s))
            n_chunks = sum(len(chunk_document(d.doc_id, d.text, d.title, s.chunk_size, s.chunk_overlap)) for d in docs)
            asyncio.run(publish(s, docs))
            for n in args.workers:
                threads = args.threads or max(1, (os.cpu_count() or 2) // n)
                ports = [free_port() for _ in range(n)]
                procs = [start_worker(worker_env(s, p, threads), log, cwd=REPO) for p in ports]
                try:
                    # every worker ready and the corpus indexed (the first run ingests it)
                    wait_until(lambda: all(health_rows(p) >= n_chunks for p in ports), 1800, "workers not ready")
                    time.sleep(12)  # the group settles: every worker holds its partitions
                    t0 = time.perf_counter()
                    closed = asyncio.run(closed_loop(s, texts, args.concurrency, args.duration))
                    run = {"workers": n, "torch_threads": threads, "qps": closed["qps"], "answered": closed["answered"],
                           "wall_s": time.perf_counter() - t0}
                    result["runs"].append(run)
                    print(f"[scaling] {n} worker(s) x {threads} thread(s): {closed['qps']:.1f} q/s", flush=True)
                finally:
                    for p in procs:
                        p.send_signal(signal.SIGTERM)
                    for p in procs:
                        try:
                            p.wait(30)
                        except subprocess.TimeoutExpired:
                            p.kill()
    finally:
        milvus.kill()
        milvus.wait()
    base = result["runs"][0]["qps"] if result["runs"] else 0
    for r in result["runs"]:
        r["speedup"] = r["qps"] / base if base else None
        r["efficiency"] = r["qps"] / (r["workers"] * base) if base else None
    (RESULTS / "scaling.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print("\n| workers | torch threads each | queries/s (closed loop) | speed-up | efficiency |\n|---|---|---|---|---|")
    for r in result["runs"]:
        print(f"| {r['workers']} | {r['torch_threads']} | {r['qps']:.1f} | {r['speedup']:.2f}x | {r['efficiency']:.0%} |")


if __name__ == "__main__":
    main()
