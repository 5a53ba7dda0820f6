"""Message schemas for every topic, encoded as JSON with orjson.

Decoding happens at the edge, once, strictly: a record that is not valid UTF-8
JSON, is too large, has the wrong types, an empty text or an unsupported
schema version raises ``MessageError`` with a reason that the dead-letter
record keeps. Inside the pipeline nothing is an untyped dict.

Fields this version does not know are ignored, not rejected: a client built
against a newer schema (one more optional field) keeps working with an older
worker. Each model's ``schema_version`` is its major version, bumped only by a
change an older reader or writer would break on; ``hybridrag.agents.kafka.contract``
turns these models into the JSON Schemas and the AsyncAPI document.
"""

from __future__ import annotations

import base64
import time
from typing import Annotated, Literal, Optional, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

SCHEMA_VERSION = 1
VERSION_DOC = "Major version of this message's schema; optional on input (absent means the current one)."
# JSON Schema cannot call _non_blank; this pattern says the same (one non-space character)
NON_BLANK = {"pattern": r"\S"}

# Ids end up in Milvus filter expressions and Redis keys: a conservative
# charset rules out injection instead of escaping at every use.
ID_PATTERN = r"^[A-Za-z0-9_.:/@+=\-]{1,256}$"
Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
Tenant = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.\-]{0,64}$")]


class MessageError(ValueError):
    """A record that cannot be accepted. ``reason`` is short and goes to the DLQ."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Message(BaseModel):
    # strict: "1" is not 1. Unknown fields are dropped, so that adding an
    # optional field is a compatible change in both directions.
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    schema_version: Literal[1] = Field(SCHEMA_VERSION, description=VERSION_DOC)


def _non_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("text is empty")
    return v


class Document(Message):
    """A document to index (topic ``documents``)."""

    doc_id: Id = Field(description="Your id of the document; the record's key. Re-sending an id replaces the document.")
    # non-blank, checked below so the reason says "text is empty"
    text: str = Field(description="The text to index; at most HYBRIDRAG_MAX_DOCUMENT_CHARS characters.",
                      json_schema_extra=NON_BLANK)
    title: str = Field(default="", max_length=1_000)
    tenant: Tenant = Field("", description="Namespace: the document is only retrieved for queries of the same tenant.")
    metadata: dict[str, str] = Field(default_factory=dict, max_length=32)

    _text_non_blank = field_validator("text")(_non_blank)


class Query(Message):
    """A question (topic ``queries``). The answer carries the same ``query_id``."""

    query_id: Id = Field(description="Your correlation id; the record's key, and the key and query_id of the answer.")
    # non-blank, checked below so the reason says "text is empty"
    text: str = Field(description="The question; at most HYBRIDRAG_MAX_QUERY_CHARS characters.",
                      json_schema_extra=NON_BLANK)
    top_k: Optional[int] = Field(default=None, ge=1, description="Sources to return; at most HYBRIDRAG_MAX_TOP_K.")
    tenant: Tenant = Field("", description="Only this tenant's documents are searched.")
    include_synthetic: bool = Field(True, description="Let synthetic documents steer retrieval (they are never cited).")
    sent_at: Optional[float] = Field(None, description="Your clock, seconds since the epoch, for latency.")

    _text_non_blank = field_validator("text")(_non_blank)


class Source(Message):
    doc_id: str
    chunk: int
    chunk_id: str
    score: float
    title: str = ""
    text: str = ""


class Answer(Message):
    """An answer (topic ``answers``), correlated with its query by ``query_id``."""

    query_id: str = Field(description="The query_id of the query answered; also the record's key.")
    answer: str
    sources: list[Source]
    confident: bool = Field(description="False when no source passed the score threshold; the answer then says so.")
    encoder_version: str
    generator: str
    timings_ms: dict[str, float] = Field(description="Milliseconds per stage: buffer_wait, encode, search, fine, "
                                                     "generate, compute.")
    batch_size: int = Field(description="Queries answered in the same micro-batch.")
    worker: str = ""
    answered_at: float = Field(default_factory=time.time)


class GeneratedDocument(Message):
    """A synthetic document or embedding from the diffusion models (topic ``generated-documents``)."""

    query_id: str
    query: str = Field(default="", max_length=2_000)  # the query it was written for (training pairs)
    doc_id: Id
    text: str = ""  # empty for an embedding-only sample
    embedding: list[float] = Field(default_factory=list)
    kept: bool
    drop_reasons: list[str] = Field(default_factory=list)
    scores: dict[str, float] = Field(default_factory=dict)
    model_versions: dict[str, str] = Field(default_factory=dict)
    encoder_version: str
    tenant: Tenant = ""


class RetentionUpdate(Message):
    """A model or memory event (topic ``retention-updates``): a new encoder version and its metrics."""

    kind: Literal["encoder-promoted", "encoder-rejected", "reindexed", "evicted"]
    encoder_version: str
    metrics: dict[str, float] = Field(default_factory=dict)
    checkpoint: str = ""
    detail: str = ""
    at: float = Field(default_factory=time.time)


class DeadLetter(BaseModel):
    """What a ``<topic>.dlq`` record holds: the reason and enough to replay the original."""

    model_config = ConfigDict(extra="ignore")

    schema_version: Literal[1] = Field(1, description=VERSION_DOC)
    reason: str = Field(description="Why the record was refused, one line.")
    error_type: str = Field(description="validation (the record is bad) or processing (it failed while handled).")
    source_topic: str
    partition: int
    offset: int
    key: Optional[str] = Field(None, description="The original record's key, as UTF-8.")
    original_b64: str = Field(description="The original record's value, base64, untouched.")
    worker: str = ""
    failed_at: float = Field(default_factory=time.time)

    def original(self) -> bytes:
        return base64.b64decode(self.original_b64)


M = TypeVar("M", bound=Message)


def schema_version_of(model: type[BaseModel]) -> int:
    """The major version a model reads and writes (the default of its ``schema_version``)."""
    return model.model_fields["schema_version"].default


def encode(msg: BaseModel) -> bytes:
    return orjson.dumps(msg.model_dump(mode="json"))


def _summarise(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        loc = ".".join(str(p) for p in e["loc"]) or "message"
        parts.append(f"{loc}: {e['msg']}")
    more = f" (+{err.error_count() - 5} more)" if err.error_count() > 5 else ""
    return "; ".join(parts) + more


def decode(model: type[M], raw: bytes | None, *, max_bytes: int, max_text_chars: int | None = None) -> M:
    """Decode one record into ``model`` or raise ``MessageError`` with the reason."""
    if raw is None:
        raise MessageError("empty record (no value)")
    if len(raw) > max_bytes:
        raise MessageError(f"oversized record: {len(raw)} bytes > limit {max_bytes}")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        # orjson reports invalid UTF-8 as a decode error too
        kind = "invalid UTF-8" if "utf-8" in str(e).lower() else "malformed JSON"
        raise MessageError(f"{kind}: {e}") from None
    if not isinstance(obj, dict):
        raise MessageError(f"wrong schema: expected a JSON object, got {type(obj).__name__}")
    current = schema_version_of(model)
    version = obj.get("schema_version", current)
    if version != current:
        raise MessageError(f"unsupported schema_version {version!r}; this worker reads {current}")
    text = obj.get("text")
    if max_text_chars is not None and isinstance(text, str) and len(text) > max_text_chars:
        raise MessageError(f"oversized text: {len(text)} chars > limit {max_text_chars}")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise MessageError(f"wrong schema: {_summarise(e)}") from None


def dead_letter(
    raw: bytes | None, *, reason: str, error_type: str, topic: str, partition: int, offset: int,
    key: bytes | None = None, worker: str = "",
) -> DeadLetter:
    return DeadLetter(
        reason=reason,
        error_type=error_type,
        source_topic=topic,
        partition=partition,
        offset=offset,
        key=key.decode("utf-8", "replace") if key else None,
        original_b64=base64.b64encode(raw or b"").decode("ascii"),
        worker=worker,
    )
