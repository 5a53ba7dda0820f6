"""Encoder frontier: MiniLM FP32 and BF16 against the hybrid profiles, in one run.

One run, same texts for every model, 2 CPU threads:

- texts/s on short queries and on 256-token passages. The models take turns
  for ``--rounds`` rounds and each keeps its best round, so a burst of load
  from another process on a shared machine hits all of them alike;
- batch independence: the cosine between a text encoded alone and the same
  text encoded in a batch of 64 (the worst of 64 texts);
- parameters, weight bytes, and peak RSS while loading and encoding the
  passages, each model in a fresh subprocess so that one model's memory does
  not count against another.

Rows (``--models``):

- ``minilm-fp32``: all-MiniLM-L6-v2 through sentence-transformers, the baseline;
- ``minilm-bf16``: the same model cast to BF16;
- ``hybrid``, ``hybrid-fast``: the shipped profiles in the precision the
  runtime picks on this machine (``select_precision``);
- ``hybrid-fp32``, ``hybrid-int8``: the ``hybrid`` profile in FP32 and with
  dynamic INT8 linears, to show why the runtime picks what it picks;
- ``ablation``: the checkpoint given by ``--ablation`` (hybrid-fast trained
  without the convolution block).

Texts come from the offline training corpora: queries are the query side of
training pairs, passages are consecutive corpus texts joined until they reach
256 tokens.

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

MODELS = ("minilm-fp32", "minilm-bf16", "hybrid", "hybrid-fast", "hybrid-fp32", "hybrid-int8")
BASELINE = "minilm-fp32"
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


class MiniLMHalf:
    """all-MiniLM-L6-v2 through sentence-transformers with its weights and activations in BF16."""

    def __init__(self):
        import torch

        from hybridrag.models.encoders import OriginalEncoder

        self.base = OriginalEncoder()
        self.base.model.to(torch.bfloat16)
        self.model = self.base.model
        self.version = "minilm-l6-v2-bf16"

    def encode(self, texts, batch_size: int = 64):
        import numpy as np

        out = self.model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                convert_to_tensor=True, show_progress_bar=False)
        return np.ascontiguousarray(out.float().cpu().numpy())


def load_model(name: str, ablation: str | None = None):
    if name == "minilm-fp32":
        from hybridrag.models.encoders import OriginalEncoder

        return OriginalEncoder()
    if name == "minilm-bf16":
        return MiniLMHalf()
    from hybridrag.models.hybrid_encoder import HybridEncoderRuntime

    if name == "ablation":
        return HybridEncoderRuntime.load(ablation)
    if name in ("hybrid-fp32", "hybrid-int8"):
        return HybridEncoderRuntime.load("hybrid", precision=name.split("-")[1])
    return HybridEncoderRuntime.load(name)


def model_stats(name: str, enc) -> dict:
    from hybridrag.models.quantization import weight_bytes

    if name.startswith("minilm"):
        params = sum(p.numel() for p in enc.model.parameters())
    else:
        from hybridrag.models.hybrid_encoder import HybridEncoder

        params = HybridEncoder(enc.cfg).num_parameters()  # INT8 modules hide theirs from .parameters()
    return {"parameters": params, "weight_bytes": weight_bytes(enc.model),
            "precision": getattr(enc, "precision", "bf16" if name == "minilm-bf16" else "fp32")}


def batch_independence(enc, texts: list[str]) -> float:
    """The lowest cosine between a text encoded alone and the same text in one batch of all ``texts``."""
    import numpy as np

    together = enc.encode(texts, batch_size=len(texts))
    alone = np.concatenate([enc.encode([t], batch_size=1) for t in texts])
    return float((together * alone).sum(1).min())


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


def rss_worker(name: str, ablation: str | None, n_queries: int, n_passages: int) -> dict:
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
    enc = load_model(name, ablation)
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
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated rows (see the docstring)")
    ap.add_argument("--ablation", default=None, help="checkpoint of the ablation row (hybrid-fast without conv)")
    ap.add_argument("--queries", type=int, default=1024)
    ap.add_argument("--passages", type=int, default=192)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "encoder.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(rss_worker(args.worker, args.ablation, args.queries, args.passages)))
        return

    import torch

    torch.set_num_threads(2)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.ablation and "ablation" not in names:
        names.append("ablation")
    if BASELINE not in names:
        names.insert(0, BASELINE)
    queries, passages = build_texts(args.queries, args.passages)
    mean_q = sum(len(e.ids) for e in token_counter().encode_batch(queries)) / len(queries)
    print(f"{len(queries)} queries (mean {mean_q:.1f} tokens), {len(passages)} passages (>= {PASSAGE_TOKENS} tokens)")

    encoders = {name: load_model(name, args.ablation) for name in names}
    versions = {name: enc.version for name, enc in encoders.items()}
    mixed = queries[:32] + passages[:32]  # a batch of short and long texts: the most padding
    independence = {name: batch_independence(enc, mixed) for name, enc in encoders.items()}
    q_rate = throughput(encoders, queries, args.rounds)
    p_rate = throughput(encoders, passages, args.rounds)
    del encoders

    memory = {}
    for name in names:
        cmd = [sys.executable, __file__, "--worker", name, "--queries", str(args.queries),
               "--passages", str(args.passages)]
        if args.ablation:
            cmd += ["--ablation", args.ablation]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        memory[name] = json.loads(proc.stdout.strip().splitlines()[-1])

    base_peak = memory[BASELINE]["model_peak_bytes"]
    rows = {}
    for name in names:
        rows[name] = {
            "version": versions[name],
            "queries_per_s": q_rate[name],
            "passages_per_s": p_rate[name],
            "queries_speedup": q_rate[name] / q_rate[BASELINE],
            "passages_speedup": p_rate[name] / p_rate[BASELINE],
            "batch_independence_min_cos": independence[name],
            "peak_fraction_of_baseline": memory[name]["model_peak_bytes"] / base_peak,
            **{k: v for k, v in memory[name].items() if k != "model"},
        }
    print(f"\n{'model':12s} {'prec':>5s} {'queries/s':>10s} {'x':>6s} {'passages/s':>11s} {'x':>6s} "
          f"{'params':>11s} {'weight MB':>10s} {'peak MB':>8s} {'peak x':>7s} {'alone/batch cos':>16s}")
    for name, r in rows.items():
        print(f"{name:12s} {r['precision']:>5s} {r['queries_per_s']:10.1f} {r['queries_speedup']:6.2f} "
              f"{r['passages_per_s']:11.1f} {r['passages_speedup']:6.2f} {r['parameters']:11,d} "
              f"{r['weight_bytes'] / 1e6:10.2f} {r['model_peak_bytes'] / 1e6:8.1f} "
              f"{r['peak_fraction_of_baseline']:7.2f} {r['batch_independence_min_cos']:16.5f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "threads": 2, "rounds": args.rounds, "machine": platform.processor() or platform.machine(),
        "n_queries": len(queries), "mean_query_tokens": mean_q, "n_passages": len(passages),
        "passage_tokens": PASSAGE_TOKENS, "baseline": BASELINE, "models": rows,
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
