"""The topics as a contract: JSON Schemas of every message and an AsyncAPI 3 document.

Both are generated from the pydantic models (``schemas.py``) and ``topics.yaml``,
so neither can say something the worker does not do. ``hybridrag schemas``
writes them; the committed copies live in ``agents/resources/contract`` (shipped
in the wheel; ``asyncapi.yaml`` and ``schemas/`` at the repository root link
there), and a test fails when a model changes and they were not regenerated.

- https://www.asyncapi.com/docs/reference/specification/v3.0.0
- https://json-schema.org/draft/2020-12 (what pydantic writes; AsyncAPI's own
  schema format is a superset of draft 7, which these schemas stay within)

The compatibility rules (``breaking_changes``): within one ``schema_version`` a
message may only gain optional fields. Removing a field, changing its type or
constraints, or making a field required is a breaking change, and needs the
model's ``schema_version`` bumped.
"""

from __future__ import annotations

import importlib
import json
import re
from importlib import resources
from importlib.metadata import version as package_version
from pathlib import Path

import yaml
from pydantic import BaseModel

from hybridrag.agents.kafka import schemas as S
from hybridrag.agents.kafka.topology import Topology

DRAFT = "https://json-schema.org/draft/2020-12/schema"
KAFKA_BINDING = "0.5.0"
COMPONENT_REF = "#/components/schemas/{model}"
# keywords that document a field without changing which values it accepts
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment"})


def message_models(topology: Topology) -> dict[str, type[BaseModel]]:
    """Every message on the bus by class name: each topic's schema, and the dead letter of every ``.dlq``."""
    out: dict[str, type[BaseModel]] = {}
    for spec in topology.topics.values():
        module, _, name = spec.schema.rpartition(".")
        out[name] = getattr(importlib.import_module(module), name)
    out["DeadLetter"] = S.DeadLetter
    return out


def file_stem(model: type[BaseModel]) -> str:
    """``GeneratedDocument`` v1 -> ``generated-document.v1``."""
    kebab = re.sub(r"(?<!^)(?=[A-Z])", "-", model.__name__).lower()
    return f"{kebab}.v{S.schema_version_of(model)}"


def schema_id(model: type[BaseModel]) -> str:
    """A versioned URN: a name to compare and cache by, never a location anything fetches."""
    return f"urn:hybridrag:schema:{file_stem(model).replace('.v', ':v')}"


def json_schema(model: type[BaseModel], ref_template: str = "#/$defs/{model}") -> dict:
    """The JSON Schema of what the worker's decoder accepts for ``model``."""
    body = model.model_json_schema(mode="validation", ref_template=ref_template)
    return {"$schema": DRAFT, "$id": schema_id(model), **body}


def json_schema_files(topology: Topology) -> dict[str, str]:
    """``schemas/<name>.v<N>.json`` -> its text, for every message."""
    return {f"schemas/{file_stem(m)}.json": _dump_json(json_schema(m)) for m in message_models(topology).values()}


def _dump_json(obj: dict) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


# --- examples: built through the models, so an invalid one cannot be written -------------------

def examples() -> dict[str, list[tuple[str, BaseModel]]]:
    """Named example payloads of every message (they go into the AsyncAPI document)."""
    source = S.Source(doc_id="handbook-7", chunk=0, chunk_id="handbook-7#0", score=0.71, title="Memory",
                      text="Virtual memory gives each process its own address space.")
    return {
        "Query": [("minimal", S.Query(query_id="q-42", text="What is virtual memory?")),
                  ("full", S.Query(query_id="q-43", text="What is a page fault?", top_k=3, tenant="acme",
                                   include_synthetic=False, sent_at=1764000000.0))],
        "Document": [("minimal", S.Document(doc_id="handbook-7", text="Virtual memory gives each process ...")),
                     ("full", S.Document(doc_id="acme:faq-1", text="Refunds take five days.", title="Refunds",
                                         tenant="acme", metadata={"lang": "en"}))],
        "Answer": [("confident", S.Answer(
            query_id="q-42", answer="Virtual memory gives each process its own address space. [1]",
            sources=[source], confident=True, encoder_version="minilm-l6-v2", generator="extractive",
            timings_ms={"buffer_wait": 9.1, "encode": 16.0, "search": 4.2, "fine": 0.0, "generate": 0.3,
                        "compute": 21.0}, batch_size=8, worker="worker-1", answered_at=1764000000.1))],
        "GeneratedDocument": [("kept", S.GeneratedDocument(
            query_id="q-42", query="What is virtual memory?", doc_id="synth:q-42:text:0",
            text="Virtual memory maps pages to frames.", kept=True,
            scores={"query_similarity": 0.61, "max_store_similarity": 0.83},
            model_versions={"text": "text-diffusion-1"}, encoder_version="minilm-l6-v2"))],
        "RetentionUpdate": [("promoted", S.RetentionUpdate(
            kind="encoder-promoted", encoder_version="hybrid-2", metrics={"canary_base": 0.31, "canary_new": 0.32},
            checkpoint="/data/checkpoints/hybrid-2.pt", detail="canary passed", at=1764000000.0))],
        "DeadLetter": [("validation", S.DeadLetter(
            reason="wrong schema: text: Input should be a valid string", error_type="validation",
            source_topic="queries", partition=3, offset=1812, key="q-9", original_b64="eyJxdWVyeV9pZCI6InEtOSJ9",
            worker="worker-1", failed_at=1764000000.0))],
    }


# --- the AsyncAPI document ----------------------------------------------------------------------

def _key_schema(model: type[BaseModel], key_field: str) -> dict:
    prop = model.model_json_schema(mode="validation")["properties"][key_field]
    keep = {k: v for k, v in prop.items() if k not in ANNOTATIONS}
    return {**keep, "description": f"The record's key: the message's {key_field}, as UTF-8."}


def _message(name: str, model: type[BaseModel], key: dict, correlated: bool, key_field: str = "") -> dict:
    stem = file_stem(model)
    doc = " ".join((model.__doc__ or name).split())
    msg = {
        "name": name,
        "title": name,
        "summary": doc,
        "description": f"JSON Schema: `schemas/{stem}.json` (`$id` {schema_id(model)}). "
                       "The version travels in the body's `schema_version`; no header is needed.",
        "contentType": "application/json",
        "payload": {"$ref": f"#/components/schemas/{name}"},
        # the same schema as the standalone file, for clients that load schemas/*.json by $id
        "x-schema-id": schema_id(model),
        "bindings": {"kafka": {"key": key, "bindingVersion": KAFKA_BINDING}},
        "examples": [{"name": ex_name, "payload": ex.model_dump(mode="json")} for ex_name, ex in examples()[name]],
    }
    if correlated:
        msg["correlationId"] = {"$ref": "#/components/correlationIds/queryId"}
    if key_field:
        msg["x-kafka-key-field"] = key_field  # the payload field whose value is the record's key
    return msg


def _component_schemas(models: dict[str, type[BaseModel]]) -> dict:
    out: dict[str, dict] = {}
    for name, model in models.items():
        body = model.model_json_schema(mode="validation", ref_template=COMPONENT_REF)
        for sub, sub_schema in body.pop("$defs", {}).items():
            out[sub] = sub_schema
        out[name] = body
    return dict(sorted(out.items()))


def _channel(spec, model_name: str, dlq: bool, replication: int, dlq_retention_ms: int) -> dict:
    address = spec.logical + (".dlq" if dlq else "")
    desc = (f"Dead letters of `{spec.logical}`: each record the worker refused, with the reason and the original "
            "bytes, under the original key." if dlq else spec.description)
    config = {"cleanup.policy": ["delete"], "retention.ms": dlq_retention_ms if dlq else spec.retention_ms}
    return {
        "address": "{prefix}" + address,
        "title": address,
        "description": desc,
        "parameters": {"prefix": {"$ref": "#/components/parameters/prefix"}},
        "messages": {model_name: {"$ref": f"#/components/messages/{model_name}"}},
        "bindings": {"kafka": {"partitions": 1 if dlq else spec.partitions, "replicas": replication,
                               "topicConfiguration": config, "bindingVersion": KAFKA_BINDING}},
    }


# which topics the worker consumes and produces (agents/*.py): the operations of the document
RECEIVES = ("documents", "queries", "generated-documents", "retention-updates")
SENDS = ("answers", "generated-documents", "retention-updates")


def _operations(topology: Topology, names: dict[str, str]) -> dict:
    def ref(logical: str, dlq: bool = False) -> dict:
        return {"$ref": f"#/channels/{logical}{'.dlq' if dlq else ''}"}

    def msg(logical: str, dlq: bool = False) -> list:
        name = "DeadLetter" if dlq else names[logical]
        return [{"$ref": f"#/channels/{logical}{'.dlq' if dlq else ''}/messages/{name}"}]

    ops: dict[str, dict] = {}
    for logical in RECEIVES:
        op = {"action": "receive", "channel": ref(logical), "messages": msg(logical),
              "summary": f"The worker consumes `{logical}` (consumer group HYBRIDRAG_APP_ID)."}
        if logical == "queries":
            op["reply"] = {"channel": ref("answers"), "messages": msg("answers")}
            op["summary"] += " Each query is answered on `answers` under the same key and query_id."
        ops[f"receive-{logical}"] = op
    for logical in SENDS:
        ops[f"send-{logical}"] = {"action": "send", "channel": ref(logical), "messages": msg(logical),
                                  "summary": f"The worker produces `{logical}`."}
    for logical in RECEIVES:
        ops[f"send-{logical}-dlq"] = {"action": "send", "channel": ref(logical, True), "messages": msg(logical, True),
                                      "summary": f"A `{logical}` record the worker refused goes here, with the reason."}
    return ops


INFO = """\
hybridrag answers questions from the documents it indexed, over Kafka: a client
produces a `Query` to `queries`, keyed by its `query_id`, and consumes the
`Answer` with the same key and `query_id` from `answers`; a query the worker
refuses arrives on `queries.dlq` under the same key, with the reason.

Every topic name carries the deployment's prefix (`HYBRIDRAG_TOPIC_PREFIX`,
the `prefix` parameter; empty by default). Every message is a JSON object
(UTF-8) whose body carries `schema_version`, the major version of its schema;
it may be left out on input and then means the current one.

Compatibility: fields a reader does not know are ignored, so a message may gain
optional fields within a version. Removing or retyping a field, or making one
required, bumps `schema_version`; a worker refuses (dead-letters) versions it
does not read.
"""


def asyncapi_document(topology: Topology, prefix_default: str = "") -> dict:
    """The AsyncAPI 3.0 document of the service, as a dict ready for YAML."""
    models = message_models(topology)
    names = {spec.logical: spec.schema.rpartition(".")[2] for spec in topology.topics.values()}
    channels, messages = {}, {}
    for spec in topology.topics.values():
        name = names[spec.logical]
        channels[spec.logical] = _channel(spec, name, False, spec.replication_factor, topology.dlq_retention_ms)
        channels[spec.logical + ".dlq"] = _channel(spec, "DeadLetter", True, spec.replication_factor,
                                                   topology.dlq_retention_ms)
        key_field = spec.key
        messages[name] = _message(name, models[name], _key_schema(models[name], key_field),
                                  correlated="query_id" in models[name].model_fields, key_field=key_field)
    messages["DeadLetter"] = _message("DeadLetter", S.DeadLetter, {
        "type": ["string", "null"], "description": "The refused record's own key, unchanged."}, correlated=False)
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "hybridrag", "version": package_version("hybridrag"), "description": INFO,
                 "license": {"name": "Apache-2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"}},
        "defaultContentType": "application/json",
        "servers": {"kafka": {
            "host": "{bootstrap}", "protocol": "kafka",
            "description": "Your Kafka cluster (KAFKA_BOOTSTRAP_SERVERS), or the embedded broker of `make demo`.",
            "variables": {"bootstrap": {"default": "localhost:9092", "description": "host:port of a broker."}}}},
        "channels": channels,
        "operations": _operations(topology, names),
        "components": {
            "schemas": _component_schemas(models),
            "messages": messages,
            "parameters": {"prefix": {
                "description": "HYBRIDRAG_TOPIC_PREFIX: prefixed to every topic name, one deployment per prefix.",
                "default": prefix_default, "examples": ["", "staging-"]}},
            "correlationIds": {"queryId": {
                "description": "A query and its answer carry the same query_id (and the same record key).",
                "location": "$message.payload#/query_id"}},
        },
    }


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings as ``|`` blocks, so the document's prose reads as prose."""


def _str(dumper: yaml.SafeDumper, value: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_BlockDumper.add_representer(str, _str)


def asyncapi_yaml(topology: Topology, prefix_default: str = "") -> str:
    head = "# Generated by `hybridrag schemas` from topics.yaml and agents/kafka/schemas.py: edit those, then regenerate.\n"
    return head + yaml.dump(asyncapi_document(topology, prefix_default), Dumper=_BlockDumper, sort_keys=False,
                            allow_unicode=True, width=110)


def contract_files(topology: Topology, prefix_default: str = "") -> dict[str, str]:
    """Every file of the contract, relative path -> text: ``asyncapi.yaml`` and ``schemas/*.json``."""
    return {"asyncapi.yaml": asyncapi_yaml(topology, prefix_default), **json_schema_files(topology)}


def write_contract(out: Path, topology: Topology, prefix_default: str = "") -> list[Path]:
    written = []
    for rel, text in contract_files(topology, prefix_default).items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def packaged_contract_dir() -> Path:
    """The committed contract inside the installed package."""
    return Path(str(resources.files("hybridrag.agents").joinpath("resources/contract")))


# --- broker-side validation (Tansu's --schema-registry file://DIR) ------------------------------

def write_broker_schemas(out: Path, topology: Topology) -> list[Path]:
    """One ``<topic>.json`` per topic and dead-letter topic, in the layout Tansu reads.

    Tansu validates a record's value against ``properties.value`` (and its key
    against ``properties.key``, parsed as JSON: our keys are plain strings, so
    no key schema is given). A batch with an invalid record is refused whole,
    with the Kafka error INVALID_RECORD.
    """
    out.mkdir(parents=True, exist_ok=True)
    models = message_models(topology)
    written = []
    for spec in topology.topics.values():
        name = spec.schema.rpartition(".")[2]
        for topic, model in ((spec.name, models[name]), (spec.dlq, S.DeadLetter)):
            path = out / f"{topic}.json"
            path.write_text(_dump_json({"type": "object", "properties": {"value": json_schema(model)}}))
            written.append(path)
    return written


# --- the compatibility rules --------------------------------------------------------------------

def _resolve(node: dict, root: dict) -> dict:
    while "$ref" in node:
        ref = node["$ref"]
        if not ref.startswith("#/"):
            raise ValueError(f"only local $refs are compared, got {ref}")
        target = root
        for part in ref[2:].split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _shape(node, root: dict):
    """What a schema accepts, without its annotations and with its $refs inlined (for equality)."""
    if isinstance(node, dict):
        node = _resolve(node, root)
        return {k: _shape(v, root) for k, v in sorted(node.items()) if k not in ANNOTATIONS and k != "$defs"}
    if isinstance(node, list):
        return [_shape(v, root) for v in node]
    return node


def _compare(old: dict, new: dict, old_root: dict, new_root: dict, path: str) -> list[str]:
    old, new = _resolve(old, old_root), _resolve(new, new_root)
    if "properties" in old and "properties" in new:
        problems = []
        for name, o in old["properties"].items():
            if name not in new["properties"]:
                problems.append(f"{path}{name}: removed")
            else:
                problems += _compare(o, new["properties"][name], old_root, new_root, f"{path}{name}.")
        for name in sorted(set(new.get("required", [])) - set(old.get("required", []))):
            what = "a new required field" if name not in old["properties"] else "now required"
            problems.append(f"{path}{name}: {what}")
        rest = ("properties", "required", "$defs", "$id", "$schema")
        old_rest = {k: v for k, v in old.items() if k not in rest}
        new_rest = {k: v for k, v in new.items() if k not in rest}
        if _shape(old_rest, old_root) != _shape(new_rest, new_root):
            problems.append(f"{path.rstrip('.') or 'message'}: object constraints changed")
        return problems
    if old.get("type") == new.get("type") == "array" and "items" in old and "items" in new:
        return _compare(old["items"], new["items"], old_root, new_root, path.rstrip(".") + "[].")
    if _shape(old, old_root) != _shape(new, new_root):
        return [f"{path.rstrip('.')}: changed from {json.dumps(_shape(old, old_root))} "
                f"to {json.dumps(_shape(new, new_root))}"]
    return []


def breaking_changes(old: dict, new: dict) -> list[str]:
    """Why a reader or writer of ``old`` would break on ``new`` (two JSON Schemas); empty when compatible.

    Allowed: new optional fields, new or changed annotations (titles,
    descriptions, defaults). Everything else about an existing field counts.
    """
    return _compare(old, new, old, new, "")
