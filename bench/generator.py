"""The OpenAI-compatible generator at concurrency 1 and 8, in one run.

    python bench/generator.py --questions 8 --rounds 3

Two endpoints, each driven by the generator's own batch path
(``OpenAIChatGenerator.agenerate``, the code a worker runs per micro-batch):

- **llama.cpp**: llama-cpp-python's OpenAI-compatible server with gemma-3-270m
  (Q4_K_M), the ``llm`` extra, on this machine's CPUs. gemma-3-270m is a base
  model, so it is asked through ``/completions`` with the passages, the
  question and "Answer:".
- **slow stub**: an in-process endpoint that answers every request after a
  fixed delay and counts how many requests it holds at once. It shows what
  the generator overlaps when the server can take requests in parallel (a
  vLLM server, a hosted API).

For each endpoint and concurrency: answers/s over the batch (wall clock from
the first request to the last answer) and the p50/p90 of one answer's latency
as the batch sees it (queueing included). The stub also reports the most
requests it held at once. Results go to bench/results/generator.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

from hybridrag.agents.rag.generator import OpenAIChatGenerator
from hybridrag.agents.rag.local_llm import LocalLLMServer, llm_extra_installed
from hybridrag.agents.rag.store import Hit
from hybridrag.agents.settings import RESOURCES

REPO = Path(__file__).resolve().parents[1]


def demo_batch(n: int) -> tuple[list[str], list[list[Hit]]]:
    """The first ``n`` demo questions, each with the passage that answers it and the next two of the corpus."""
    questions = [json.loads(line) for line in (RESOURCES / "demo" / "questions.jsonl").read_text().splitlines() if line]
    corpus = [json.loads(line) for line in (RESOURCES / "demo" / "corpus.jsonl").read_text().splitlines() if line]
    by_id = {d["_id"]: i for i, d in enumerate(corpus)}
    texts, contexts = [], []
    for q in (questions * (n // len(questions) + 1))[:n]:
        i = by_id[q["expected_doc_id"]]
        docs = [corpus[i], corpus[(i + 1) % len(corpus)], corpus[(i + 2) % len(corpus)]]
        contexts.append([Hit(id=f"{d['_id']}#0", doc_id=d["_id"], chunk=0, text=d["text"], score=0.8 - 0.1 * k)
                         for k, d in enumerate(docs)])
        texts.append(q["question"])
    return texts, contexts


async def one_batch(gen: OpenAIChatGenerator, texts, contexts) -> tuple[float, list[float], list]:
    """Wall time of the batch and each answer's latency from the batch's start."""
    t0 = time.perf_counter()
    latencies: list[float] = []

    async def timed(q, h):
        out = (await gen.agenerate([q], [h]))[0]  # the same semaphore and connection pool as one batch call
        latencies.append(time.perf_counter() - t0)
        return out

    outs = await asyncio.gather(*(timed(q, h) for q, h in zip(texts, contexts)))
    return time.perf_counter() - t0, latencies, outs


async def measure(make_gen, concurrency: int, texts, contexts, rounds: int) -> dict:
    gen = make_gen(concurrency)
    walls, lats, fallbacks, sample = [], [], 0, ""
    try:
        for _ in range(rounds):
            wall, lat, outs = await one_batch(gen, texts, contexts)
            walls.append(wall)
            lats += lat
            fallbacks += sum(1 for o in outs if o.generator)
            sample = sample or outs[0].text
    finally:
        await gen.aclose()
    lats.sort()
    return {
        "concurrency": concurrency, "answers": len(texts) * rounds, "rounds": rounds,
        "answers_per_s": round(len(texts) * rounds / sum(walls), 3),
        # the median batch: one batch slowed by another job on the machine does not move it
        "median_batch_answers_per_s": round(len(texts) / statistics.median(walls), 3),
        "batch_wall_s": [round(w, 3) for w in walls],
        "p50_ms": round(statistics.median(lats) * 1e3, 1),
        "p90_ms": round(lats[int(0.9 * (len(lats) - 1))] * 1e3, 1),
        "fallbacks": fallbacks, "sample_answer": sample[:200],
    }


class SlowEndpoint:
    """An OpenAI-compatible endpoint (HTTP/1.1 keep-alive, asyncio) that answers after ``delay_s`` and counts
    the requests it holds at once."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s
        self.in_flight = self.max_in_flight = 0
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    await asyncio.sleep(self.delay_s)
                finally:
                    self.in_flight -= 1
                body = json.dumps({"choices": [{"text": " A stub answer [1].",
                                                "message": {"content": "A stub answer [1]."}}]}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client closed its connection, or the stub is stopping
        finally:
            writer.close()


async def bench_stub(delay_s: float, concurrencies, texts, contexts, rounds: int) -> list[dict]:
    rows = []
    for c in concurrencies:
        stub = SlowEndpoint(delay_s)
        url = await stub.start()
        try:
            row = await measure(lambda k: OpenAIChatGenerator(url, "stub", api="completions", concurrency=k,
                                                              timeout_s=30), c, texts, contexts, rounds)
        finally:
            await stub.stop()
        rows.append({**row, "endpoint_max_in_flight": stub.max_in_flight})
    return rows


async def bench_llama(llm: LocalLLMServer, concurrencies, texts, contexts, rounds: int, max_tokens: int) -> list[dict]:
    warm = OpenAIChatGenerator(llm.base_url, llm.model, api="completions", max_tokens=max_tokens, timeout_s=300)
    await warm.agenerate(texts[:2], contexts[:2])  # the first requests load the weights into the page cache
    await warm.aclose()
    rows = []
    for c in concurrencies:
        rows.append(await measure(lambda k: OpenAIChatGenerator(llm.base_url, llm.model, api="completions",
                                                                concurrency=k, max_tokens=max_tokens, timeout_s=300),
                                  c, texts, contexts, rounds))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=8, help="Questions per batch.")
    ap.add_argument("--rounds", type=int, default=3, help="Batches per concurrency.")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-tokens", type=int, default=64, help="Longest answer gemma may write.")
    ap.add_argument("--stub-delay", type=float, default=0.5, help="Seconds the slow stub holds each request.")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "generator.json"))
    args = ap.parse_args()

    texts, contexts = demo_batch(args.questions)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "questions_per_batch": args.questions, "rounds": args.rounds, "max_tokens": args.max_tokens,
        "stub_delay_s": args.stub_delay, "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],  # other jobs share this machine
    }
    if llm_extra_installed():
        import llama_cpp

        with LocalLLMServer(log_path=REPO / "bench" / "results" / "generator-llama.log") as llm:
            result["llama_cpp"] = {"server": f"llama-cpp-python {llama_cpp.__version__}",
                                   "model": "gemma-3-270m Q4_K_M", "n_threads": llm.n_threads,
                                   "rows": asyncio.run(bench_llama(llm, args.concurrency, texts, contexts,
                                                                   args.rounds, args.max_tokens))}
    else:
        print("llm extra not installed: skipping the llama.cpp server (pip install 'hybridrag[llm]')")
    result["slow_stub"] = {"rows": asyncio.run(bench_stub(args.stub_delay, args.concurrency, texts, contexts,
                                                          args.rounds))}
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    for name in ("llama_cpp", "slow_stub"):
        for row in result.get(name, {}).get("rows", []):
            extra = f", endpoint held at most {row['endpoint_max_in_flight']}" if "endpoint_max_in_flight" in row else ""
            print(f"{name:10s} concurrency {row['concurrency']}: {row['answers_per_s']:.2f} answers/s, "
                  f"p50 {row['p50_ms']:.0f} ms, p90 {row['p90_ms']:.0f} ms{extra}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
