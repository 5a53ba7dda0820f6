"""Benchmark of the text-diffusion generator that starts from MiniLM, on the held-out domain (FOLDOC), references in the same run.

On FOLDOC (never trained on by any generator), one run:

- round trip (Alberti et al. 2019's consistency filter): a pseudo-query written
  for a passage retrieves that passage in MiniLM's top 10 among the 5,000
  candidate passages; against two references, the passage's own title (the
  FOLDOC headword) and a random sentence of the passage (ICT);
- kept by the quality filter: the new model's pseudo-queries (passage -> query,
  judged against the passage) and passages (term -> passage), against today's
  model (``text-diffusion-v1``) writing for the same terms, from scratch and
  rewriting the passage MiniLM retrieves for the term (its shipped default);
- throughput: pseudo-queries per second, batched, with and without the
  sampler's cache, FP32 and BF16, and the projected time for 5,000 passages x 3;
- from-teacher against from-scratch at equal training time: held-out loss and
  masked-token accuracy from the two runs' validation logs, and kept rate;
- the filter's calibration: real held-out text against the same text shuffled
  and word salad.

Twenty uncurated samples per direction (the first 20 passages by FOLDOC id, none
skipped) go to ``bench/results/diffusion_minilm_samples.md`` beside today's model;
every figure to ``bench/results/diffusion_minilm.json``.

    python bench/diffusion_minilm.py [--n-round-trip 300] [--n-kept 200]
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import typer

from hybridrag.agents.synthesis.quality_filter import Candidate, FilterConfig, judge, pass_rate, reason_counts
from hybridrag.models import corpora
from hybridrag.models import train_diffusion as T
from hybridrag.models.minilm_diffusion import pad_rows

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results"

app = typer.Typer(add_completion=False)


def foldoc_set(n: int = 5000, embedded_only: bool = False) -> list[tuple[str, str, str]]:
    """(uid, title, passage) of the first ``n`` FOLDOC entries by id whose first paragraph has at least 8 words.

    ``embedded_only``: only passages whose MiniLM vectors are already in the
    content-keyed store (on a starved machine encoding 5,000 passages is the
    slowest part of the run; the store holds the shortest first).
    """
    known = set(T.known_embeddings("minilm-l6-v2")) if embedded_only else None
    rows = []
    for e in sorted(corpora.foldoc_entries(), key=lambda e: e.uid):
        p = corpora.foldoc_first_paragraph(e)
        if len(p.split()) >= 8 and (known is None or T.text_key(p) in known):
            rows.append((e.uid, e.names[0], p))
    return rows[:n]


def embed(encoder, texts: list[str]) -> np.ndarray:
    """MiniLM vectors through the diffusion trainer's content-keyed store (each text is encoded once, ever)."""
    q, _ = T.pair_embeddings([(t, t) for t in texts], encoder)
    return q


def recall_at(query_vecs: np.ndarray, passage_vecs: np.ndarray, gold: np.ndarray, k: int = 10) -> float:
    """Share of queries whose gold passage is among the ``k`` nearest by cosine."""
    sims = query_vecs @ passage_vecs.T  # (Q, N)
    gold_sim = sims[np.arange(len(gold)), gold]
    rank = (sims > gold_sim[:, None]).sum(1)
    return float((rank < k).mean())


def ict_sentence(passage: str, rng: random.Random) -> str:
    sents = [s for s in corpora.split_sentences(passage) if len(s.split()) >= 3] or [passage]
    return rng.choice(sents)


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def judge_pairs(cond_vecs: np.ndarray, texts: list[str], sample_vecs: np.ndarray, fcfg: FilterConfig,
                contexts: list[str | None] | None = None, unk: list[int] | None = None,
                ntok: list[int] | None = None) -> list:
    """One filter decision per sample, each judged against its own condition's vector (one sample per condition)."""
    out = []
    for i, t in enumerate(texts):
        c = Candidate(sample_vecs[i], t, unk[i] if unk else 0, ntok[i] if ntok else 0,
                      context=contexts[i] if contexts else None)
        out.append(judge(cond_vecs[i], [c], fcfg)[0])
    return out


def kept_summary(decisions: list) -> dict:
    return {"kept": pass_rate(decisions), "n": len(decisions), "reasons": reason_counts(decisions)}


def round_trip(gen, enc, rows, passage_vecs, n: int, steps: int, seed: int = 0) -> tuple[dict, dict]:
    """Recall@10 among all candidates for pseudo-queries (each query task) and the two references; and the samples."""
    rng = random.Random(seed)
    sub = rows[:n]
    gold = np.arange(len(sub))
    passages = [p for _, _, p in sub]
    queries = {"reference: title": [t for _, t, _ in sub],
               "reference: random sentence (ICT)": [ict_sentence(p, rng) for p in passages]}
    timing = {}
    for task in ("title", "question", "sentence"):
        t0 = time.perf_counter()
        queries[f"generated: {task}"] = [g[0] for g in gen.generate_queries(passages, 1, task=task, steps=steps, seed=seed)]
        timing[task] = time.perf_counter() - t0
    out = {}
    for name, qs in queries.items():
        qv = embed(enc, qs)
        out[name] = {"recall@10": recall_at(qv, passage_vecs, gold), "n": len(qs)}
        typer.echo(f"round trip {name}: R@10 {out[name]['recall@10']:.3f}")
    return {"by_query": out, "generation_s": timing}, queries


def throughput(gen, passages: list[str], n_per: int, steps: int, threads: int) -> dict:
    """Pseudo-queries per second, batched, with and without the cache; projected minutes for 5,000 x 3."""
    torch.set_num_threads(threads)
    out = {"passages": len(passages), "n_per_passage": n_per, "steps": steps, "threads": threads}
    for name, kw in (("cached", {}), ("no_cache", {"use_cache": False})):
        t0 = time.perf_counter()
        conds = gen._conds("title", passages)
        rng = np.random.default_rng(0)
        lengths = np.minimum(rng.choice(gen.lengths["title"], size=(len(passages), n_per)), gen.cfg.query_len)
        evals = 0
        for s in range(0, len(conds), 64):
            cond = pad_rows(conds[s : s + 64])
            with torch.inference_mode():
                _, e = gen.diffusion.sample(cond, lengths[s : s + 64].reshape(-1).tolist(), n=n_per, steps=steps,
                                            temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(0), **kw)
            evals += e
        dt = time.perf_counter() - t0
        rate = len(passages) * n_per / dt
        out[name] = {"seconds": dt, "samples_per_s": rate, "row_evals": evals,
                     "projected_min_5000x3": 15000 / rate / 60}
        typer.echo(f"throughput {name}: {rate:.2f} samples/s ({evals} row evaluations), load {load_avg()}")
    out["cache_speedup"] = out["cached"]["samples_per_s"] / out["no_cache"]["samples_per_s"]
    out["load_avg"] = load_avg()
    return out


def passages_bench(gen, old, enc, rows, passage_vecs, n: int, steps: int, fcfg: FilterConfig, seed: int = 0):
    """Kept rate of written passages for FOLDOC terms: the new model against today's, from scratch and rewriting."""
    from hybridrag.agents.synthesis.synthesizer import retrieve_contexts

    sub = rows[:n]
    terms = [t for _, t, _ in sub]
    term_vecs = embed(enc, terms)
    texts: dict[str, list] = {}
    t0 = time.perf_counter()
    texts["minilm (from the term)"] = [g[0] for g in gen.generate_passages(terms, 1, steps=steps, seed=seed)]
    new_s = time.perf_counter() - t0
    texts["v1 from scratch"] = [g[0] for g in old.generate(terms, 1, steps=32, temperature=0.8, seed=seed)]
    top = (term_vecs @ passage_vecs.T).argmax(1)
    ctx = [rows[i][2] for i in top]
    texts["v1 rewriting the retrieved passage (strength 0.5)"] = [
        g[0] for g in old.generate(terms, 1, steps=32, temperature=0.8, seed=seed, init_docs=ctx, strength=0.5)]
    out = {}
    for name, gs in texts.items():
        vecs = embed(enc, [g.text for g in gs])
        ds = judge_pairs(term_vecs, [g.text for g in gs], vecs, fcfg, contexts=[g.init_text for g in gs],
                         unk=[g.unk_count for g in gs], ntok=[len(g.token_ids) for g in gs])
        out[name] = kept_summary(ds)
        typer.echo(f"passages {name}: kept {out[name]['kept']:.2f} {out[name]['reasons']}")
    out["minilm_generation_s"] = new_s
    return out, texts, terms


def queries_kept(enc, passages: list[str], queries: dict[str, list[str]], fcfg: FilterConfig) -> dict:
    """Kept rate of pseudo-queries judged against their passage (and of the references, the same filter)."""
    pv = embed(enc, passages)
    out = {}
    for name, qs in queries.items():
        ds = judge_pairs(pv, qs, embed(enc, qs), fcfg)
        out[name] = kept_summary(ds)
    return out


def filter_calibration(n: int = 300, seed: int = 0) -> dict:
    """Drop rates of the filter's fluency check on real held-out text, the same text shuffled, and word salad."""
    from hybridrag.agents.synthesis.fluency import order_gain

    rng = random.Random(seed)
    sets = {"wordnet": [e.text for e in corpora.wordnet_entries() if e.held_out][:n],
            "brown": [e.text for e in corpora.brown_sentences() if e.held_out][:n],
            "chatterbot": [a for e in corpora.chatterbot_entries() if e.held_out for a in e.examples][:n],
            "foldoc (held-out domain)": [corpora.foldoc_first_paragraph(e) for e in corpora.foldoc_entries()][:n]}
    pool = [w for v in sets.values() for t in v for w in t.split()]
    thr = FilterConfig().min_order_gain
    out = {"min_order_gain": thr}
    for name, texts in sets.items():
        variants = {"real": texts, "shuffled": [], "word salad": []}
        for t in texts:
            w = t.split()
            rng.shuffle(w)
            variants["shuffled"].append(" ".join(w))
            variants["word salad"].append(" ".join(rng.choice(pool) for _ in t.split()))
        row = {}
        for v, ts in variants.items():
            scored = [g for g, k in (order_gain(t) for t in ts) if k >= FilterConfig().min_order_words]
            row[v] = {"dropped": float(np.mean([g < thr for g in scored])) if scored else None, "scored": len(scored)}
        out[name] = row
    return out


def teacher_vs_scratch(scratch_ckpt: Path, teacher_log: Path, scratch_log: Path) -> dict:
    """Held-out loss and masked-token accuracy of the two runs at the scratch run's last validation time."""
    t = [json.loads(x) for x in teacher_log.read_text().splitlines() if x.strip()]
    s = [json.loads(x) for x in scratch_log.read_text().splitlines() if x.strip()]
    if not t or not s:
        return {"error": "a run has no validation yet"}
    last = s[-1]
    at = min(t, key=lambda v: abs(v["elapsed_s"] - last["elapsed_s"]))
    pick = lambda v: {k: v[k] for k in ("step", "elapsed_s", "val_nats_per_token", "val_masked_acc")} | {  # noqa: E731
        "foldoc": {k: v[k] for k in v if k.startswith("foldoc")}}
    return {"scratch": pick(last), "teacher_at_same_time": pick(at), "scratch_checkpoint": str(scratch_ckpt)}


def samples_markdown(gen, old_version: str, rows, queries: dict[str, list[str]], texts: dict[str, list], terms,
                     n: int = 20) -> str:
    """Twenty uncurated samples per direction, first by FOLDOC id, none skipped, beside the references and today's model."""
    cell = lambda t: (t or "").replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = [f"# Samples of `{gen.version}` on FOLDOC (held out of training), first {n} passages by id, none skipped",
             "", "Settings: temperature 0.8, top-p 0.9, seed 0; pseudo-queries 16 steps, passages 32 steps. "
             "`bench/diffusion_minilm.py` writes this file.", "",
             "## Passage -> query (pseudo-queries), beside the references", "",
             "| # | passage | title (reference) | generated: title | generated: question | generated: sentence |",
             "|---|---|---|---|---|---|"]
    for i in range(min(n, len(queries["generated: title"]))):
        _, title, passage = rows[i]
        lines.append(f"| {i + 1} | {cell(passage[:300])} | {cell(title)} | {cell(queries['generated: title'][i])} | "
                     f"{cell(queries['generated: question'][i])} | {cell(queries['generated: sentence'][i])} |")
    lines += ["", f"## Query -> passage, beside today's model (`{old_version}`)", "",
              "| # | term | minilm (from the term) | v1 from scratch | v1 rewriting the retrieved passage |",
              "|---|---|---|---|---|"]
    names = list(texts)
    for i in range(min(n, len(terms))):
        lines.append(f"| {i + 1} | {cell(terms[i])} | " + " | ".join(cell(texts[k][i].text) for k in names) + " |")
    return "\n".join(lines) + "\n"


@app.command()
def main(
    n_round_trip: int = typer.Option(200, help="Passages whose pseudo-queries are scored (first by id)."),
    n_passages: int = typer.Option(100, help="Terms whose written passages are judged (first by id)."),
    n_candidates: int = typer.Option(5000, help="Candidate passages of the round trip."),
    embedded_only: bool = typer.Option(False, help="Candidates: only passages already in the embedding store."),
    calibration_texts: int = typer.Option(300, help="Texts per corpus of the filter's calibration."),
    n_throughput: int = typer.Option(64, help="Passages (x 3 queries) of the throughput run."),
    query_steps: int = typer.Option(16),
    passage_steps: int = typer.Option(32),
    threads: int = typer.Option(2),
    checkpoint: Path = typer.Option(None, help="The MiniLM generator (default: the shipped one)."),
    scratch_checkpoint: Path = typer.Option(None, help="The from-scratch run's checkpoint, for the comparison."),
    teacher_checkpoint: Path = typer.Option(None, help="The from-teacher run's export at the scratch run's training time."),
    out: Path = typer.Option(RESULTS / "diffusion_minilm.json"),
) -> None:
    from hybridrag.agents.synthesis.synthesizer import load_text_model
    from hybridrag.models.encoders import OriginalEncoder
    from hybridrag.models.minilm_diffusion import MinilmGenerator
    from hybridrag.models.paths import CHECKPOINTS

    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    enc = OriginalEncoder()
    gen = MinilmGenerator.load(checkpoint)
    old = load_text_model(CHECKPOINTS / "text-diffusion-v1.pt")
    fcfg = FilterConfig()
    rows = foldoc_set(n_candidates, embedded_only)
    passage_vecs = embed(enc, [p for _, _, p in rows])
    report: dict = {"model": gen.version, "baseline": old.version, "held_out_domain": "foldoc",
                    "candidates": len(rows), "load_avg_start": load_avg(), "threads": threads}
    rt, queries = round_trip(gen, enc, rows, passage_vecs, n_round_trip, query_steps)
    report["round_trip"] = rt
    report["queries_kept"] = queries_kept(enc, [p for _, _, p in rows[:n_round_trip]], queries, fcfg)
    report["passages_kept"], texts, terms = passages_bench(gen, old, enc, rows, passage_vecs, n_passages,
                                                           passage_steps, fcfg)
    report["throughput"] = throughput(gen, [p for _, _, p in rows[:n_throughput]], 3, query_steps, threads)
    report["filter_calibration"] = filter_calibration(calibration_texts)
    if scratch_checkpoint is not None and Path(scratch_checkpoint).exists():
        from hybridrag.models.train_diffusion import cache_dir

        cmp_ = teacher_vs_scratch(scratch_checkpoint, cache_dir() / "minilm-teacher.val.jsonl",
                                  cache_dir() / "minilm-scratch.val.jsonl")
        scratch = MinilmGenerator.load(scratch_checkpoint)
        ps = [p for _, _, p in rows[:n_passages]]
        same_time = MinilmGenerator.load(teacher_checkpoint) if teacher_checkpoint else gen
        sq = {"scratch: title": [g[0] for g in scratch.generate_queries(ps, 1, steps=query_steps)],
              "teacher: title": [g[0] for g in same_time.generate_queries(ps, 1, steps=query_steps)]}
        cmp_["teacher_checkpoint"] = same_time.version
        cmp_["queries_kept"] = queries_kept(enc, ps, sq, fcfg)
        report["teacher_vs_scratch"] = cmp_
    report["gen_meta"] = gen.meta
    report["load_avg_end"] = load_avg()
    report["wall_s"] = time.perf_counter() - t_start
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / "diffusion_minilm_samples.md").write_text(samples_markdown(gen, old.version, rows, queries, texts, terms))
    typer.echo(f"wrote {out}")


if __name__ == "__main__":
    app()
