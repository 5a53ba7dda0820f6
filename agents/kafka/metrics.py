"""Prometheus metrics of a worker, served at ``/metrics`` by the Faust web server.

Every label set here is bounded: topics and agents by ``topics.yaml``, error
types by the two kinds of dead letter, tenants of the query bank by
``retriever_query_bank_tenants``, the encoder version by the one serving.
``hybridrag_metric_label_sets`` shows each metric's count, so a leak would show.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

REGISTRY = CollectorRegistry()

ANSWER_LATENCY = Histogram(
    "hybridrag_answer_latency_seconds",
    "From the query record's timestamp to its answer produced.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "hybridrag_batch_size", "Records per micro-batch.", ["agent"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=REGISTRY,
)
PROCESSED = Counter("hybridrag_records_processed_total", "Records processed.", ["agent"], registry=REGISTRY)
# error_type is "validation" or "processing"; the reason itself goes in the dead letter, never in a label
DEAD_LETTERS = Counter("hybridrag_dead_letters_total", "Records sent to a DLQ.", ["topic", "error_type"], registry=REGISTRY)
RETRIES = Counter("hybridrag_retries_total", "Batch retries after a transient error.", ["agent"], registry=REGISTRY)
CHUNKS_INDEXED = Counter("hybridrag_chunks_indexed_total", "Chunks upserted into the vector store.", registry=REGISTRY)
ENCODER_INFO = Gauge("hybridrag_encoder_info", "Encoder serving queries (value 1).", ["version"], registry=REGISTRY)
EVICTIONS = Counter("hybridrag_evictions_total", "Documents evicted by the memory manager.", ["policy"], registry=REGISTRY)
MEMORY_DEGRADED = Counter("hybridrag_memory_degraded_total", "Memory updates deferred because Redis was unreachable.", registry=REGISTRY)
CONSUMER_LAG = Gauge("hybridrag_consumer_lag", "Records behind the end of each assigned partition.", ["topic", "partition"], registry=REGISTRY)
SYNTH_SAMPLES = Counter("hybridrag_synthetic_samples_total", "Diffusion samples, by filter outcome.", ["outcome"], registry=REGISTRY)
SYNTH_FAILURES = Counter("hybridrag_synthesis_failures_total", "Sampled queries whose synthesis failed.", registry=REGISTRY)
REINDEXES = Counter("hybridrag_reindexes_total", "Collections rebuilt for a promoted encoder and swapped in.", registry=REGISTRY)
QUERY_BANK = Gauge("hybridrag_query_bank_queries", "Served queries in the adaptive retriever's query bank, per tenant.",
                   ["tenant"], registry=REGISTRY)
MIRROR_ROWS = Gauge("hybridrag_mirror_rows", "Rows of the in-process mirror of the Milvus Lite collection: live, and "
                    "dead slots awaiting compaction.", ["state"], registry=REGISTRY)
FUSION_WEIGHT = Gauge("hybridrag_fusion_weight", "Weight of BM25 in the hybrid retriever's blend with the dense "
                      "cosine (chosen per collection from its pseudo-queries).", registry=REGISTRY)
FUSION_CHECK = Gauge("hybridrag_fusion_self_check_ndcg10", "nDCG@10 of the collection's pseudo-queries at the chosen "
                     "fusion weight (label-free self-check).", registry=REGISTRY)
LEARNER_BUFFER = Gauge("hybridrag_learner_buffer_examples", "Continual learner's buffer in Redis: pairs, query-only "
                       "examples, and trained ids remembered against replays.", ["kind"], registry=REGISTRY)
COLLECTIONS = Gauge("hybridrag_collections", "Collections of this deployment in the vector store (serving, fallbacks "
                    "kept, one being rebuilt).", registry=REGISTRY)
MEMORY_BUFFERED = Gauge("hybridrag_memory_buffered_updates", "Memory updates held in the worker while Redis is "
                        "unreachable (at most 10,000).", registry=REGISTRY)
LEARNER_UPDATES = Counter("hybridrag_learner_updates_total", "Continual-learning updates, by outcome.", ["outcome"], registry=REGISTRY)


class LabelSets:
    """``hybridrag_metric_label_sets{metric}``: how many label sets each labelled metric has now."""

    def __init__(self, *metrics):
        self.metrics = metrics

    def collect(self):
        g = GaugeMetricFamily("hybridrag_metric_label_sets", "Label sets of each labelled metric of this worker.",
                              labels=["metric"])
        for metric in self.metrics:
            for family in metric.collect():
                sets = {tuple(sorted((k, v) for k, v in smp.labels.items() if k != "le")) for smp in family.samples}
                g.add_metric([family.name], len(sets - {()}))
        yield g


REGISTRY.register(LabelSets(BATCH_SIZE, PROCESSED, DEAD_LETTERS, RETRIES, ENCODER_INFO, EVICTIONS, CONSUMER_LAG,
                            SYNTH_SAMPLES, QUERY_BANK, MIRROR_ROWS, LEARNER_BUFFER, LEARNER_UPDATES))


def render() -> bytes:
    return generate_latest(REGISTRY)
