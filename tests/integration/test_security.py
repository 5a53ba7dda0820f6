"""Secrets never reach logs, errors, dead letters or answers."""

import asyncio
import http.server
import subprocess
import sys
import threading

import orjson
import pytest

from hybridrag.agents.kafka.client import AsyncClient
from hybridrag.agents.kafka.schemas import Query
from tests.conftest import read_topic, run, settings_env

pytestmark = pytest.mark.integration
KEY = "sk-TOPSECRET-1234567890"
PASSWORD = "kafka-PASSWORD-0987"


class EchoingEndpoint(http.server.BaseHTTPRequestHandler):
    """A chat endpoint that rejects the call and, carelessly, echoes the key in its error body."""

    def do_POST(self):
        body = orjson.dumps({"error": f"bad key {self.headers.get('Authorization')}"})
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_api_key_stays_out_of_logs_dead_letters_and_cli(make_settings, make_worker):
    """A worker whose chat endpoint rejects every call dead-letters the queries; the key it
    sent appears in none of: the worker's log, the DLQ records, `hybridrag settings`."""
    server = http.server.HTTPServer(("127.0.0.1", 0), EchoingEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = make_settings(generator="openai", openai_base_url=f"http://127.0.0.1:{server.server_port}/v1",
                             openai_model="m", openai_api_key=KEY, retry_attempts=1, log_level="debug")
    worker = make_worker(settings)
    from hybridrag.agents.kafka.schemas import Document

    async def go():
        async with AsyncClient(settings) as c:
            await c.publish_documents([Document(doc_id="d1", text="A compiler translates programs.")])
            await asyncio.sleep(3)
            await c.submit(Query(query_id="s1", text="What is a compiler?"))
            await c.producer.flush()

    worker.wait_ready()
    run(go())
    records = run(read_topic(settings, settings.topology["queries"].dlq, expect=1, timeout_s=90))
    server.shutdown()
    assert records, worker.log_tail()
    dead = orjson.loads(records[0].value)
    assert "HTTP 401" in dead["reason"]
    assert KEY not in records[0].value.decode()
    worker.stop()
    assert KEY not in worker.log_path.read_text(errors="replace")
    env = settings_env(settings) | {"HYBRIDRAG_KAFKA_SASL_PASSWORD": PASSWORD}
    out = subprocess.run([sys.executable, "-m", "hybridrag.agents.cli.main", "settings"], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "openai_api_key" in out.stdout
    assert KEY not in out.stdout + out.stderr and PASSWORD not in out.stdout + out.stderr
