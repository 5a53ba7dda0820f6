"""The memory manager over TLS with AUTH (``rediss://``), against a real redis-server with TLS on."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid

import pytest
import redis

from hybridrag.agents.kafka.broker import free_port
from hybridrag.agents.retention.memory_manager import DocRecord, MemoryConfig, MemoryManager, MemoryUnavailable

pytestmark = pytest.mark.integration


def _openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def tls_redis(tmp_path):
    """A private redis-server that speaks only TLS and wants a password; yields (port, CA file)."""
    if not shutil.which("openssl") or not shutil.which("redis-server"):
        pytest.skip("needs openssl and redis-server")
    d = tmp_path
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", "server.key", "-out", "server.csr", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "1", "-extfile", "san.ext", "-out", "server.crt", cwd=d)
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--tls-cert-file", "server.crt",
         "--tls-key-file", "server.key", "--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no",
         "--requirepass", "s3cret-pw", "--save", "", "--appendonly", "no"],
        cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"rediss://:s3cret-pw@127.0.0.1:{port}/0?ssl_ca_certs={d / 'ca.crt'}"
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.1)
    yield port, d / "ca.crt"
    proc.kill()
    proc.wait()


def test_memory_manager_over_tls_with_auth(tls_redis):
    """With ``rediss://:password@host/0?ssl_ca_certs=...`` the memory manager records documents
    and reports stats over TLS; a wrong password and a plaintext connection to the TLS port
    both fail with a clear MemoryUnavailable, never a hang."""
    port, ca = tls_redis
    prefix = f"tls-{uuid.uuid4().hex[:8]}"
    good = MemoryManager(MemoryConfig(redis_url=f"rediss://:s3cret-pw@127.0.0.1:{port}/0?ssl_ca_certs={ca}",
                                      prefix=prefix))
    docs = [DocRecord(doc_id=f"d{i}", chunks=1, bytes=100, sample=f"text {i}") for i in range(5)]
    assert good.record_ingest(docs) == 5
    stats = good.stats()
    assert stats["documents"] == 5

    wrong = MemoryManager(MemoryConfig(redis_url=f"rediss://:nope@127.0.0.1:{port}/0?ssl_ca_certs={ca}",
                                       prefix=prefix, socket_timeout_s=2.0))
    with pytest.raises(MemoryUnavailable):
        wrong.stats()
    plain = MemoryManager(MemoryConfig(redis_url=f"redis://:s3cret-pw@127.0.0.1:{port}/0", prefix=prefix,
                                       socket_timeout_s=2.0))
    with pytest.raises(MemoryUnavailable):
        plain.stats()
