"""The synthesizer: query in, filtered synthetic documents and embeddings out, with provenance.

Two diffusion models write for a query:

* the text diffusion model (:mod:`hybridrag.models.text_diffusion`) writes documents,
  which the encoder then embeds. Given passages retrieved for the query
  (``contexts``), it rewrites them toward the query by partial denoising
  (SDEdit: a fraction ``strength`` of a passage's tokens masked, then denoised
  under the query); without them it writes from scratch;
* the embedding prior (:mod:`hybridrag.models.embedding_diffusion`) writes document
  embeddings directly (no text).

Every sample goes through :mod:`hybridrag.agents.synthesis.quality_filter`, and comes back as a
:class:`SyntheticDoc` that says what it is, whether it was kept and why not,
its filter scores, the versions of the models that made it and the query it
answers. The Faust agent maps these to ``generated-documents`` messages.

``hybridrag synth "query"`` (:data:`app`) prints samples from both models with their scores.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import typer

from hybridrag.agents.synthesis.quality_filter import Candidate, FilterConfig, StoreSearch, judge
from hybridrag.models.encoders import Encoder
from hybridrag.models.paths import CHECKPOINTS



def prior_path(encoder_version: str) -> Path:
    """The shipped prior trained in ``encoder_version``'s embedding space."""
    return CHECKPOINTS / f"embedding-prior-{encoder_version}.pt"


def text_model_path() -> Path:
    """The shipped text generator: the masked-diffusion model that starts from MiniLM."""
    return CHECKPOINTS / "text-diffusion-minilm.pt"


def load_prior(encoder: Encoder, path: str | Path | None = None):
    """The embedding prior for ``encoder`` (refuses one trained in another encoder's space)."""
    from hybridrag.models.embedding_diffusion import EmbeddingPrior

    space = embedding_space(encoder)
    p = Path(path) if path else prior_path(space)
    if not p.exists():
        raise FileNotFoundError(f"no embedding prior for encoder {encoder.version} at {p}; "
                                f"train one with `python -m hybridrag.agents.cli.train_diffusion prior`")
    prior = EmbeddingPrior.load(p)
    if prior.encoder_version != space:
        raise ValueError(f"prior {prior.version} was trained for encoder {prior.encoder_version}, not {space}")
    return prior


def embedding_space(encoder: Encoder) -> str:
    """The version whose embedding space ``encoder`` produces (its own unless it says otherwise)."""
    return getattr(encoder, "space", encoder.version)


def load_text_model(path: str | Path | None = None):
    """The text generator at ``path`` (default: the shipped one), by its checkpoint's kind.

    ``minilm-diffusion``: :class:`hybridrag.models.minilm_diffusion.MinilmGenerator`;
    ``text-diffusion``: the earlier from-scratch model (``text-diffusion-v1.pt``), the benchmarks' baseline.
    """
    import torch

    from hybridrag.models.minilm_diffusion import MinilmGenerator
    from hybridrag.models.text_diffusion import TextDiffusionModel

    p = Path(path) if path else text_model_path()
    if not p.exists():
        raise FileNotFoundError(f"no text-diffusion checkpoint at {p}; train one with "
                                f"`python -m hybridrag.agents.cli.train_diffusion minilm`")
    kind = torch.load(p, map_location="cpu", weights_only=False).get("kind")
    if kind == "minilm-diffusion":
        return MinilmGenerator.load(p)
    if kind == "text-diffusion":
        return TextDiffusionModel.load(p)
    raise ValueError(f"{p} is not a text-diffusion checkpoint (kind={kind!r})")


@dataclass
class SynthesisConfig:
    text_steps: int = 32  # MDLM sampling steps over t in [0, 1]; a rewrite from context runs strength * text_steps
    # SDEdit start time t0 for a text sample rewritten from a retrieved passage: about this share of the passage is
    # masked and rewritten (1.0 writes from scratch). Chosen in bench/diffusion.py (bench/results/diffusion_text.json).
    strength: float = 0.5
    temperature: float = 0.8  # softmax temperature of the text sampler
    top_p: float = 0.9  # nucleus of the text sampler
    prior_steps: int = 10  # DDIM steps of the embedding prior
    guidance: float = 1.0  # classifier-free guidance scale of the prior
    seed: int | None = 0  # None: fresh randomness on every call


@dataclass
class SyntheticDoc:
    """One generated sample and everything needed to trace it back."""

    query_id: str
    query: str
    kind: str  # "text" (text diffusion, then encoded) or "embedding" (the prior, no text)
    text: str | None
    embedding: np.ndarray  # (D,) float32, L2-normalised, in encoder_version's space
    kept: bool
    reasons: list[str]
    scores: dict
    model_version: str
    encoder_version: str
    sample_index: int  # position among this query's samples of this kind
    created_at: float = field(default_factory=time.time)
    context: str | None = None  # the passage a text sample was rewritten from, as the model saw it (None: from scratch)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["embedding"] = self.embedding.tolist()
        return d


class Synthesizer:
    """Generates, embeds and filters synthetic documents for queries.

    ``text_model`` or ``prior`` may be None to use only the other one.
    ``store_search`` finds near-duplicates among existing documents (see
    :data:`hybridrag.agents.synthesis.quality_filter.StoreSearch`).
    """

    def __init__(self, encoder: Encoder, text_model=None, prior=None, filter_config: FilterConfig | None = None,
                 config: SynthesisConfig | None = None, store_search: StoreSearch | None = None):
        if prior is not None and prior.encoder_version != embedding_space(encoder):
            raise ValueError(f"prior {prior.version} belongs to encoder {prior.encoder_version}, "
                             f"not {embedding_space(encoder)}")
        self.encoder = encoder
        self.text_model = text_model
        self.prior = prior
        self.filter_config = filter_config or FilterConfig()
        self.config = config or SynthesisConfig()
        self.store_search = store_search

    def synthesize(self, queries: Sequence[tuple[str, str]], n_per_query: int = 4,
                   contexts: Sequence[Sequence[str]] | None = None) -> list[SyntheticDoc]:
        """``n_per_query`` samples of each model per (query_id, text); kept and dropped alike, in query order.

        ``contexts[i]``: passages retrieved for query i. Its text sample j is
        rewritten from ``contexts[i][j % len(contexts[i])]`` at
        ``config.strength``; a query with no passages (or ``contexts=None``)
        gets samples written from scratch.
        """
        if not queries or n_per_query <= 0:
            return []
        if contexts is not None and len(contexts) != len(queries):
            raise ValueError(f"contexts: expected one list per query ({len(queries)}), got {len(contexts)}")
        cfg = self.config
        texts = [t for _, t in queries]
        q_vecs = self.encoder.encode(texts)  # (Q, D)
        out: list[SyntheticDoc] = []
        text_groups = doc_vecs = None
        if self.text_model is not None:
            text_groups = self._write(texts, n_per_query, contexts)
            flat = [g.text for group in text_groups for g in group]
            doc_vecs = self.encoder.encode(flat).reshape(len(texts), n_per_query, -1)
        prior_vecs = None
        if self.prior is not None:
            prior_vecs = self.prior.sample(q_vecs, k=n_per_query, steps=cfg.prior_steps, guidance=cfg.guidance,
                                           seed=cfg.seed)  # (Q, n, D)
        for qi, (qid, qtext) in enumerate(queries):
            if text_groups is not None:
                group = text_groups[qi]
                cands = [Candidate(doc_vecs[qi, j], g.text, g.unk_count, len(g.token_ids), context=g.init_text)
                         for j, g in enumerate(group)]
                for j, (c, d) in enumerate(zip(cands, judge(q_vecs[qi], cands, self.filter_config, self.store_search))):
                    out.append(SyntheticDoc(qid, qtext, "text", c.text, c.embedding, d.kept, d.reasons,
                                            asdict(d.scores), self.text_model.version, self.encoder.version, j,
                                            context=c.context))
            if prior_vecs is not None:
                cands = [Candidate(v) for v in prior_vecs[qi]]
                for j, (c, d) in enumerate(zip(cands, judge(q_vecs[qi], cands, self.filter_config, self.store_search))):
                    out.append(SyntheticDoc(qid, qtext, "embedding", None, c.embedding, d.kept, d.reasons,
                                            asdict(d.scores), self.prior.version, self.encoder.version, j))
        return out

    def _write(self, texts: list[str], n: int, contexts: Sequence[Sequence[str]] | None) -> list[list]:
        """The text model's ``n`` samples per query: rewrites of the query's contexts, or from scratch without any.

        Queries with and without contexts are sampled in two batches (one
        sampler run has one start time); the order of ``texts`` is kept.
        """
        cfg = self.config
        kw = dict(n=n, steps=cfg.text_steps, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
        write = getattr(self.text_model, "generate_passages", None) or self.text_model.generate
        with_ctx = [i for i in range(len(texts)) if contexts is not None and len(contexts[i]) > 0]
        scratch = sorted(set(range(len(texts))) - set(with_ctx))
        groups: list[list | None] = [None] * len(texts)
        if scratch:
            for i, g in zip(scratch, write([texts[i] for i in scratch], **kw)):
                groups[i] = g
        if with_ctx:
            init = [contexts[i][j % len(contexts[i])] for i in with_ctx for j in range(n)]
            for i, g in zip(with_ctx, write([texts[i] for i in with_ctx], init_docs=init, strength=cfg.strength, **kw)):
                groups[i] = g
        return groups  # type: ignore[return-value]


def retrieve_contexts(encoder: Encoder, queries: Sequence[str], passages: Sequence[str], k: int,
                      passage_vecs: np.ndarray | None = None) -> list[list[str]]:
    """The ``k`` passages nearest each query by the encoder's cosine (exact search), best first.

    ``passage_vecs``: the passages' (N, D) embeddings if already computed.
    """
    from hybridrag.agents.evaluation.harness import top_k_cosine

    if not passages or k <= 0:
        return [[] for _ in queries]
    vecs = passage_vecs if passage_vecs is not None else encoder.encode(list(passages))
    top = top_k_cosine(encoder.encode(list(queries)), vecs, min(k, len(passages)))
    return [[passages[i] for i in row] for row in top]


def corpus_index(encoder: Encoder, name_or_path: str) -> tuple[list[str], np.ndarray]:
    """Passages for ``synth`` to retrieve from, and their (N, D) embeddings.

    ``demo``: the 300 FOLDOC passages shipped for the demo (encoded on the
    spot, a few seconds); otherwise a BEIR set name (``foldoc``,
    ``wordnet-revdict``, ``chatterbot``) or folder, whose corpus embeddings the
    evaluation harness caches.
    """
    import json

    from hybridrag.agents.evaluation import datasets
    from hybridrag.agents.evaluation import harness

    if name_or_path == "demo":
        with open(datasets.DEMO_DIR / "corpus.jsonl", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        texts = [harness.doc_text({"title": r.get("title") or "", "text": r.get("text") or ""}) for r in rows]
        return texts, encoder.encode(texts)
    ds = harness.Dataset.load(name_or_path)
    vecs, _ = harness.encode_corpus(encoder, ds, progress=False)
    return ds.doc_texts, vecs


def generated_document(d: SyntheticDoc, tenant: str = ""):
    """One synthesizer sample as the record ``generated-documents`` carries."""
    from hybridrag.agents.kafka.schemas import GeneratedDocument

    return GeneratedDocument(
        query_id=d.query_id, query=d.query[:2000], doc_id=f"synth:{d.query_id}:{d.kind}:{d.sample_index}",
        text=d.text or "", embedding=[float(x) for x in d.embedding], kept=d.kept, drop_reasons=list(d.reasons),
        scores={k: float(v) for k, v in d.scores.items() if v is not None},
        model_versions={d.kind: d.model_version}, encoder_version=d.encoder_version, tenant=tenant,
    )


# ---------------------------------------------------------------- CLI



app = typer.Typer(help="Synthetic documents from the diffusion models.", no_args_is_help=True)


@app.command()
def synth(
    query: str = typer.Argument(..., help="The query to write documents for."),
    n: int = typer.Option(4, "--n", help="Samples per model."),
    context: list[str] = typer.Option(None, "--context", help="A passage to rewrite toward the query (repeatable); "
                                      "sample j rewrites passage j mod their number."),
    corpus: str = typer.Option("demo", help="Without --context: retrieve the passages to rewrite from this corpus "
                               "(demo: the shipped FOLDOC passages; or a BEIR set: foldoc, wordnet-revdict, "
                               "chatterbot; or a BEIR folder); 'none' writes from scratch."),
    k: int = typer.Option(2, help="Passages retrieved from --corpus."),
    strength: float = typer.Option(SynthesisConfig.strength, help="Share of a passage masked and rewritten "
                                   "(1.0: from scratch)."),
    encoder: str = typer.Option("original", help="Encoder: original or hybrid."),
    text_steps: int = typer.Option(SynthesisConfig.text_steps),
    temperature: float = typer.Option(SynthesisConfig.temperature),
    prior_steps: int = typer.Option(SynthesisConfig.prior_steps),
    guidance: float = typer.Option(SynthesisConfig.guidance),
    seed: int = typer.Option(0),
    min_query_similarity: float = typer.Option(FilterConfig.min_query_similarity),
) -> None:
    """Print samples from both diffusion models for QUERY, with their filter scores.

    Text samples come from the shipped generator (MiniLM's masked diffusion,
    ``text-diffusion-minilm.pt``): rewrites of passages retrieved for the query
    (or given with --context) at --strength, or, with --corpus none or
    --strength 1.0, passages written from the query alone. Its measured
    quality is in bench/README.md (bench/diffusion_minilm.py).
    """
    from hybridrag.models.encoders import load_encoder

    enc = load_encoder(encoder)
    synth_ = Synthesizer(enc, load_text_model(), load_prior(enc),
                         FilterConfig(min_query_similarity=min_query_similarity),
                         SynthesisConfig(text_steps=text_steps, temperature=temperature, prior_steps=prior_steps,
                                         guidance=guidance, seed=seed, strength=strength))
    if context:
        passages, source = list(context), "--context"
    elif corpus != "none":
        texts, vecs = corpus_index(enc, corpus)
        passages, source = retrieve_contexts(enc, [query], texts, k, passage_vecs=vecs)[0], f"top {k} of {corpus}"
    else:
        passages, source = [], "none: from scratch"
    t0 = time.perf_counter()
    docs = synth_.synthesize([("cli", query)], n_per_query=n, contexts=[passages])
    rewrite = f", strength {strength}" if passages else ""
    typer.echo(f"query: {query!r}   ({time.perf_counter() - t0:.2f}s)   contexts: {source}{rewrite}")
    for d in docs:
        mark = typer.style("kept   ", fg="green") if d.kept else typer.style("dropped", fg="red")
        s = d.scores
        score = f"sim={s['query_similarity']:.3f} dup={s['max_sample_similarity']:.3f}"
        if d.kind == "text":
            score += f" rep={s['unigram_repetition']:.2f}/{s['bigram_repetition']:.2f} unk={s['unknown_rate']:.2f}"
            if s.get("context_edit_rate") is not None:
                score += f" edit={s['context_edit_rate']:.2f}"
        why = f" [{', '.join(d.reasons)}]" if d.reasons else ""
        body = d.text if d.kind == "text" else f"<embedding, norm {np.linalg.norm(d.embedding):.3f}>"
        typer.echo(f"{d.kind:9s} {mark} {score}{why}\n          {body}")
        if d.context is not None:
            typer.echo(typer.style(f"          from: {d.context}", dim=True))
    typer.echo(f"models: {synth_.text_model.version}, {synth_.prior.version}; encoder {enc.version}")


if __name__ == "__main__":
    app()
