"""Decoding at the edge: every bad record raises MessageError with a reason, never anything else."""

import json

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from hybridrag.agents.kafka.schemas import (Answer, DeadLetter, Document, MessageError, Query, dead_letter, decode,
                                            encode, schema_version_of)

LIMITS = dict(max_bytes=10_000, max_text_chars=1_000)


def test_round_trip():
    q = Query(query_id="q-1", text="What is a compiler?", top_k=3, tenant="acme")
    assert decode(Query, encode(q), **LIMITS) == q


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"{nope", "malformed JSON"),
        (b'{"query_id": "a", "text": "\xff"}', "invalid UTF-8"),
        (b'"a string"', "expected a JSON object"),
        (orjson.dumps({"query_id": "a", "text": 1}), "text: Input should be a valid string"),
        (orjson.dumps({"query_id": "a", "text": "x", "schema_version": 2}), "unsupported schema_version 2"),
        (orjson.dumps({"query_id": "a", "text": "y" * 1001}), "oversized text"),
        (orjson.dumps({"query_id": "a", "text": " \n "}), "text is empty"),
        (orjson.dumps({"query_id": "a b", "text": "x"}), "query_id"),
        (orjson.dumps({"query_id": "a", "text": "x", "top_k": "3"}), "top_k"),
        (b"z" * 10_001, "oversized record"),
        (None, "empty record"),
    ],
)
def test_bad_records_are_rejected_with_a_reason(raw, reason):
    with pytest.raises(MessageError) as e:
        decode(Query, raw, **LIMITS)
    assert reason in e.value.reason


def test_unknown_fields_from_a_newer_client_are_ignored():
    """A field this version does not know is dropped, not a reason to dead-letter the record."""
    q = decode(Query, orjson.dumps({"query_id": "a", "text": "x", "priority": 1, "trace": {"id": "t"}}), **LIMITS)
    assert q == Query(query_id="a", text="x")
    assert "priority" not in orjson.loads(encode(q))


def test_schema_version_is_optional_and_per_model():
    assert decode(Query, orjson.dumps({"query_id": "a", "text": "x", "schema_version": 1}), **LIMITS).schema_version == 1
    assert decode(Query, orjson.dumps({"query_id": "a", "text": "x"}), **LIMITS).schema_version == 1
    assert schema_version_of(Query) == schema_version_of(DeadLetter) == 1


def test_dead_letter_keeps_the_original_bytes():
    dl = dead_letter(b"\x00\xffraw", reason="r", error_type="validation", topic="t", partition=2, offset=7, key=b"k")
    back = DeadLetter.model_validate(orjson.loads(encode(dl)))
    assert back.original() == b"\x00\xffraw" and back.partition == 2 and back.offset == 7 and back.key == "k"


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_fuzzed_bytes_raise_only_message_error(raw):
    for model in (Query, Document, Answer):
        try:
            decode(model, raw, **LIMITS)
        except MessageError:
            pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["query_id", "doc_id", "text", "top_k", "tenant", "title", "schema_version", "x"]), json_values))
def test_fuzzed_objects_raise_only_message_error(obj):
    raw = json.dumps(obj).encode()  # json, not orjson: it also writes integers past 64 bits
    for model in (Query, Document):
        try:
            decode(model, raw, **LIMITS)
        except MessageError:
            pass
