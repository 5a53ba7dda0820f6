"""Expected failures of the command line: one line on stderr that names the cause and the fix.

Every command runs inside ``report_errors``: an error a person can act on
(the broker is unreachable, a setting is out of range, an input file is a PDF)
prints as ``hybridrag: <cause>. Fix: <what to do>`` and exits with its code;
anything else is a bug, printed as one line that asks for ``--debug``, which
shows the traceback.

Exit codes (``EXIT_CODES``; the README's "Exit codes" table is the same):
0 success, 1 not answered, 2 bad usage/setting/input file, 3 broker, 4 Redis,
5 Milvus, 70 a bug.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from pathlib import Path

EXIT_CODES = {
    0: "success",
    1: "the query was not answered: no answer in time, or the worker dead-lettered it (the reason is printed)",
    2: "bad usage, setting or input file",
    3: "the Kafka broker is unreachable, or the embedded broker is not installed",
    4: "Redis is unreachable",
    5: "Milvus: the Lite file's folder is not writable, or the server is unreachable",
    70: "an unexpected error (a bug): rerun with --debug and report the traceback",
}

NOT_ANSWERED, BAD_INPUT, BROKER, REDIS, MILVUS, BUG = 1, 2, 3, 4, 5, 70


@dataclass
class CliError(Exception):
    """An expected failure: what went wrong, what to do about it, and the exit code."""

    cause: str
    fix: str
    code: int

    def __str__(self) -> str:
        return f"{self.cause.rstrip('.')}. Fix: {self.fix}"


def env_name(field: str) -> str:
    """The environment variable a user sets for a settings field (the conventional one where there is one)."""
    from pydantic import AliasChoices

    from hybridrag.agents.settings import Settings

    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info else None
    if isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str):
        return alias.choices[0]
    return f"HYBRIDRAG_{field.upper()}"


def explain(exc: BaseException, settings=None) -> CliError | None:
    """The expected failure ``exc`` stands for, or None for a bug."""
    if isinstance(exc, CliError):
        return exc
    from pydantic import ValidationError

    if isinstance(exc, ValidationError) and exc.title == "Settings":
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        return CliError(f"bad setting {env_name(field)}={err.get('input')!r}: {err['msg']}{more}",
                        f"change or unset {env_name(field)} (`hybridrag settings --markdown` lists every setting)",
                        BAD_INPUT)
    from hybridrag.agents.kafka.broker import EmbeddedBrokerMissing

    if isinstance(exc, EmbeddedBrokerMissing):
        return CliError("the embedded broker is not installed",
                        "pip install 'hybridrag[embedded]', or set KAFKA_BOOTSTRAP_SERVERS to your Kafka", BROKER)
    bootstrap = getattr(settings, "kafka_bootstrap_servers", "") or "KAFKA_BOOTSTRAP_SERVERS"
    try:
        from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError

        if isinstance(exc, (KafkaConnectionError, KafkaTimeoutError)):
            return CliError(f"cannot reach the Kafka broker at {bootstrap} ({exc})", broker_fix(), BROKER)
    except ImportError:  # pragma: no cover
        pass
    try:
        import redis

        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
            url = getattr(settings, "redis_url", "REDIS_URL")
            return CliError(f"cannot reach Redis at {redact(url)} ({exc})",
                            "start Redis (redis-server --daemonize yes) or point REDIS_URL at it", REDIS)
    except ImportError:  # pragma: no cover
        pass
    try:
        from pymilvus.exceptions import MilvusException

        if isinstance(exc, MilvusException):
            uri = getattr(settings, "milvus_uri", "HYBRIDRAG_MILVUS_URI")
            return CliError(f"Milvus at {uri} failed: {getattr(exc, 'message', exc)}",
                            "check that the Milvus server runs, or set HYBRIDRAG_MILVUS_URI to a writable .db path", MILVUS)
    except ImportError:  # pragma: no cover
        pass
    return None


def broker_fix() -> str:
    return "start Kafka, or point KAFKA_BOOTSTRAP_SERVERS at a running broker (host:port,...)"


def redact(url: str) -> str:
    """A URL without its password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def check_broker_reachable(bootstrap: str, timeout_s: float = 3.0) -> None:
    """Fail fast, in one line, when no bootstrap server accepts a TCP connection."""
    errors = []
    for server in [s.strip() for s in bootstrap.split(",") if s.strip()]:
        host, _, port = server.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout=timeout_s):
                return
        except (OSError, ValueError) as e:
            errors.append(f"{server}: {getattr(e, 'strerror', None) or e}")
    raise CliError(f"cannot reach the Kafka broker at {bootstrap} ({'; '.join(errors)})", broker_fix(), BROKER)


def check_milvus_path(uri: str) -> None:
    """A Milvus Lite file must be creatable: its folder exists (or can be made) and is writable."""
    if "://" in uri:
        return  # a server: the worker reports it when it connects
    folder = Path(uri).expanduser().resolve().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".hybridrag-write-test-{id(folder)}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise CliError(f"the Milvus Lite file {uri} cannot be written: {folder} is not writable or cannot be created "
                       f"({e.strerror or e})",
                       "set HYBRIDRAG_MILVUS_URI to a path in a writable folder (or HYBRIDRAG_DATA_DIR)", MILVUS) from None


def print_error(err: CliError) -> None:
    print(f"hybridrag: {err}", file=sys.stderr)


def print_bug(exc: BaseException) -> None:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    print(f"hybridrag: unexpected {type(exc).__name__}{': ' + first if first else ''}. "
          f"Fix: rerun with --debug for the traceback, and report it", file=sys.stderr)
