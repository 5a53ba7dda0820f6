"""Encoder throughput and memory: the original encoder against the hybrid in FP32 and INT8.

One run, same texts for every model, 2 CPU threads:

- texts/s on short queries and on 256-token passages. The three models take
  turns for ``--rounds`` rounds and each keeps its best round, so a burst of
  load from another process on a shared machine hits all of them alike;
- parameters, weight bytes, and peak RSS while encoding the passages, each
  model in a fresh subprocess so that one model's memory does not count
  against another.

Texts come from the offline training corpora (``hybridrag.models.corpora``): queries are
the query side of training pairs, passages are consecutive corpus texts joined
until they reach 256 tokens.

Run: ``python bench/encoder.py`` -> bench/results/encoder.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODELS = ("original", "hybrid-fp32", "hybrid-int8")
PASSAGE_TOKENS = 256


def token_counter():
    """The encoders' WordPiece tokenizer without the padding and truncation to 128 its tokenizer.json sets."""
    from tokenizers import Tokenizer

    from hybridrag.models.hybrid_encoder import tokenizer_path

    tok = Tokenizer.from_file(str(tokenizer_path()))
    tok.no_padding()
    tok.no_truncation()
    return tok


def build_texts(n_queries: int, n_passages: int) -> tuple[list[str], list[str]]:
    from hybridrag.models import corpora

    queries = [q for q, _ in corpora.training_pairs(limit=4 * n_queries, seed=99) if len(q) < 80][:n_queries]
    tok = token_counter()
    passages, current, n_tok = [], [], 0
    for text in corpora.training_texts(limit=60 * n_passages, seed=99):
        current.append(text)
        n_tok += len(tok.encode(text, add_special_tokens=False).ids)
        if n_tok >= PASSAGE_TOKENS:
            passages.append(" ".join(current))
            current, n_tok = [], 0
            if len(passages) == n_passages:
                break
    return queries, passages


def load_model(name: str, checkpoint: str | None):
    if name == "original":
        from hybridrag.models.encoders import OriginalEncoder

        return OriginalEncoder()
    from hybridrag.models.hybrid_encoder import HybridEncoderRuntime

    return HybridEncoderRuntime.load(checkpoint, quantize=name.endswith("int8"))


def model_stats(name: str, enc) -> dict:
    from hybridrag.models.quantization import weight_bytes

    if name == "original":
        module = enc.model
        params = sum(p.numel() for p in module.parameters())
    else:
        module = enc.model
        from hybridrag.models.hybrid_encoder import HybridEncoder

        params = HybridEncoder(enc.cfg).num_parameters()  # INT8 modules hide theirs from .parameters()
    return {"parameters": params, "weight_bytes": weight_bytes(module)}


def status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_worker(name: str, checkpoint: str | None, n_queries: int, n_passages: int) -> dict:
    """In a fresh process: load one model, encode the passages, report memory."""
    import torch

    import gc

    torch.set_num_threads(2)
    queries, passages = build_texts(n_queries, n_passages)
    del queries
    gc.collect()
    # building the texts reads whole corpora: reset the high-water mark so it measures the model only
    reset_peak_rss()
    base = status_bytes("VmRSS")
    enc = load_model(name, checkpoint)
    loaded = status_bytes("VmHWM")
    enc.encode(passages, batch_size=64)
    peak = status_bytes("VmHWM")
    return {"model": name, "peak_rss_bytes": peak, "rss_before_load_bytes": base, "model_peak_bytes": peak - base,
            "model_load_bytes": loaded - base, "encode_extra_bytes": peak - loaded, **model_stats(name, enc)}


def throughput(encoders: dict, texts: list[str], rounds: int, batch_size: int = 64) -> dict[str, float]:
    best = {name: 0.0 for name in encoders}
    for name, enc in encoders.items():  # warm-up
        enc.encode(texts[:batch_size], batch_size=batch_size)
    for _ in range(rounds):
        for name, enc in encoders.items():
            start = time.perf_counter()
            enc.encode(texts, batch_size=batch_size)
            best[name] = max(best[name], len(texts) / (time.perf_counter() - start))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None, help="hybrid checkpoint (default: the shipped one)")
    ap.add_argument("--queries", type=int, default=1024)
    ap.add_argument("--passages", type=int, default=192)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "encoder.json"))
    ap.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(rss_worker(args.worker, args.checkpoint, args.queries, args.passages)))
        return

    import torch

    torch.set_num_threads(2)
    queries, passages = build_texts(args.queries, args.passages)
    mean_q = sum(len(e.ids) for e in token_counter().encode_batch(queries)) / len(queries)
    print(f"{len(queries)} queries (mean {mean_q:.1f} tokens), {len(passages)} passages (>= {PASSAGE_TOKENS} tokens)")

    encoders = {name: load_model(name, args.checkpoint) for name in MODELS}
    versions = {name: enc.version for name, enc in encoders.items()}
    q_rate = throughput(encoders, queries, args.rounds)
    p_rate = throughput(encoders, passages, args.rounds)
    del encoders

    memory = {}
    for name in MODELS:
        cmd = [sys.executable, __file__, "--worker", name, "--queries", str(args.queries),
               "--passages", str(args.passages)]
        if args.checkpoint:
            cmd += ["--checkpoint", args.checkpoint]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        memory[name] = json.loads(proc.stdout.strip().splitlines()[-1])

    rows = {}
    for name in MODELS:
        rows[name] = {
            "version": versions[name],
            "queries_per_s": q_rate[name],
            "passages_per_s": p_rate[name],
            "queries_speedup": q_rate[name] / q_rate["original"],
            "passages_speedup": p_rate[name] / p_rate["original"],
            **{k: v for k, v in memory[name].items() if k != "model"},
        }
    print(f"\n{'model':12s} {'queries/s':>10s} {'x':>6s} {'passages/s':>11s} {'x':>6s} "
          f"{'params':>10s} {'weight MB':>10s} {'peak MB':>8s}")
    for name, r in rows.items():
        print(f"{name:12s} {r['queries_per_s']:10.1f} {r['queries_speedup']:6.2f} {r['passages_per_s']:11.1f} "
              f"{r['passages_speedup']:6.2f} {r['parameters']:10,d} {r['weight_bytes'] / 1e6:10.2f} "
              f"{r['model_peak_bytes'] / 1e6:8.1f}")
    int8_over_fp32 = rows["hybrid-int8"]["weight_bytes"] / rows["hybrid-fp32"]["weight_bytes"]
    print(f"\nINT8 hybrid on passages: {rows['hybrid-int8']['passages_speedup']:.2f}x the original (target >= 3x)")
    print(f"INT8 weight bytes: {100 * int8_over_fp32:.1f}% of FP32 (target <= 30%)")
    print(f"INT8 peak memory (load + encode, above the process before loading): {100 * rows['hybrid-int8']['model_peak_bytes'] / rows['hybrid-fp32']['model_peak_bytes']:.1f}% of FP32")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "threads": 2, "rounds": args.rounds, "machine": platform.processor() or platform.machine(),
        "n_queries": len(queries), "mean_query_tokens": mean_q, "n_passages": len(passages),
        "passage_tokens": PASSAGE_TOKENS, "models": rows,
        "int8_weight_fraction_of_fp32": int8_over_fp32,
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
