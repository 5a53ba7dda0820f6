"""What the adaptive retriever's hubness signal costs the store, and whether the store's values are good enough.

    python bench/hubness_store.py [--dataset foldoc ...] [--out bench/results/hubness_store.json]

For each set, the corpus vectors (the original encoder's, cached) are written
into a real Milvus Lite file in a shuffled arrival order, in ingest batches of
256, twice in the same run: with hubness (k 20, refreshed on 1.25x growth, the
settings' defaults) and without (``hubness_k=0``, the baseline). Reported:

- store write time for the whole corpus, each way, and the ratio; the time one
  MiniLM worker takes to encode the same corpus (measured on a sample in this
  run) puts the difference in proportion; and the time of one full refresh
  of the whole collection, right after the writes;
- how close the store's values are to the exact hubness over the full corpus
  (after the writes, rows added since the last refresh hold estimates);
- adaptive retrieval through the store itself (``AdaptiveRetriever`` over
  ``VectorStore``) on the held-out test half: fine-ranking nDCG@10 with the
  store's hubness against exact hubness (what bench/adaptive_retrieval.py
  assumes), and against the cosine alone; the query bank is left empty here,
  so this isolates the stored signal;
- query time per batch of 16: the service's plain top-5 retriever (the
  default), and ``AdaptiveRetriever`` with the cosine alone and with the full
  fine signal. The hubness comes back with each hit; the
  query-bank term also fetches the 50 candidates' vectors and measures them
  against the bank, which fills as the timed queries are served.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from adaptive_retrieval import split  # noqa: E402

from hybridrag.agents.evaluation import harness  # noqa: E402
from hybridrag.models.encoders import OriginalEncoder  # noqa: E402
from hybridrag.agents.rag.pipeline import TopKRetriever  # noqa: E402
from hybridrag.agents.retention.adaptive_retriever import AdaptiveConfig, AdaptiveRetriever  # noqa: E402
from hybridrag.agents.settings import Settings  # noqa: E402
from hybridrag.agents.rag.store import Row, VectorStore, mean_top_similarity  # noqa: E402

DATASETS = ["chatterbot", "foldoc", "wordnet-revdict"]
INGEST_BATCH = 256
QUERY_BATCH = 16
ENCODE_SAMPLE = 256


def write_corpus(path: str, ds, vecs: np.ndarray, order: np.ndarray, hubness_k: int, growth: float) -> tuple[VectorStore, float]:
    store = VectorStore(path, "bench", "v", vecs.shape[1], hubness_k=hubness_k, hubness_refresh_growth=growth)
    t0 = time.perf_counter()
    for s in range(0, len(order), INGEST_BATCH):
        idx = order[s : s + INGEST_BATCH]
        store.upsert([Row(f"{ds.doc_ids[i]}#0", ds.doc_ids[i], 0, ds.doc_texts[i], vecs[i]) for i in idx])
    return store, time.perf_counter() - t0


def fine_ndcg(retriever: AdaptiveRetriever, ds, qids: list[str], qvecs: np.ndarray) -> float:
    ranked = retriever.fine_stage([ds.queries[q] for q in qids], qvecs, retriever.coarse_stage(qvecs))
    run = {q: [h.doc_id for h in hs[:10]] for q, hs in zip(qids, ranked)}
    return harness.evaluate_run(run, {q: ds.qrels[q] for q in qids})["nDCG@10"]


def time_queries(retriever, texts: list[str], qvecs: np.ndarray, repeats: int = 3) -> float:
    """Best-of-``repeats`` milliseconds per batch of QUERY_BATCH queries, through the pipeline's Retriever protocol."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = 0
        for s in range(0, len(texts), QUERY_BATCH):
            b = len(texts[s : s + QUERY_BATCH])
            retriever.retrieve(texts[s : s + QUERY_BATCH], qvecs[s : s + QUERY_BATCH], [5] * b, [""] * b, [True] * b)
            n += 1
        best = min(best, (time.perf_counter() - t0) * 1e3 / n)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", "-d", action="append", default=None)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "hubness_store.json"))
    args = ap.parse_args()
    s = Settings()
    cfg = AdaptiveConfig.from_settings(s)
    enc = OriginalEncoder()
    report: dict = {"settings": {"hubness_k": s.hubness_k, "hubness_refresh_growth": s.hubness_refresh_growth,
                                 "ingest_batch": INGEST_BATCH, "adaptive": cfg.__dict__}, "datasets": {}}
    for name in args.dataset or DATASETS:
        ds = harness.Dataset.load(name)
        vecs, _ = harness.encode_corpus(enc, ds, progress=False)
        qids = list(ds.queries)
        qvecs_all = enc.encode([ds.queries[q] for q in qids])
        test = split(qids)[1]
        tq = [qids[i] for i in test]
        tv = qvecs_all[test]
        sample = [ds.doc_texts[i] for i in range(min(ENCODE_SAMPLE, len(ds.doc_texts)))]
        t0 = time.perf_counter()
        enc.encode(sample)
        encode_s = (time.perf_counter() - t0) / len(sample) * len(ds.doc_texts)
        order = np.random.default_rng(0).permutation(len(ds.doc_ids))
        with tempfile.TemporaryDirectory() as d:
            plain, t_plain = write_corpus(f"{d}/plain.db", ds, vecs, order, 0, 0.0)
            hub, t_hub = write_corpus(f"{d}/hub.db", ds, vecs, order, s.hubness_k, s.hubness_refresh_growth)
            exact = mean_top_similarity(vecs, vecs, s.hubness_k, np.arange(len(vecs)))
            stored = np.array([hub.mirror.hubness[hub.mirror.row_of[f"{i}#0"]] for i in ds.doc_ids])
            since = len(ds.doc_ids) - hub.hubness_rows
            r_store = AdaptiveRetriever(hub, config=cfg)
            r_dense = AdaptiveRetriever(hub, config=replace(cfg, fine="dense"))
            # the exact values, written into the plain store's mirror: what a fully refreshed store holds
            for i, doc in enumerate(ds.doc_ids):
                plain.mirror.hubness[plain.mirror.row_of[f"{doc}#0"]] = exact[i]
            r_exact = AdaptiveRetriever(plain, config=cfg)
            ndcg = {"store hubness": fine_ndcg(r_store, ds, tq, tv), "exact hubness": fine_ndcg(r_exact, ds, tq, tv),
                    "cosine alone": fine_ndcg(r_dense, ds, tq, tv)}
            t0 = time.perf_counter()
            hub.refresh_hubness()
            refresh_s = time.perf_counter() - t0
            texts = [ds.queries[q] for q in tq]
            ms_topk = time_queries(TopKRetriever(hub, s.min_score), texts, tv)
            ms_dense = time_queries(r_dense, texts, tv)
            ms_hub = time_queries(r_store, texts, tv)
            plain.close()
            hub.close()
        row = {
            "rows": len(ds.doc_ids),
            "write_s": {"without hubness": t_plain, "with hubness": t_hub, "ratio": t_hub / t_plain},
            "one_full_refresh_s": refresh_s,
            "minilm_encode_s_one_worker": encode_s,
            "hubness_overhead_share_of_ingest": (t_hub - t_plain) / (encode_s + t_plain),
            "stored_vs_exact": {"pearson": float(np.corrcoef(stored, exact)[0, 1]),
                                "mean_abs_error": float(np.abs(stored - exact).mean()),
                                "rows_since_last_refresh": since},
            "fine_nDCG@10_test": ndcg,
            "query_ms_per_batch_of_16": {"plain top-5": ms_topk, "adaptive, cosine alone": ms_dense,
                                         "adaptive, full fine signal": ms_hub, "full / cosine alone": ms_hub / ms_dense,
                                         "full / plain top-5": ms_hub / ms_topk},
        }
        report["datasets"][name] = row
        print(f"{name}: {row['rows']} rows; store writes {t_plain:.1f}s without hubness, {t_hub:.1f}s with "
              f"({t_hub / t_plain:.2f}x; MiniLM encoding the corpus on one worker: {encode_s:.0f}s, so "
              f"{row['hubness_overhead_share_of_ingest']:.1%} of ingest); one full refresh {refresh_s:.1f}s", flush=True)
        print(f"  stored vs exact hubness: r={row['stored_vs_exact']['pearson']:.4f}, "
              f"mean |err| {row['stored_vs_exact']['mean_abs_error']:.4f} ({since} rows since the last refresh)")
        print("  fine nDCG@10 (test half, corpus hubness only): " + ", ".join(f"{k} {v:.4f}" for k, v in ndcg.items()))
        print(f"  query ms per batch of {QUERY_BATCH}: plain top-5 {ms_topk:.1f}, adaptive with the cosine alone "
              f"{ms_dense:.1f}, with the full fine signal {ms_hub:.1f} ({ms_hub / ms_dense:.2f}x the cosine alone, "
              f"{ms_hub / ms_topk:.2f}x plain top-5)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
