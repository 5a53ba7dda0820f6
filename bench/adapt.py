"""Zero-shot domain adaptation, the ablation in one run: every row on every held-out domain.

For each held-out domain (never trained on by any model; the adapter sees its
corpus only, never its queries) this scores, on the domain's real queries:

- the baselines: BM25, MiniLM FP32 (``original``), the ``hybrid`` default unadapted,
  and BM25 + dense fusion (reciprocal rank fusion, Cormack et al. 2009) unadapted;
- the adapted encoder, one row per variant, each trained for the same wall-clock
  budget on one thread: the conv branch (transformer frozen) against the output
  projection alone (no branch) and against full fine-tuning; ICT, title and both
  pseudo-queries; InfoNCE, BM25, dense and ensemble pseudo-labels;
- the default variant served: fused with BM25, and through the adaptive retriever;
- the general sets (canary subsets of wordnet-revdict and chatterbot) under each
  variant, which must not fall;
- the domain self-check (held-out pseudo-pairs) with its paired bootstrap interval.

Branch and head variants embed from the frozen body's cached states
(``HybridEncoder.from_hidden``, equal to ``forward``: tests/unit/test_hybrid_encoder.py);
full fine-tuning re-encodes. Queries are always encoded by the student itself.

``python bench/adapt.py --minutes 2`` writes bench/results/adapt.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

from hybridrag.agents.evaluation import harness
from hybridrag.agents.retention import domain_adaptation as da

RESULTS = Path(__file__).resolve().parent / "results"
# variants per domain: (mode, queries, labels); the first is the default
VARIANTS = [("branch", "ict+title", "ensemble"), ("branch", "ict+title", "infonce"), ("branch", "ict+title", "bm25"),
            ("branch", "ict+title", "dense"), ("branch", "ict", "ensemble"), ("branch", "title", "ensemble"),
            ("head", "ict+title", "ensemble"), ("full", "ict+title", "ensemble")]


def domain(name: str, max_queries: int, distractors: int | None, seed: int = 0):
    """(Corpus, query ids, query texts, qrels) of a BEIR set: every relevant passage plus distractors."""
    ds = harness.Dataset.load(name, max_queries=max_queries)
    path = harness.datasets.dataset_path(name)
    titles = {}
    with open(path / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            titles[str(d["_id"])] = (d.get("title") or "").strip()
    keep = list(range(len(ds.doc_ids)))
    if distractors is not None:
        relevant = {d for r in ds.qrels.values() for d, g in r.items() if g > 0}
        others = [i for i, d in enumerate(ds.doc_ids) if d not in relevant]
        random.Random(seed).shuffle(others)
        chosen = set(others[:distractors])
        keep = [i for i, d in enumerate(ds.doc_ids) if d in relevant or i in chosen]
    ids = [ds.doc_ids[i] for i in keep]
    corpus = da.Corpus(ids, [ds.doc_texts[i] for i in keep], [titles.get(d, "") for d in ids],
                       [titles.get(d, "") or d for d in ids])
    qids = list(ds.queries)
    return corpus, qids, [ds.queries[q] for q in qids], ds.qrels


def resolve(name: str, pages: int) -> str:
    """A set's name or folder; ``manpages-adapt`` is built here (bench/manpages_set.py) on first use."""
    if name != "manpages-adapt":
        return name
    path = harness.datasets.beir_dir() / name
    if not (path / "corpus.jsonl").exists():
        import manpages_set  # bench/ is the script's folder, so on its path

        manpages_set.build(path, pages=pages)
    return str(path)


def rank(query_vecs: np.ndarray, doc_vecs: np.ndarray, doc_ids: list[str], k: int = 100) -> list[list[str]]:
    return [[doc_ids[i] for i in row] for row in harness.top_k_cosine(query_vecs, doc_vecs, k)]


def rrf(*runs: list[list[str]], k: int = 60, depth: int = 100) -> list[list[str]]:
    """Reciprocal rank fusion of rankings per query (Cormack, Clarke & Buettcher 2009)."""
    out = []
    for rows in zip(*runs):
        score: dict[str, float] = {}
        for row in rows:
            for r, d in enumerate(row[:depth]):
                score[d] = score.get(d, 0.0) + 1.0 / (k + r + 1)
        out.append(sorted(score, key=score.get, reverse=True)[:depth])
    return out


def scores(run: list[list[str]], qids: list[str], qrels) -> tuple[dict, np.ndarray]:
    """Metrics and per-query nDCG@10 of a run."""
    per_q = np.array([harness.ndcg_at_k(r, qrels[q], 10) for q, r in zip(qids, run)])
    return harness.evaluate_run(dict(zip(qids, run)), qrels), per_q


def bm25_run(corpus: da.Corpus, queries: list[str]) -> list[list[str]]:
    ds = harness.Dataset("bm25", corpus.ids, corpus.texts, {}, {}, "")
    sys_ = harness.BM25System()
    sys_.index(ds)
    return sys_.search(queries, 100)


class General:
    """The general sets' canary subsets, their body states cached once under the base encoder."""

    def __init__(self, names: list[str], adapter: da.DomainAdapter, n_queries: int, distractors: int):
        from hybridrag.agents.retention.continual_learner import canary_set

        self.sets = []
        for name in names:
            c = canary_set(name, n_queries, distractors)
            d_ids = da._tokenize(c.doc_texts, adapter.cfg.max_len)
            q_ids = da._tokenize(c.queries, adapter.cfg.max_len)
            d_states, d_vecs = da.encode_states(adapter.base, d_ids)
            q_states, q_vecs = da.encode_states(adapter.base, q_ids)
            self.sets.append((c, d_ids, q_ids, d_states, q_states, self.per_query(c, q_vecs, d_vecs)))

    @staticmethod
    def per_query(c, q_vecs, d_vecs) -> np.ndarray:
        top = harness.top_k_cosine(q_vecs, d_vecs, 10)
        return np.array([harness.ndcg_at_k([c.doc_ids[i] for i in row], c.qrels[q], 10)
                         for q, row in zip(c.query_ids, top)])

    def score(self, model, mode: str) -> dict:
        out = {}
        for c, d_ids, q_ids, d_states, q_states, base in self.sets:
            if mode == "full":
                d_vecs, q_vecs = da.encode_states(model, d_ids)[1], da.encode_states(model, q_ids)[1]
            else:
                d_vecs, q_vecs = da.embed_cached(model, d_states), da.embed_cached(model, q_states)
            new = self.per_query(c, q_vecs, d_vecs)
            mean, lo, hi = harness.paired_bootstrap(new, base)
            out[c.name] = {"base": float(base.mean()), "adapted": float(new.mean()), "delta": mean,
                           "delta_lo": lo, "delta_hi": hi, "queries": len(base)}
        return out


def prior_rows(add, model, mode, adapter, d_vecs, q_vecs, corpus, args) -> None:
    """The embedding prior trained on the domain's pseudo-pairs in the adapted space, used for expansion."""
    from hybridrag.agents.settings import Settings
    from hybridrag.models.embedding_diffusion import expand_queries, fit_prior

    s = Settings()
    train_q = (da.encode_states(model, adapter.query_ids)[1] if mode == "full"
               else da.embed_cached(model, adapter.query_states))
    pos = np.array([p.passage for p in adapter.train_pairs])
    prior = fit_prior(train_q, d_vecs[pos], "adapted", seconds=60.0 * args.prior_minutes, seed=args.seed)
    expanded = expand_queries(q_vecs, prior, k=s.expand_k, weight=s.expand_weight, steps=s.expand_steps,
                              guidance=s.expand_guidance)
    add("adapted + prior expansion", rank(expanded, d_vecs, corpus.ids), prior_steps=prior.meta["steps"])


def run_domain(name: str, args, variants) -> dict:
    from hybridrag.agents.retention.adaptive_retriever import AdaptiveConfig, adaptive_retriever_factory
    from hybridrag.agents.settings import Settings
    from hybridrag.models.encoders import OriginalEncoder

    t0 = time.monotonic()
    corpus, qids, queries, qrels = domain(name, args.max_queries, args.distractors)
    cfg = da.AdaptConfig(minutes=args.minutes, threads=1, seed=args.seed, replay=args.replay,
                         ict_per_passage=args.ict_per_passage)
    adapter = da.DomainAdapter(corpus, None, cfg).prepare(progress=True)
    print(f"[{name}] prepared in {adapter.encode_seconds:.0f}s: {len(corpus.ids)} passages, "
          f"{len(adapter.train_pairs)} train / {len(adapter.heldout)} held-out pseudo-pairs", flush=True)
    q_ids = da._tokenize(queries, cfg.max_len)
    q_states, base_q = da.encode_states(adapter.base, q_ids)
    rows: dict[str, dict] = {}
    per_q: dict[str, np.ndarray] = {}

    def add(row: str, run: list[list[str]], **extra) -> None:
        rows[row], per_q[row] = scores(run, qids, qrels)
        rows[row].update(extra)
        print(f"[{name}] {row:<40} nDCG@10 {rows[row]['nDCG@10']:.4f}", flush=True)

    lexical = bm25_run(corpus, queries)
    add("bm25", lexical)
    minilm = OriginalEncoder()
    add("original (MiniLM FP32)", rank(minilm.encode(queries), minilm.encode(corpus.texts), corpus.ids))
    base_run = rank(base_q, adapter.doc_vecs, corpus.ids)
    add("hybrid unadapted", base_run)
    add("fused unadapted (BM25 + hybrid, RRF)", rrf(lexical, base_run))
    general = General(args.general, adapter, args.general_queries, args.general_distractors)
    adaptive = adaptive_retriever_factory(AdaptiveConfig.from_settings(Settings()))
    for mode, kinds, labels in variants:
        variant = replace(cfg, mode=mode, queries=kinds, labels=labels)
        row = f"adapted {mode}/{kinds}/{labels}"
        try:
            model, history, seconds = adapter.train(variant, progress=True)
        except ValueError as e:
            rows[row] = {"skipped": str(e)}
            print(f"[{name}] {row}: skipped ({e})", flush=True)
            continue
        d_vecs = adapter.corpus_vectors(model, mode)
        q_vecs = adapter.embed_queries(model, mode, q_ids, q_states)
        run = rank(q_vecs, d_vecs, corpus.ids)
        add(row, run, steps=len(history), train_seconds=seconds, self_check=adapter.self_check(model, mode, d_vecs),
            general=general.score(model, mode))
        if (mode, kinds, labels) == variants[0]:
            add(f"fused adapted ({mode}/{kinds}/{labels})", rrf(lexical, run))
            retrieve = adaptive(corpus.ids, d_vecs, corpus.texts)
            add(f"adaptive retriever, adapted ({mode}/{kinds}/{labels})", retrieve(queries, q_vecs, 100))
            retrieve = adaptive(corpus.ids, adapter.doc_vecs, corpus.texts)
            add("adaptive retriever, unadapted", retrieve(queries, base_q, 100))
            prior_rows(add, model, mode, adapter, d_vecs, q_vecs, corpus, args)
            if args.save_default:
                adapter.save(model, Path(args.save_default) / f"{name}.pt", variant, history, seconds,
                             rows[row]["self_check"])
    base = per_q["original (MiniLM FP32)"]
    for row in per_q:
        d, lo, hi = harness.paired_bootstrap(per_q[row], base)
        rows[row]["vs_minilm"] = {"delta": d, "lo": lo, "hi": hi}
    return {"passages": len(corpus.ids), "queries": len(qids), "train_pairs": len(adapter.train_pairs),
            "heldout_pairs": len(adapter.heldout), "encode_seconds": adapter.encode_seconds,
            "seconds": time.monotonic() - t0, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domains", default="manpages-adapt,foldoc")
    ap.add_argument("--minutes", type=float, default=2.0, help="training budget of every variant")
    ap.add_argument("--max-queries", type=int, default=300)
    ap.add_argument("--distractors", type=int, default=3000, help="distractor passages next to the relevant ones")
    ap.add_argument("--general", default="wordnet-revdict,chatterbot")
    ap.add_argument("--general-queries", type=int, default=200)
    ap.add_argument("--general-distractors", type=int, default=1000)
    ap.add_argument("--variants", default="all", help="'all', 'quick' (default, head, full) or comma-separated indices")
    ap.add_argument("--save-default", default=None, help="folder for the default variant's checkpoint per domain")
    ap.add_argument("--replay", type=int, default=64, help="general texts replayed (anchored to the base)")
    ap.add_argument("--ict-per-passage", type=int, default=1)
    ap.add_argument("--pages", type=int, default=250, help="manpages-adapt: pages in the set")
    ap.add_argument("--prior-minutes", type=float, default=1.0, help="training budget of the domain's prior")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", type=Path, default=RESULTS / "adapt.json")
    args = ap.parse_args()
    args.general = [g for g in args.general.split(",") if g]
    torch.set_num_threads(1)
    if args.variants == "all":
        variants = VARIANTS
    elif args.variants == "quick":
        variants = [VARIANTS[0], VARIANTS[6], VARIANTS[7]]
    else:
        variants = [VARIANTS[int(i)] for i in args.variants.split(",")]
    report = {"meta": {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "minutes_per_variant": args.minutes,
                       "threads": 1, "load_avg_start": os.getloadavg(), "cpus": os.cpu_count(),
                       "max_queries": args.max_queries, "distractors": args.distractors,
                       "variants": [list(v) for v in variants]}, "domains": {}}
    for name in args.domains.split(","):
        report["domains"][name] = run_domain(resolve(name, args.pages), args, variants)
        report["meta"]["load_avg_end"] = os.getloadavg()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
