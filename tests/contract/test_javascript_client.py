"""A client in another language, from the contract alone, against a real worker."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def test_a_javascript_client_talks_to_the_service_from_asyncapi_and_the_schemas_alone(make_settings, make_worker):
    """node_client.mjs (KafkaJS, Ajv) reads asyncapi.yaml with AsyncAPI's parser and loads schemas/*.json by $id;
    it finds the topics, keys and correlation there, sends the documented examples, and gets every query
    answered with a schema-valid answer, and the one query the schema refuses back on the dead-letter topic
    with the reason. It knows nothing else of the service but the prefix of this test's deployment."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    assert (HERE / "node_modules/kafkajs").is_dir(), "npm ci --prefix tests/contract (make test does it)"
    settings = make_settings()
    make_worker(settings)
    out = subprocess.run([node, str(HERE / "node_client.mjs"), str(REPO / "asyncapi.yaml"), str(REPO / "schemas"),
                          settings.kafka_bootstrap_servers, settings.topic_prefix],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["topics"]["queries"] == settings.topology["queries"].name
    assert summary["answered"] == summary["queries"] == 2 and summary["documents"] == 2
    assert summary["with_sources"] >= 1 and summary["invalid"] == []
    assert summary["bad_is_invalid_locally"]
    [letter] = summary["dead_letters"]
    assert letter["key"] == "js-bad" and "text" in letter["reason"], letter
