"""The published contract (asyncapi.yaml, schemas/*.json) against the code it describes.

No broker here: these check that the committed files are what the models
generate, that AsyncAPI's own parser accepts the document, that the examples
and the released versions' records still validate, and that the compatibility
rules catch a removed or retyped field.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import jsonschema
import orjson
import pytest
import yaml
from pydantic import Field

from hybridrag.agents.cli.main import main
from hybridrag.agents.kafka import schemas as S
from hybridrag.agents.kafka.contract import (asyncapi_document, breaking_changes, contract_files, file_stem,
                                             json_schema, message_models, packaged_contract_dir)
from hybridrag.agents.kafka.topology import load_topology

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RELEASED = HERE / "released"
TOPOLOGY = load_topology("")
REGENERATE = "regenerate: `hybridrag schemas --out agents/resources/contract` (or `hybridrag schemas` at the repo root)"


def test_committed_contract_is_what_the_models_generate():
    """A model or topics.yaml changed and the committed document or schemas were not regenerated: fail."""
    committed = packaged_contract_dir()
    for rel, text in contract_files(TOPOLOGY).items():
        path = committed / rel
        assert path.exists(), f"{rel} is missing; {REGENERATE}"
        assert path.read_text() == text, f"{rel} is stale; {REGENERATE}"
    # the repository root links to the packaged copy: one set of files
    assert (REPO / "asyncapi.yaml").resolve() == (committed / "asyncapi.yaml").resolve()
    assert (REPO / "schemas").resolve() == (committed / "schemas").resolve()


def test_the_cli_writes_the_contract(tmp_path, monkeypatch):
    monkeypatch.delenv("HYBRIDRAG_TOPIC_PREFIX", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["schemas", "--out", str(tmp_path)])
    assert e.value.code in (0, None)
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == sorted(contract_files(TOPOLOGY))
    assert (tmp_path / "schemas/query.v1.json").read_text() == (packaged_contract_dir() / "schemas/query.v1.json").read_text()


def test_asyncapi_document_passes_asyncapis_own_parser():
    """@asyncapi/parser (pinned in tests/contract/package.json) reports no error for asyncapi.yaml."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the AsyncAPI parser (npm @asyncapi/parser) needs it")
    assert (HERE / "node_modules/@asyncapi/parser").is_dir(), \
        "the AsyncAPI parser is not installed: npm ci --prefix tests/contract (make test does it)"
    out = subprocess.run([node, str(HERE / "validate_asyncapi.mjs"), str(REPO / "asyncapi.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary == {"ok": True, "channels": 2 * len(TOPOLOGY.topics), "operations": 11, "messages": 6}


def test_the_parser_test_would_catch_a_broken_document(tmp_path):
    """The check is not vacuous: a binding of the wrong type is an error."""
    node = shutil.which("node")
    if node is None or not (HERE / "node_modules/@asyncapi/parser").is_dir():
        pytest.skip("node or the AsyncAPI parser is not installed")
    doc = asyncapi_document(TOPOLOGY)
    doc["channels"]["queries"]["bindings"]["kafka"]["partitions"] = "four"
    bad = tmp_path / "asyncapi.yaml"
    bad.write_text(yaml.safe_dump(doc))
    out = subprocess.run([node, str(HERE / "validate_asyncapi.mjs"), str(bad)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1 and "partitions" in out.stdout


def test_every_channel_has_its_dlq_twin_key_and_prefix():
    doc = asyncapi_document(TOPOLOGY)
    for spec in TOPOLOGY.topics.values():
        for ch_id in (spec.logical, spec.logical + ".dlq"):
            ch = doc["channels"][ch_id]
            assert ch["address"] == "{prefix}" + ch_id and "prefix" in ch["parameters"]
        msg = doc["components"]["messages"][spec.schema.rpartition(".")[2]]
        assert msg["bindings"]["kafka"]["key"]["type"] == "string"
        # queries, answers and generated documents correlate by query_id
        assert ("correlationId" in msg) == ("query_id" in message_models(TOPOLOGY)[msg["name"]].model_fields)
    assert doc["operations"]["receive-queries"]["reply"]["channel"] == {"$ref": "#/channels/answers"}


def _validator(schema: dict) -> jsonschema.Draft202012Validator:
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def test_examples_in_the_document_validate_against_their_schemas():
    doc = asyncapi_document(TOPOLOGY)
    models = message_models(TOPOLOGY)
    for name, msg in doc["components"]["messages"].items():
        validator = _validator(json_schema(models[name]))
        assert msg["examples"], name
        for ex in msg["examples"]:
            validator.validate(ex["payload"])


def test_the_json_schema_refuses_what_the_worker_refuses():
    """The schemas carry the worker's checks that JSON Schema can say: types, id pattern, non-blank text."""
    validator = _validator(json_schema(S.Query))
    for bad in ({"query_id": "a b", "text": "x"}, {"query_id": "a", "text": "   "}, {"query_id": "a", "text": 1},
                {"query_id": "a", "text": "x", "top_k": 0}, {"query_id": "a", "text": "x", "schema_version": 2},
                {"text": "x"}):
        assert not validator.is_valid(bad), bad
        with pytest.raises(S.MessageError):
            S.decode(S.Query, orjson.dumps(bad), max_bytes=10_000)
    assert validator.is_valid({"query_id": "a", "text": "x", "from_a_newer_client": True})


# --- safe evolution -------------------------------------------------------------------------------

def released_versions() -> list[Path]:
    return sorted(RELEASED.glob("*.v*.json"), key=lambda p: p.name)


def test_every_current_version_has_a_released_schema():
    """A bumped schema_version must be released too (copied into tests/contract/released) to be compared against."""
    released = {p.stem for p in released_versions()}
    for model in message_models(TOPOLOGY).values():
        assert file_stem(model) in released, (
            f"{file_stem(model)} is not released: cp schemas/{file_stem(model)}.json tests/contract/released/")


def test_current_models_are_compatible_with_their_released_version():
    """Within a schema_version a message only gains optional fields: a removed, retyped or newly required
    field fails here, unless the model's schema_version was bumped (then it is compared with its own release)."""
    for model in message_models(TOPOLOGY).values():
        released = json.loads((RELEASED / f"{file_stem(model)}.json").read_text())
        problems = breaking_changes(released, json_schema(model))
        assert not problems, f"{model.__name__} breaks {file_stem(model)}: {problems}; bump its schema_version"


def test_records_of_every_released_version_still_decode():
    """What a client of each released version wrote is still read by this code (and valid for its schema)."""
    models = {m.__name__: m for m in message_models(TOPOLOGY).values()}
    by_kebab = {file_stem(m).split(".v")[0]: m for m in models.values()}
    files = sorted(RELEASED.glob("examples.v*.json"))
    assert files
    for path in files:
        for stem, records in json.loads(path.read_text()).items():
            validator = _validator(json.loads((RELEASED / f"{stem}.json").read_text()))
            for record in records:
                validator.validate(record)
                S.decode(by_kebab[stem.split(".v")[0]], orjson.dumps(record), max_bytes=1 << 20)


class QueryWithPriority(S.Query):
    priority: int = 0  # an optional field: compatible


class QueryWithRequiredPriority(S.Query):
    priority: int  # a required field: a v1 writer does not send it


class QueryTextRetyped(S.Query):
    text: list[str]


class QueryTopKNarrowed(S.Query):
    top_k: Optional[int] = Field(default=None, ge=1, le=5)


def _without(model, field: str) -> dict:
    schema = json_schema(model)
    schema["properties"].pop(field)
    schema["required"] = [r for r in schema.get("required", []) if r != field]
    return schema


def test_the_rules_allow_an_optional_field_and_refuse_the_rest():
    v1 = json_schema(S.Query)
    assert breaking_changes(v1, json_schema(QueryWithPriority)) == []
    assert breaking_changes(v1, json_schema(QueryWithRequiredPriority)) == ["priority: a new required field"]
    assert breaking_changes(v1, _without(S.Query, "tenant")) == ["tenant: removed"]
    [retyped] = breaking_changes(v1, json_schema(QueryTextRetyped))
    assert retyped.startswith("text: changed from")
    [narrowed] = breaking_changes(v1, json_schema(QueryTopKNarrowed))
    assert narrowed.startswith("top_k: changed from")


def test_the_rules_look_inside_nested_messages():
    class SourceWithoutScore(S.Source):
        score: str = ""

    class AnswerNewSource(S.Answer):
        sources: list[SourceWithoutScore]

    problems = breaking_changes(json_schema(S.Answer), json_schema(AnswerNewSource))
    assert problems and problems[0].startswith("sources[].score: changed"), problems
    assert "sources[].score: " in problems[0]


def test_a_newer_client_with_an_unknown_field_is_read_not_dead_lettered():
    newer = {**json.loads((RELEASED / "examples.v1.json").read_text())["query.v1"][1], "priority": 3}
    assert S.decode(S.Query, orjson.dumps(newer), max_bytes=1 << 20).query_id == newer["query_id"]


def test_the_documents_operations_are_the_workers():
    """What the document says the worker receives and sends is what its agents subscribe to and send to."""
    import importlib
    import inspect
    import re

    from hybridrag.agents import app as worker_app
    from hybridrag.agents.kafka.contract import RECEIVES, SENDS

    logical = {spec.name: spec.logical for spec in worker_app.topology.topics.values()}
    modules = [importlib.import_module(m) for m in worker_app.AGENT_MODULES]
    received = {logical[t] for agent in worker_app.app.agents.values() for t in agent.channel.topics}
    sent = {logical[getattr(worker_app, var).get_topic_name()]
            for mod in modules for var in re.findall(r"\b(\w+_topic)\.send\(", inspect.getsource(mod))}
    assert set(RECEIVES) == received and set(SENDS) == sent, (received, sent)
