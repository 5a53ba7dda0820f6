"""One typed settings object for the whole service.

Every field has a default, an environment variable (``HYBRIDRAG_<FIELD>``, plus
the conventional ``KAFKA_BOOTSTRAP_SERVERS`` and ``REDIS_URL``) and a one-line
description. ``hybridrag settings`` prints the table the README quotes.
Secrets are ``SecretStr``: they print as ``**********`` in logs and errors.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Literal, Optional

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from hybridrag.agents.kafka.topology import Topology, load_topology
from hybridrag.models.paths import data_dir

# package data: the demo corpus and questions, and the licences of what we ship
RESOURCES = Path(__file__).resolve().parent / "resources"


def _f(default, description: str, *aliases: str, **kw):
    """A settings field whose env var is HYBRIDRAG_<NAME> (and any extra aliases)."""
    if aliases:
        kw["validation_alias"] = AliasChoices(*aliases)
    return Field(default, description=description, **kw)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="HYBRIDRAG_", extra="ignore", populate_by_name=True, frozen=True
    )

    # --- Kafka -------------------------------------------------------------
    kafka_bootstrap_servers: str = _f(
        "", "Kafka bootstrap servers; empty means start the embedded Tansu broker (demo only).",
        "KAFKA_BOOTSTRAP_SERVERS", "HYBRIDRAG_KAFKA_BOOTSTRAP_SERVERS",
    )
    app_id: str = _f("hybridrag", "Faust app id, which is also the consumer group id.")
    topic_prefix: str = _f("", "Prefix added to every topic name in topics.yaml (one deployment per prefix).")
    replication_factor: int = _f(1, "Replication factor for created topics (3 on a production cluster).", ge=1)
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = _f(
        "PLAINTEXT", "Kafka security protocol."
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = _f(
        "PLAIN", "SASL mechanism when the protocol is SASL_*."
    )
    kafka_sasl_username: str = _f("", "SASL username.")
    kafka_sasl_password: SecretStr = _f(SecretStr(""), "SASL password (never logged).")
    kafka_ssl_cafile: str = _f("", "CA bundle to verify the brokers' certificates (SSL, SASL_SSL).")
    kafka_session_timeout_s: float = _f(30.0, "Consumer group session timeout.", gt=0)
    kafka_rebalance_timeout_s: float = _f(30.0, "Consumer group rebalance timeout; group joins wait for it.", gt=0)
    kafka_heartbeat_interval_s: float = _f(3.0, "Consumer heartbeat interval.", gt=0)
    kafka_commit_interval_s: float = _f(1.0, "How often acked offsets are committed.", gt=0)
    kafka_fetch_max_wait_ms: int = _f(20, "Longest a fetch waits at the broker for data; bounds the latency of each hop.", ge=0)
    kafka_max_poll_interval_s: float = _f(300.0, "Longest gap between polls before the broker evicts a consumer.", gt=0)
    broker_schema_validation: bool = _f(
        False, "The embedded broker (demo) refuses produced records that fail their topic's JSON Schema "
        "(INVALID_RECORD, error 87) instead of the worker dead-lettering them.")

    # --- Micro-batching (the design's StreamBuffer) ---------------------------
    query_batch_max: int = _f(64, "Most queries answered in one batch (stream.take max).", ge=1)
    query_batch_timeout_s: float = _f(0.005, "Longest a query waits for its batch to fill (stream.take within). Short: "
                                      "queries that queue while a batch computes fill the next one at once anyway.", ge=0)
    query_overlap: bool = _f(True, "Keep taking queries while a batch computes; a queued query joins the next batch "
                             "as soon as the model is free instead of after another timeout (agents/stream_buffer.py).")
    ingest_batch_max: int = _f(256, "Most documents encoded in one batch.", ge=1)
    ingest_batch_timeout_s: float = _f(0.02, "Longest a document waits for its batch to fill (stream.take within): a "
                                       "quiet topic flushes a small batch early, a backlog fills batches of "
                                       "ingest_batch_max while the one before computes.", ge=0)

    # --- Input limits --------------------------------------------------------
    max_message_bytes: int = _f(1_048_576, "Largest record accepted on any topic; larger goes to the DLQ.", ge=1)
    max_query_chars: int = _f(2_000, "Longest query text accepted.", ge=1)
    max_document_chars: int = _f(200_000, "Longest document text accepted.", ge=1)
    max_top_k: int = _f(20, "Most sources a query may ask for.", ge=1)

    # --- Models --------------------------------------------------------------
    encoder: Literal["hybrid", "hybrid-fast", "original"] = _f(
        "hybrid", "Encoder for queries and documents: a hybrid profile, or all-MiniLM-L6-v2 (the fallback).")
    encoder_checkpoint: str = _f("", "Hybrid encoder checkpoint; empty means the profile's shipped one.")
    encoder_precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = _f(
        "auto", "Hybrid encoder precision; auto: BF16 on CPUs with AVX-512 BF16, FP16 on CUDA, else FP32.")
    device: str = _f("cpu", "Torch device for the models (cpu, cuda).", pattern=r"^(cpu|cuda(:\d+)?|mps)$")
    torch_threads: int = _f(0, "Torch intra-op threads; 0 leaves torch's default.", ge=0)
    chunk_size: int = _f(120, "Words per chunk when indexing documents.", ge=1)
    chunk_overlap: int = _f(20, "Words shared by consecutive chunks.", ge=0)

    # --- Retrieval and generation ---------------------------------------------
    top_k: int = _f(5, "Sources per answer unless the query asks for another number.", ge=1)
    min_score: float = _f(0.2, "Sources below this cosine similarity are not cited.", ge=-1, le=1)
    generator: Literal["extractive", "openai"] = _f(
        "extractive", "Answer generator: extractive (embedded) or an OpenAI-compatible endpoint."
    )
    extractive_sentences: int = _f(3, "Sentences the extractive generator quotes.", ge=1)
    openai_base_url: str = _f(
        "http://127.0.0.1:8000/v1", "Base URL of an OpenAI-compatible chat endpoint (vLLM, llama.cpp, Ollama).",
        "OPENAI_BASE_URL", "HYBRIDRAG_OPENAI_BASE_URL",
    )
    openai_model: str = _f("", "Model name for the chat endpoint.", "OPENAI_MODEL", "HYBRIDRAG_OPENAI_MODEL")
    openai_api_key: SecretStr = _f(
        SecretStr(""), "API key for the chat endpoint (never logged).", "OPENAI_API_KEY", "HYBRIDRAG_OPENAI_API_KEY"
    )
    openai_timeout_s: float = _f(30.0, "Timeout of one chat completion (the whole request).", gt=0)
    openai_api: Literal["chat", "completions"] = _f(
        "chat", "chat: /chat/completions with a system prompt; completions: /completions with a plain prompt ending "
        "in 'Answer:', for a base model (gemma-3-270m).")
    openai_max_tokens: int = _f(256, "Longest answer the endpoint may write.", ge=1)
    openai_concurrency: int = _f(8, "Most chat requests a worker has in flight at once; a batch's go out together.",
                                 ge=1, le=1024)
    openai_retries: int = _f(2, "Retries of one chat request on a transient error (connection, timeout, 429, 5xx), "
                             "with jittered backoff.", ge=0, le=10)
    openai_cooldown_s: float = _f(10.0, "After a request fails its retries, answer without the endpoint this long "
                                  "before trying it again.", ge=0)
    generator_fallback: Literal["extractive", "wait"] = _f(
        "extractive", "When the chat endpoint is down: extractive answers at once (generator: extractive-fallback), "
        "or wait: the batch stays unacked and is retried until the endpoint is back.")

    retriever: Literal["topk", "hybrid", "lexical", "adaptive"] = _f(
        "topk", "Retriever: topk (dense only), hybrid (dense and BM25 fused with the collection's chosen weight; not "
        "the default until its label-free weight holds on every eval set), lexical (BM25 only), or adaptive "
        "(coarse top-50, fine re-score, per-query threshold).")
    retriever_fusion_weight: float = _f(
        -1.0, "Hybrid: weight of BM25 in the blend; negative means the weight chosen for each collection from "
        "its own pseudo-queries (no labels needed).", ge=-1, le=1)
    retriever_fusion_depth: int = _f(50, "Hybrid: candidates taken from each of the dense and the BM25 search.", ge=1)
    retriever_lexical_min_z: float = _f(
        2.0, "Hybrid: a source below min_score is still cited when its BM25 stands this many std above the "
        "query's other lexical candidates (a rare name the encoder blurs).")
    retriever_fusion_rechoose_growth: float = _f(
        4.0, "Hybrid: choose the fusion weight again when the collection has grown by this factor.", gt=1)
    retriever_coarse_k: int = _f(50, "Adaptive: candidates the coarse stage takes from the store.", ge=1)
    retriever_max_hits: int = _f(5, "Adaptive: most sources kept after the threshold.", ge=1)
    retriever_fine: Literal["hubness", "bm25", "dense"] = _f(
        "hubness", "Adaptive: fine signal (cosine less its hubness, cosine blended with BM25, or cosine alone).")
    retriever_hubness_weight: float = _f(0.25, "Adaptive: beta in the hubness signal, cosine - beta * hubness.", ge=0)
    retriever_query_bank_weight: float = _f(
        0.5, "Adaptive: gamma in the hubness signal, the weight of a passage's density among the queries served.", ge=0)
    retriever_query_bank_k: int = _f(10, "Adaptive: nearest served queries whose mean cosine is that density.", ge=1)
    retriever_query_bank_size: int = _f(1000, "Adaptive: most recent query vectors each worker keeps per tenant.", ge=1)
    retriever_query_bank_tenants: int = _f(64, "Adaptive: most tenants banked per worker; a new one displaces the "
                                           "least recently served.", ge=1)
    retriever_bm25_weight: float = _f(0.1, "Adaptive: weight of BM25 in the fine blend of z-scores.", ge=0, le=1)
    retriever_threshold: Literal["margin", "zscore", "gap", "none"] = _f("margin", "Adaptive: the per-query threshold rule.")
    retriever_margin: float = _f(3.0, "Adaptive: margin rule keeps fine >= top - margin * std of this query's scores.", ge=0)
    retriever_z: float = _f(1.0, "Adaptive: zscore rule keeps candidates at least this many std above this query's mean.")
    retriever_confidence_z: float = _f(3.0, "Adaptive: no confident context when the top's z-score is below this ...")
    retriever_min_cosine: float = _f(0.3, "Adaptive: ... and its cosine is below this too.", ge=-1, le=1)

    expand: bool = _f(False, "Search with the query blended with embedding-prior samples (HyDE-style; needs a prior for the encoder).")
    expand_k: int = _f(4, "Expansion: generated document embeddings per query.", ge=1)
    expand_weight: float = _f(0.5, "Expansion: weight of the mean generated embedding in the blend.", ge=0, le=1)
    expand_steps: int = _f(10, "Expansion: DDIM steps of the embedding prior.", ge=1)
    expand_guidance: float = _f(1.0, "Expansion: classifier-free guidance scale.", ge=0)
    expand_gate: float = _f(0.0, "Expansion: expand only queries whose samples agree at least this much (0: always).")

    # --- Synthesizer (diffusion models, beside the answer path) -----------------
    synth_sample_rate: float = _f(
        0.05, "Share of queries the synthesizer writes documents for; 0 turns it off. It never delays an answer.", ge=0, le=1
    )
    synth_samples: int = _f(2, "Samples per model for each sampled query.", ge=1)
    synth_text_steps: int = _f(32, "Sampling steps of the text diffusion model.", ge=1)
    synth_strength: float = _f(
        0.5, "Share of a retrieved passage the text model masks and rewrites toward the query (1: from scratch).", gt=0, le=1
    )
    synth_prior_steps: int = _f(10, "DDIM steps of the embedding prior.", ge=1)
    synth_guidance: float = _f(1.0, "Classifier-free guidance scale of the embedding prior.", ge=0)
    synth_min_query_similarity: float = _f(0.25, "Quality filter: samples less similar than this to their query are dropped.", ge=-1, le=1)
    synth_batch_max: int = _f(8, "Most sampled queries synthesized in one batch.", ge=1)
    synth_batch_timeout_s: float = _f(2.0, "Longest a sampled query waits for its synthesis batch.", ge=0)
    synth_index: bool = _f(True, "Index kept synthetic text documents (synthetic=true, never cited).")

    # --- Continual learner and re-indexing ---------------------------------------
    learner_enabled: bool = _f(True, "Fine-tune the hybrid encoder on generated documents (only when encoder=hybrid).")
    learner_min_examples: int = _f(256, "Buffered generated documents that trigger one fine-tuning update.", ge=1)
    # 120 steps at 2e-4 is what bench/continual.py measures; 60 at 5e-5 moved the encoder too little to measure
    learner_steps: int = _f(120, "Optimizer steps per update.", ge=1)
    learner_batch_size: int = _f(16, "Examples per micro-batch.", ge=1)
    learner_grad_accum: int = _f(4, "Micro-batches accumulated into one optimizer step.", ge=1)
    learner_lr: float = _f(2e-4, "Learning rate of an update.", gt=0)
    learner_replay_fraction: float = _f(0.5, "Share of each batch replayed from important past documents (limits forgetting).", ge=0, le=1)
    learner_canary_dataset: str = _f("wordnet-revdict", "Held-out set the canary score comes from.")
    learner_canary_queries: int = _f(200, "Canary queries scored before a promotion.", ge=1)
    learner_canary_tolerance: float = _f(0.01, "Most canary nDCG@10 a new version may lose and still be promoted.", ge=0)
    learner_buffer_max: int = _f(4096, "Most examples of each kind (pairs, query-only) the learner buffers in "
                                 "Redis; the oldest go first.", ge=1)
    learner_adapt_after: int = _f(0, "New passages ingested that start a zero-shot domain adaptation of the serving "
                                  "hybrid encoder (conv branch, transformer frozen); 0 turns it off.", ge=0)
    learner_adapt_minutes: float = _f(10.0, "Training budget of one domain adaptation in CPU minutes, after its "
                                      "pass over the passages.", gt=0)
    learner_adapt_max_passages: int = _f(5000, "Most recent passages a domain adaptation learns from (kept in Redis).",
                                         ge=1)
    reindex_keep_collections: int = _f(2, "Collections kept per deployment after a re-index (the serving one and "
                                       "the newest fallbacks); older ones are dropped unless an alias names them.", ge=1)
    reindex_batch: int = _f(256, "Rows re-encoded per slice when a promoted encoder rebuilds the collection.", ge=1)
    alias_poll_s: float = _f(10.0, "How often a worker checks the serving alias for a version another worker promoted.", gt=0)

    # --- Memory manager (Redis) ---------------------------------------------
    memory_enabled: bool = _f(True, "Track document importance in Redis and evict under the capacity limit.")
    memory_policy: Literal["lru", "lfu", "importance"] = _f("importance", "Eviction policy.")
    memory_capacity_docs: int = _f(0, "Most documents kept; 0 means no limit.")
    memory_capacity_bytes: int = _f(0, "Most chunk-text bytes kept; 0 means no limit.")
    memory_half_life_s: float = _f(604800.0, "Half-life of access counts and recency in the importance score.")
    memory_max_patterns: int = _f(50_000, "Most query patterns kept; the least important goes when a new one would exceed it.")

    # --- Stores --------------------------------------------------------------
    milvus_uri: str = _f(
        "./data/milvus.db", "Milvus URI: a local file is Milvus Lite, http://host:19530 a Milvus server."
    )  # not MILVUS_URI: pymilvus itself reads that variable and rejects file paths in it
    milvus_token: SecretStr = _f(SecretStr(""), "Milvus token (user:password) for a server (never logged).")
    collection: str = _f("hybridrag_chunks", "Base name of the vector collection (the encoder version is appended).")
    hubness_k: int = _f(20, "Neighbours whose mean cosine is a chunk's stored hubness (CSLS); 0 stores none.", ge=0)
    hubness_refresh_growth: float = _f(1.5, "Recompute every chunk's hubness when the collection has grown by this "
                                       "factor since the last time (0: never).", ge=0)
    redis_url: str = _f(
        "redis://127.0.0.1:6379/0", "Redis URL; redis://user:pass@host/0 for AUTH, rediss:// for TLS.",
        "REDIS_URL", "HYBRIDRAG_REDIS_URL",
    )
    redis_prefix: str = _f("hybridrag", "Key prefix for this deployment's Redis state.")

    # --- Worker --------------------------------------------------------------
    web_port: int = _f(6066, "Port of the worker's HTTP endpoint (/health, /metrics).", ge=1, le=65535)
    web_host: str = _f("127.0.0.1", "Interface the worker's HTTP endpoint binds.")
    retry_attempts: int = _f(3, "Tries for a batch that fails on a record error before the record is dead-lettered.", ge=1)
    retry_backoff_s: float = _f(0.5, "First backoff between retries; doubles each time.", ge=0)
    retry_backoff_max_s: float = _f(30.0, "Longest backoff while waiting out a transient outage.", ge=0)
    log_level: Literal["debug", "info", "warning", "error", "critical"] = _f("info", "Log level of the worker.")
    log_format: Literal["text", "json"] = _f("text", "Worker log format; json writes one object per line with query ids.")
    data_dir: str = Field(default_factory=lambda: str(data_dir()),
                          description="Where caches, checkpoints and the Milvus Lite file live.")

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_any_case(cls, v):
        return v.lower() if isinstance(v, str) else v

    @field_validator("chunk_overlap")
    @classmethod
    def _overlap_below_size(cls, v: int, info) -> int:
        size = info.data.get("chunk_size", 120)
        if not 0 <= v < size:
            raise ValueError(f"chunk_overlap must be in [0, chunk_size={size})")
        return v

    @property
    def topology(self) -> Topology:
        return load_topology(self.topic_prefix, self.replication_factor)

    def kafka_client_kwargs(self) -> dict:
        """Security settings for aiokafka clients (producer, consumer, admin)."""
        kw: dict = {"security_protocol": self.kafka_security_protocol}
        if self.kafka_security_protocol in ("SSL", "SASL_SSL"):
            kw["ssl_context"] = self.ssl_context()
        if self.kafka_security_protocol.startswith("SASL"):
            kw["sasl_mechanism"] = self.kafka_sasl_mechanism
            kw["sasl_plain_username"] = self.kafka_sasl_username
            kw["sasl_plain_password"] = self.kafka_sasl_password.get_secret_value()
        return kw

    def ssl_context(self) -> Optional[ssl.SSLContext]:
        if self.kafka_security_protocol not in ("SSL", "SASL_SSL"):
            return None
        return ssl.create_default_context(cafile=self.kafka_ssl_cafile or None)


def settings_table() -> str:
    """The Markdown table of every setting, its environment variable, default and meaning."""
    rows = ["| setting | environment variable | default | what it does |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        env = f"HYBRIDRAG_{name.upper()}"
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            env = " or ".join(f"`{a}`" for a in alias.choices if isinstance(a, str))
        else:
            env = f"`{env}`"
        default = field.default
        if isinstance(default, SecretStr):
            default = ""
        if name == "data_dir":
            default = "./data"
        rows.append(f"| {name} | {env} | `{default}` | {field.description} |")
    return "\n".join(rows)
