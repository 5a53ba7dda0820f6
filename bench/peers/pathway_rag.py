"""The streaming RAG job in Pathway, two ways.

    python bench/peers/pathway_rag.py --variant udf --bootstrap 127.0.0.1:9092 \\
        --queries-topic p-queries --answers-topic p-answers --documents-topic p-documents \\
        --group p-pathway --status /tmp/pathway.json

- ``udf``: ``pw.io.kafka.read`` -> a ``@pw.udf(max_batch_size=64)`` that encodes a
  batch of queries in one model call, searches and answers -> ``pw.io.kafka.write``.
  Documents go through a batched UDF of their own into the same in-process
  index (rag_job.PassageIndex) that the query UDF searches.
- ``live-index``: Pathway's LLM xpack. ``SentenceTransformerEmbedder`` embeds, and
  ``BruteForceKnnFactory(...).build_index(...)`` keeps a live KNN index that the
  documents stream into; ``query_as_of_now(number_of_matches=5)`` answers each
  query against the index as it stands when the query arrives. A batched UDF
  writes the extractive answer.

Both read fresh topics from ``earliest`` and close a minibatch of queries every
``--batch-timeout-ms`` and of documents every ``--doc-batch-timeout-ms``
(``autocommit_duration_ms``), hybridrag's two ``take(..., within=...)`` windows, which
bench/peers.py passes; the
answers are raw JSON values keyed by ``query_id`` (Pathway's own JSON format would
add ``time`` and ``diff`` fields to every answer).
"""

from __future__ import annotations

import time

import pathway as pw

import rag_job
from rag_job import Hit, JobConfig, PassageIndex, Status

VARIANTS = ("udf", "live-index")


class QuerySchema(pw.Schema):
    query_id: str
    text: str


class DocumentSchema(pw.Schema):
    doc_id: str
    text: str
    title: str = pw.column_definition(default_value="")


def kafka_settings(cfg: JobConfig, reader: str) -> dict:
    """librdkafka settings; each reader has its own group, so one's join never rebalances the other."""
    return {
        "bootstrap.servers": cfg.bootstrap,
        "group.id": f"{cfg.group}-{reader}",
        "auto.offset.reset": "earliest",  # fresh topics: Tansu's reported end offsets are not the true end
        "session.timeout.ms": str(cfg.session_timeout_ms),
        "heartbeat.interval.ms": "1000",
        "fetch.wait.max.ms": str(cfg.fetch_max_wait_ms),
    }


def read(cfg: JobConfig, topic: str, schema: type[pw.Schema], reader: str) -> pw.Table:
    window = cfg.doc_batch_timeout_ms if reader == "documents" else cfg.batch_timeout_ms
    return pw.io.kafka.read(kafka_settings(cfg, reader), topic=topic, schema=schema, format="json",
                            autocommit_duration_ms=window, name=reader)


def write_answers(cfg: JobConfig, answers: pw.Table) -> None:
    pw.io.kafka.write(answers, {"bootstrap.servers": cfg.bootstrap, "linger.ms": "2", "acks": "all"},
                      topic_name=cfg.answers_topic, format="raw", key=answers.query_id, value=answers.body)


def build_udf_job(cfg: JobConfig, model, status: Status) -> None:
    index = PassageIndex()

    @pw.udf(max_batch_size=cfg.batch_max)
    def index_documents(doc_ids: list[str], titles: list[str], texts: list[str]) -> list[int]:
        rows = rag_job.index_batch(model, index, list(zip(doc_ids, titles, texts)))
        status.update(indexed=rows)
        return [rows] * len(doc_ids)

    @pw.udf(max_batch_size=cfg.batch_max)
    def answer(query_ids: list[str], texts: list[str]) -> list[bytes]:
        out = rag_job.answer_batch(model, index, list(zip(query_ids, texts)), cfg.top_k, cfg.min_score)
        status.update(answered=len(out))
        return [body for _, body in out]

    docs = read(cfg, cfg.documents_topic, DocumentSchema, "documents")
    pw.io.null.write(docs.select(rows=index_documents(pw.this.doc_id, pw.this.title, pw.this.text)))
    queries = read(cfg, cfg.queries_topic, QuerySchema, "queries")
    write_answers(cfg, queries.select(pw.this.query_id, body=answer(pw.this.query_id, pw.this.text)))


def build_live_index_job(cfg: JobConfig, status: Status) -> None:
    from pathway.stdlib.indexing.colnames import _SCORE
    from pathway.stdlib.indexing.nearest_neighbors import BruteForceKnnFactory, BruteForceKnnMetricKind
    from pathway.xpacks.llm.embedders import SentenceTransformerEmbedder

    embedder = SentenceTransformerEmbedder(
        model=str(rag_job.minilm_path()), batch_size=cfg.batch_max,
        call_kwargs={"normalize_embeddings": True, "show_progress_bar": False},
        # the SentenceTransformer constructor's own argument: the weights load in this dtype
        model_kwargs={"torch_dtype": rag_job.torch_dtype(cfg.precision)},
    )

    @pw.udf(deterministic=True)
    def embed_text(title: str, text: str) -> str:
        return rag_job.embed_text(title, text)

    docs = read(cfg, cfg.documents_topic, DocumentSchema, "documents")
    docs = docs.select(pw.this.doc_id, pw.this.title, pw.this.text, embed=embed_text(pw.this.title, pw.this.text))
    index = BruteForceKnnFactory(embedder=embedder, reserved_space=8192, metric=BruteForceKnnMetricKind.COS
                                 ).build_index(docs.embed, docs)

    def count_indexed(key, row, time, is_addition):
        if is_addition:
            status.update(indexed=status.values["indexed"] + 1)

    pw.io.subscribe(docs, on_change=count_indexed)

    @pw.udf(max_batch_size=cfg.batch_max)
    def answer(query_ids: list[str], texts: list[str], doc_ids: list[tuple], titles: list[tuple],
               passages: list[tuple], scores: list[tuple]) -> list[bytes]:
        t0 = time.perf_counter()
        bodies = []
        for qid, text, ids, tts, pss, scs in zip(query_ids, texts, doc_ids, titles, passages, scores):
            # the index scores a match by minus its cosine distance: the cosine is 1 + score
            hits = sorted((Hit(d, 1.0 + float(s), t, p) for d, t, p, s in zip(ids, tts, pss, scs)),
                          key=lambda h: -h.score)
            hits = [h for h in hits if h.score >= cfg.min_score]
            bodies.append(rag_job.answer_json(qid, text, hits, {"generate": (time.perf_counter() - t0) * 1e3},
                                              len(query_ids)))
        status.update(answered=len(bodies))
        return bodies

    queries = read(cfg, cfg.queries_topic, QuerySchema, "queries")
    found = index.query_as_of_now(queries.text, number_of_matches=cfg.top_k).select(
        query_id=pw.left.query_id, text=pw.left.text,
        doc_ids=pw.coalesce(pw.right.doc_id, ()), titles=pw.coalesce(pw.right.title, ()),
        passages=pw.coalesce(pw.right.text, ()), scores=pw.coalesce(pw.right[_SCORE], ()),
    )
    write_answers(cfg, found.select(pw.this.query_id, body=answer(
        pw.this.query_id, pw.this.text, pw.this.doc_ids, pw.this.titles, pw.this.passages, pw.this.scores)))


def main() -> None:
    cfg = rag_job.parse_args(__doc__.splitlines()[0], VARIANTS)
    status = Status(cfg.status, f"pathway-{cfg.variant}")
    if cfg.variant == "udf":
        model = rag_job.load_minilm(cfg.torch_threads, cfg.precision)
        rag_job.encode(model, ["warm up"])  # the first call pays for lazy initialisation
        build_udf_job(cfg, model, status)
    else:
        import torch

        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        build_live_index_job(cfg, status)
    pw.run(monitoring_level=pw.MonitoringLevel.NONE)


if __name__ == "__main__":
    main()
