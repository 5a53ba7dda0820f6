"""The continual learner on a new domain, with and without replay, against the base encoder, in one run.

    python bench/continual.py [--quick] [--out bench/results/continual.json]

The scenario the learner exists for: a deployment that served an old domain
(WordNet reverse dictionary, ``wordnet-revdict``) starts getting traffic from a
new one (``chatterbot``, where the hybrid is furthest behind its teacher:
nDCG@10 0.36 vs 0.52 in bench/results/eval.json). Everything goes through the
service's own parts, on one CPU thread:

1. The store holds both domains' documents (the chatterbot corpus, and the
   WordNet test corpus: relevant entries plus distractors), encoded by the base
   hybrid (INT8, as served).
2. Traffic. Old: WordNet training-side definitions (never a test query), two
   days ago. New: chatterbot training-side questions (held-out questions are
   the test queries and never appear), now. Each query's top-5 hits and its
   cited top-1 go to a real :class:`hybridrag.agents.retention.memory_manager.MemoryManager` (Redis, a uuid
   prefix), as the answer agent records them.
3. The synthesizer (the shipped text diffusion model; the hybrid has no
   embedding prior, so text only) rewrites the passages it retrieves from the
   store into ``synth_samples`` documents for a sample of the new questions, as
   the agent does (``--synth-from-scratch``: without them), the quality filter judges them, and the
   ``GeneratedDocument`` messages go into the learner's :class:`TrainingBuffer`
   (Redis), as the agents do.
4. Updates from the same buffer snapshot and the same memory read
   (:func:`gather_replay`), through :func:`run_update` (fine-tune, canary, verdict):
   - ``replay``: the learner as configured (replay share ``--replay-fraction``);
   - ``no_replay``: the same with replay share 0;
   - ``replay_teacher``: replayed texts distilled to the teacher instead of
     keeping the base's embeddings (``LearnerConfig.replay_target``);
   - ``generated_only``: only the kept generated (query, text) pairs as new data
     (no query-only examples, no recently retrieved documents or the query
     patterns that cited them), with replay:
     what the generated text alone is worth.
5. nDCG@10 of the base and of each update on the new domain's test queries
   (all held-out chatterbot questions, full corpus) and on the old domain's
   (WordNet queries past the canary's, against the test corpus), with the
   teacher (all-MiniLM-L6-v2) as the ceiling. Targets: new domain +3 points,
   old domain at most -1 point, with replay.

Learning rate and steps are the settings' defaults (``--lr 2e-4 --steps
120``); 5e-5 and 60 steps moved the encoder too little to measure. The JSON
records what was used. Deltas come
with the paired standard error over the test queries (154 new-domain queries
make about ±1.1 points).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

from hybridrag.models import corpora  # noqa: E402
from hybridrag.agents.retention.continual_learner import (  # noqa: E402
    LearnerConfig,
    TrainingBuffer,
    canary_per_query,
    canary_set,
    gather_replay,
    ndcg_per_query,
    run_update,
)
from hybridrag.agents.evaluation.harness import Dataset, top_k_cosine  # noqa: E402
from hybridrag.agents.retention.memory_manager import DocRecord, MemoryConfig, MemoryManager  # noqa: E402
from hybridrag.agents.kafka.schemas import GeneratedDocument  # noqa: E402
from hybridrag.agents.settings import Settings  # noqa: E402

NEW, OLD = "chatterbot", "wordnet-revdict"
DAY = 86_400.0


class _Hit:
    def __init__(self, doc_id: str):
        self.doc_id = doc_id


def old_test_set(n_queries: int, n_distractors: int, skip: int) -> dict:
    """WordNet test queries after the first ``skip`` (the canary's), against relevant entries + distractors."""
    ds = Dataset.load(OLD)
    qids = sorted(ds.queries)[skip : skip + n_queries]
    qrels = {q: ds.qrels[q] for q in qids}
    relevant = {d for r in qrels.values() for d in r}
    others = [d for d in ds.doc_ids if d not in relevant]
    random.Random(1).shuffle(others)
    keep = relevant | set(others[:n_distractors])
    text_of = dict(zip(ds.doc_ids, ds.doc_texts))
    doc_ids = [d for d in ds.doc_ids if d in keep]
    return {"query_ids": qids, "queries": [ds.queries[q] for q in qids], "qrels": qrels, "doc_ids": doc_ids,
            "doc_texts": [text_of[d] for d in doc_ids]}


def new_test_set() -> dict:
    ds = Dataset.load(NEW)
    qids = sorted(ds.queries)
    return {"query_ids": qids, "queries": [ds.queries[q] for q in qids], "qrels": ds.qrels, "doc_ids": ds.doc_ids,
            "doc_texts": ds.doc_texts}


def score(encoder, test: dict) -> np.ndarray:
    """nDCG@10 per test query."""
    return ndcg_per_query(encoder, test["queries"], test["query_ids"], test["qrels"], test["doc_ids"], test["doc_texts"])


def paired_se(a: np.ndarray, b: np.ndarray) -> float:
    """Standard error of mean(a - b) over the same queries, in nDCG points."""
    d = 100 * (a - b)
    return float(d.std(ddof=1) / np.sqrt(len(d)))


def training_side_traffic(n_new: int, n_old: int, test_queries: set[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """New-domain questions and old-domain definitions from the training split (never a test query)."""
    new = sorted({e.names[0] for e in corpora.chatterbot_entries() if not e.held_out} - test_queries)
    old = sorted({e.text for e in corpora.wordnet_entries() if not e.held_out and len(e.text.split()) >= 4}
                 - test_queries)
    rng = random.Random(seed)
    rng.shuffle(new)
    rng.shuffle(old)
    return new[:n_new], old[:n_old]


def simulate_memory(mem: MemoryManager, encoder, doc_ids: list[str], doc_texts: list[str], doc_vecs: np.ndarray,
                    old_queries: list[str], new_queries: list[str], now: float, k: int = 5) -> dict:
    """Ingest the store's documents, then the old traffic (two days ago) and the new (the last hour)."""
    mem.record_ingest([DocRecord(d, 1, len(t.encode()), sample=t) for d, t in zip(doc_ids, doc_texts)],
                      now=now - 3 * DAY)
    stats = {}
    for name, queries, t0, span in (("old", old_queries, now - 2 * DAY, DAY), ("new", new_queries, now - 3600, 3000)):
        vecs = encoder.encode(queries)
        top = top_k_cosine(vecs, doc_vecs, k)
        for i, (q, row) in enumerate(zip(queries, top)):
            hits = [_Hit(doc_ids[j]) for j in row]
            mem.record_hits(hits, query=q, cited=[hits[0].doc_id], now=t0 + span * i / len(queries))
        stats[name] = {"queries": len(queries), "distinct_docs_hit": int(len(set(top.ravel().tolist())))}
    return stats


def synthesize(encoder, queries: list[str], settings: Settings, doc_texts: list[str], doc_vecs: np.ndarray, seed: int,
               from_scratch: bool = False) -> list[GeneratedDocument]:
    """What the synthesize agent publishes for these queries (``hybridrag.agents.synthesize_documents.synthesize``).

    Like the agent, the text model rewrites the passages retrieved from the store for each
    query (SDEdit at ``synth_strength``); ``from_scratch`` writes without them instead.
    """
    from hybridrag.agents.synthesis.quality_filter import FilterConfig, matrix_store_search
    from hybridrag.agents.synthesis.synthesizer import (SynthesisConfig, Synthesizer, generated_document, load_text_model,
                                                         retrieve_contexts)

    synth = Synthesizer(encoder, load_text_model(), None, FilterConfig(min_query_similarity=settings.synth_min_query_similarity),
                        SynthesisConfig(text_steps=settings.synth_text_steps, prior_steps=settings.synth_prior_steps,
                                        guidance=settings.synth_guidance, strength=settings.synth_strength, seed=seed),
                        store_search=matrix_store_search(doc_vecs))
    contexts = None if from_scratch else retrieve_contexts(encoder, queries, doc_texts, settings.synth_samples,
                                                           passage_vecs=doc_vecs)
    samples = synth.synthesize([(f"cbq-stream-{i}", q) for i, q in enumerate(queries)],
                               n_per_query=settings.synth_samples, contexts=contexts)
    return [generated_document(d) for d in samples]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small smoke run (minutes), not the figures")
    ap.add_argument("--new-traffic", type=int, default=600, help="new-domain questions the service answers")
    ap.add_argument("--old-traffic", type=int, default=600, help="old-domain queries it answered before")
    ap.add_argument("--synth-queries", type=int, default=300, help="new questions the synthesizer writes for")
    ap.add_argument("--old-queries", type=int, default=500, help="old-domain test queries")
    ap.add_argument("--old-distractors", type=int, default=5000)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--replay-fraction", type=float, default=None, help="default: the settings' learner_replay_fraction")
    ap.add_argument("--replay-target", default="base", choices=("base", "teacher"))
    ap.add_argument("--arms", default="replay,no_replay,generated_only,replay_teacher")
    ap.add_argument("--no-teacher", action="store_true", help="skip the teacher's scores (the ceiling)")
    ap.add_argument("--recent", type=int, default=None, help="recently retrieved documents read (default: replay_pool)")
    ap.add_argument("--generated-cache", default=None,
                    help="JSONL of generated documents: read if it exists, else written (for exploring learner settings)")
    ap.add_argument("--synth-from-scratch", action="store_true",
                    help="the synthesizer writes without retrieved passages (the agent rewrites them)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "continual.json"))
    args = ap.parse_args()
    if args.quick:
        args.new_traffic, args.old_traffic, args.synth_queries = 80, 80, 12
        args.old_queries, args.old_distractors, args.steps = 100, 800, 4
        args.no_teacher = True
        if args.out == ap.get_default("out"):
            args.out = str(REPO / "bench" / "results" / "continual-quick.json")

    import torch

    torch.set_num_threads(1)
    from hybridrag.models.hybrid_encoder import DEFAULT_CHECKPOINT, HybridEncoderRuntime

    t_start = time.perf_counter()
    settings = Settings()
    prefix = f"bench-continual-{uuid.uuid4().hex[:8]}"
    work = Path(settings.data_dir) / "cache" / "continual-bench" / prefix
    cfg = LearnerConfig.from_settings(settings, lr=args.lr, steps=args.steps, redis_prefix=prefix,
                                      replay_target=args.replay_target,
                                      **({} if args.replay_fraction is None else {"replay_fraction": args.replay_fraction}))
    if args.quick:
        cfg = replace(cfg, canary_queries=50, canary_distractors=500)
    timings: dict[str, float] = {}

    def lap(name: str, t: float) -> None:
        timings[name] = round(time.perf_counter() - t, 1)
        print(f"  [{name}: {timings[name]:.0f}s]", flush=True)

    t = time.perf_counter()
    new_test = new_test_set()
    old_test = old_test_set(args.old_queries, args.old_distractors, skip=cfg.canary_queries)
    new_traffic, old_traffic = training_side_traffic(args.new_traffic, args.old_traffic,
                                                     set(new_test["queries"]) | set(old_test["queries"]), args.seed)
    store_ids = new_test["doc_ids"] + old_test["doc_ids"]
    store_texts = new_test["doc_texts"] + old_test["doc_texts"]
    base = HybridEncoderRuntime.load(str(DEFAULT_CHECKPOINT))
    store_vecs = base.encode(store_texts)
    print(f"new domain {NEW}: {len(new_test['queries'])} test queries, {len(new_test['doc_ids'])} docs, "
          f"{len(new_traffic)} training-side questions; old domain {OLD}: {len(old_test['queries'])} test queries, "
          f"{len(old_test['doc_ids'])} docs, {len(old_traffic)} training-side definitions", flush=True)
    lap("data_and_store", t)

    mem = MemoryManager(MemoryConfig(redis_url=settings.redis_url, prefix=prefix))
    buffer = TrainingBuffer.from_config(cfg)
    try:
        t = time.perf_counter()
        traffic = simulate_memory(mem, base, store_ids, store_texts, store_vecs, old_traffic, new_traffic, time.time())
        lap("traffic", t)

        t = time.perf_counter()
        cache = Path(args.generated_cache) if args.generated_cache else None
        if cache is not None and cache.exists():
            generated = [GeneratedDocument.model_validate_json(line) for line in cache.read_text().splitlines()]
        else:
            generated = synthesize(base, new_traffic[: args.synth_queries], settings, store_texts, store_vecs, args.seed,
                                   from_scratch=args.synth_from_scratch)
            if cache is not None:
                cache.write_text("".join(g.model_dump_json() + "\n" for g in generated))
        added = buffer.add(generated)
        kept = [g for g in generated if g.kept]
        reasons: dict[str, int] = {}
        for g in generated:
            for r in g.drop_reasons:
                reasons[r] = reasons.get(r, 0) + 1
        examples = buffer.snapshot(10_000)
        print(f"synthesized {len(generated)} samples for {args.synth_queries} questions: {len(kept)} kept; "
              f"buffer {buffer.size()} pairs + {buffer.query_count()} query-only", flush=True)
        for g in kept[:5]:
            print(f"  kept: {g.query!r} -> {g.text!r}")
        lap("synthesis", t)

        replay = gather_replay(mem, cfg.replay_pool, recent=args.recent)
        print(f"memory: {len(replay.texts)} important documents, {len(replay.pairs)} patterns, "
              f"{len(replay.recent)} recently retrieved documents (source {replay.source})", flush=True)

        t = time.perf_counter()
        per_query = {"base": {"new": score(base, new_test), "old": score(base, old_test)}}
        lap("score_base", t)
        if not args.no_teacher:
            from hybridrag.models.encoders import OriginalEncoder

            t = time.perf_counter()
            teacher = OriginalEncoder()
            per_query["teacher"] = {"new": score(teacher, new_test), "old": score(teacher, old_test)}
            del teacher
            lap("score_teacher", t)
        print(f"base: new {per_query['base']['new'].mean():.4f} old {per_query['base']['old'].mean():.4f}", flush=True)

        base_canary = canary_per_query(str(DEFAULT_CHECKPOINT), cfg)  # the same base and canary for every arm
        updates = {}
        pair_examples = [e for e in examples if e.is_pair]
        for arm in [a for a in args.arms.split(",") if a]:
            t = time.perf_counter()
            if arm == "replay":
                arm_cfg, arm_examples, arm_replay = cfg, examples, replay
            elif arm == "replay_teacher":  # replayed texts distilled to the teacher instead of kept (LwF)
                arm_cfg, arm_examples, arm_replay = replace(cfg, replay_target="teacher"), examples, replay
            elif arm == "no_replay":
                arm_cfg, arm_examples, arm_replay = replace(cfg, replay_fraction=0.0), examples, replay
            elif arm == "generated_only":
                arm_cfg, arm_examples, arm_replay = cfg, pair_examples, replace(replay, recent=[], recent_pairs=[])
            else:
                raise ValueError(f"{arm} is not a valid arm (replay, replay_teacher, no_replay, generated_only)")
            if not arm_examples:
                updates[arm] = {"skipped": "no examples"}
                print(f"{arm}: no examples, skipped", flush=True)
                continue
            result = run_update(str(DEFAULT_CHECKPOINT), arm_examples, arm_replay, arm_cfg, out_dir=work,
                                base_scores=base_canary)
            enc = HybridEncoderRuntime.load(result.checkpoint)
            per_query[arm] = {"new": score(enc, new_test), "old": score(enc, old_test)}
            updates[arm] = {"version": result.new_version, "replay_target": arm_cfg.replay_target, "promoted": result.promoted, "detail": result.detail,
                            "metrics": result.metrics, "replay_fraction": arm_cfg.replay_fraction,
                            "examples": len(arm_examples)}
            print(f"{arm}: new {per_query[arm]['new'].mean():.4f} old {per_query[arm]['old'].mean():.4f}; "
                  f"{result.detail}", flush=True)
            lap(f"update_{arm}", t)
    finally:
        mem.clear()
        buffer.clear()

    scores = {arm: {dom: float(v.mean()) for dom, v in s.items()} for arm, s in per_query.items()}
    b, bq = scores["base"], per_query["base"]
    deltas = {arm: {"new_points": 100 * (s["new"] - b["new"]), "old_points": 100 * (s["old"] - b["old"]),
                    "new_ratio": s["new"] / b["new"], "old_ratio": s["old"] / b["old"],
                    "new_points_se": paired_se(per_query[arm]["new"], bq["new"]),
                    "old_points_se": paired_se(per_query[arm]["old"], bq["old"])}
              for arm, s in scores.items() if arm != "base"}
    targets = {}
    if "replay" in deltas:
        d = deltas["replay"]
        targets = {"new_domain_plus_3_points": d["new_points"] >= 3.0, "old_domain_minus_at_most_1_point": d["old_points"] >= -1.0}
    print(f"\n{'':16s} {'new nDCG@10':>12s} {'Δ pts (±se)':>14s} {'ratio':>6s} "
          f"{'old nDCG@10':>12s} {'Δ pts (±se)':>14s} {'ratio':>6s}")
    for arm, s in scores.items():
        d = deltas.get(arm, {"new_points": 0.0, "old_points": 0.0, "new_ratio": 1.0, "old_ratio": 1.0,
                             "new_points_se": 0.0, "old_points_se": 0.0})
        print(f"{arm:16s} {s['new']:12.4f} {d['new_points']:+7.2f}±{d['new_points_se']:4.2f} {d['new_ratio']:6.3f} "
              f"{s['old']:12.4f} {d['old_points']:+7.2f}±{d['old_points_se']:4.2f} {d['old_ratio']:6.3f}")
    if targets:
        print(f"targets with replay: new +3 points {'met' if targets['new_domain_plus_3_points'] else 'NOT met'}, "
              f"old -1 point at most {'met' if targets['old_domain_minus_at_most_1_point'] else 'NOT met'}")
    timings["total"] = round(time.perf_counter() - t_start, 1)
    report = {
        "new_domain": NEW, "old_domain": OLD, "quick": args.quick, "encoder": "hybrid INT8 (as served)",
        "base_checkpoint": str(DEFAULT_CHECKPOINT.relative_to(REPO)), "base_version": base.version,
        "new_test": {"queries": len(new_test["queries"]), "docs": len(new_test["doc_ids"])},
        "old_test": {"queries": len(old_test["queries"]), "docs": len(old_test["doc_ids"]),
                     "skipped_canary_queries": cfg.canary_queries},
        "traffic": traffic,
        "recent_read": args.recent or cfg.replay_pool, "generated_cache": args.generated_cache,
        "synthesis": {"queries": args.synth_queries, "samples": len(generated), "kept": len(kept),
                      "from": "scratch" if args.synth_from_scratch else "retrieved passages",
                      "drop_reasons": reasons, "buffered_pairs": sum(e.is_pair for e in examples),
                      "buffered_query_only": sum(not e.is_pair for e in examples),
                      "kept_examples": [{"query": g.query, "text": g.text} for g in kept[:10]]},
        "memory": {"important_documents": len(replay.texts), "patterns": len(replay.pairs),
                   "recent_documents": len(replay.recent)},
        "learner": {k: v for k, v in asdict(cfg).items() if k not in ("redis_url", "redis_prefix", "data_dir")},
        "ndcg@10": scores, "deltas": deltas, "targets_with_replay": targets, "updates": updates,
        "timings_s": timings, "threads": 1, "machine": platform.processor() or platform.machine(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} ({timings['total'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
