"""How a batch of queries is cut for the encoder, in one process, the strategies interleaved round by round.

    python bench/encode_batching.py                 # MiniLM FP32 and the hybrid runtime (BF16)
    python bench/encode_batching.py --rounds 5

The same judged queries of bench/peers.py's workload, in micro-batches of 64 as the
worker takes them under load, encoded four ways:

- ``one at a time``: one model call per query, as Quix Streams' per-message job does;
- ``batch of 64``: one sentence-transformers call over the batch (hybridrag before
  length buckets, and Pathway's batched UDF): every query padded to the longest;
- ``length buckets``: hybridrag's encoder now, ``hybridrag.models.batching.length_buckets``;
- the hybrid runtime (MiniLM's six layers in BF16) with its own buckets, for the BF16 row.

CPU time (``time.process_time``) and wall time per query; the strategies run in turn
inside every round, so a load that changes during the run touches each alike. Also the
share of padding in each strategy's model inputs. Results: bench/results/encode_batching.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import orjson
import torch

from hybridrag.agents.evaluation.loadgen import load_workload
from hybridrag.models.batching import length_buckets
from hybridrag.models.encoders import load_encoder

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def padding_share(lengths: list[int], batches: list[list[int]]) -> float:
    """Padded tokens over all tokens the model computes, for ``batches`` of indices into ``lengths``."""
    real = sum(lengths)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - real / padded if padded else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=3, help="micro-batches of 64 queries per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _, queries, _ = load_workload(300, 64 * args.batches + 100)
    texts = [t for _, t in queries][: 64 * args.batches]
    batches = [texts[i : i + 64] for i in range(0, len(texts), 64)]
    minilm = load_encoder("original")
    hybrid = load_encoder("hybrid")
    st = minilm.model

    def st_encode(ts: list[str], bs: int):
        return st.encode(ts, batch_size=bs, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)

    strategies = {
        "MiniLM FP32, one at a time": lambda b: [st_encode([t], 1) for t in b],
        "MiniLM FP32, batch of 64": lambda b: st_encode(b, 64),
        "MiniLM FP32, length buckets (hybridrag)": lambda b: minilm.encode(b),
        "hybrid BF16, length buckets (hybridrag)": lambda b: hybrid.encode(b),
    }
    lengths = [[len(st.tokenizer(t)["input_ids"]) for t in b] for b in batches]
    padding = {
        "MiniLM FP32, one at a time": 0.0,
        "MiniLM FP32, batch of 64": statistics.fmean(padding_share(ls, [list(range(len(ls)))]) for ls in lengths),
        "MiniLM FP32, length buckets (hybridrag)": statistics.fmean(
            padding_share(ls, length_buckets([len(t) for t in b], 64)) for ls, b in zip(lengths, batches)),
        "hybrid BF16, length buckets (hybridrag)": statistics.fmean(
            padding_share(ls, length_buckets(ls, 64)) for ls in lengths),
    }
    for f in strategies.values():  # first calls pay for lazy initialisation
        f(batches[0][:8])
    cpu = {k: [] for k in strategies}
    wall = {k: [] for k in strategies}
    for r in range(args.rounds):
        for name, f in strategies.items():
            for b in batches:
                c0, w0 = time.process_time(), time.perf_counter()
                f(b)
                cpu[name].append((time.process_time() - c0) / len(b) * 1e3)
                wall[name].append((time.perf_counter() - w0) / len(b) * 1e3)
        print(f"round {r + 1}/{args.rounds}", flush=True)
    base = "MiniLM FP32, one at a time"
    out = {"args": vars(args), "queries": len(texts), "mean_tokens": float(np.mean([x for ls in lengths for x in ls])),
           "load_average": os.getloadavg(), "strategies": {}}
    for name in strategies:
        c, w = statistics.median(cpu[name]), statistics.median(wall[name])
        out["strategies"][name] = {"cpu_ms_per_query": c, "wall_ms_per_query": w, "padding_share": padding[name],
                                   "speedup_cpu_vs_one_at_a_time": statistics.median(cpu[base]) / c}
    print(f"\n{len(texts)} queries ({out['mean_tokens']:.1f} tokens on average), {args.rounds} rounds, "
          f"{args.threads} thread(s), load average {out['load_average'][0]:.1f}\n")
    print("| strategy | CPU ms/query | wall ms/query | padding | × one at a time (CPU) |")
    print("|---|---|---|---|---|")
    for name, r in out["strategies"].items():
        print(f"| {name} | {r['cpu_ms_per_query']:.1f} | {r['wall_ms_per_query']:.1f} | {r['padding_share']:.0%} "
              f"| {r['speedup_cpu_vs_one_at_a_time']:.2f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "encode_batching.json").write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
