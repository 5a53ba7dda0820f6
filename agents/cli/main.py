"""``hybridrag``: run the worker, create topics, ingest, ask, and run the demo.

An expected failure prints one line, its cause and its fix, and exits with a
documented code (``agents/cli/errors.py``); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

EPILOG = ("Exit codes: 0 success, 1 not answered (timeout or rejected), 2 bad usage, setting or input file, "
          "3 Kafka unreachable, 4 Redis unreachable, 5 Milvus, 70 a bug (rerun with --debug).")
app = typer.Typer(help="Event-driven RAG on Kafka.", no_args_is_help=True, add_completion=False, epilog=EPILOG,
                  pretty_exceptions_enable=False)
topics_app = typer.Typer(help="Topics from topics.yaml.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"hybridrag {version('hybridrag')}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the installed version and exit."),
          debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error (also HYBRIDRAG_DEBUG=1).")
          ) -> None:
    """Event-driven RAG on Kafka."""


def _settings(**overrides):
    from hybridrag.agents.settings import Settings

    env = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**env)


def _need_broker(settings) -> None:
    from hybridrag.agents.cli.errors import BAD_INPUT, CliError, check_broker_reachable

    if not settings.kafka_bootstrap_servers:
        raise CliError("KAFKA_BOOTSTRAP_SERVERS is not set",
                       "point it at your Kafka cluster, or run `make demo` for the embedded broker", BAD_INPUT)
    check_broker_reachable(settings.kafka_bootstrap_servers)


@topics_app.command("create")
def topics_create() -> None:
    """Create every topic and dead-letter topic in topics.yaml (idempotent)."""
    from hybridrag.agents.kafka.admin import create_topics

    s = _settings()
    _need_broker(s)
    for name, state in asyncio.run(create_topics(s)).items():
        typer.echo(f"{state:8s} {name}")


@topics_app.command("list")
def topics_list() -> None:
    """Print the topology: names, partitions, retention, schema."""
    s = _settings()
    for spec in s.topology.topics.values():
        typer.echo(f"{spec.name:32s} partitions={spec.partitions} retention_ms={spec.retention_ms} schema={spec.schema} dlq={spec.dlq}")


@app.command()
def schemas(out: Path = typer.Option(Path("."), help="Folder to write asyncapi.yaml and schemas/*.json into.")) -> None:
    """Write the contract: the AsyncAPI 3 document of the topics and the JSON Schema of every message."""
    from hybridrag.agents.kafka.contract import write_contract

    s = _settings()
    for path in write_contract(out, s.topology, prefix_default=s.topic_prefix):
        typer.echo(f"wrote {path}")


@app.command()
def worker(create: bool = typer.Option(True, help="Create missing topics before joining the group.")) -> None:
    """Run the Faust worker (same as `faust -A hybridrag.agents.app worker`)."""
    from hybridrag.agents.cli.errors import check_milvus_path

    s = _settings()
    check_milvus_path(s.milvus_uri)
    _need_broker(s)
    if create:
        from hybridrag.agents.kafka.admin import create_topics

        asyncio.run(create_topics(s))
    from faust import Worker

    from hybridrag.agents.app import app as faust_app

    from hybridrag.agents.kafka.logs import logging_config

    Worker(faust_app, loglevel=s.log_level, quiet=True,
           logging_config=logging_config(s.log_level, s.log_format)).execute_from_commandline()


@app.command()
def ask(
    question: List[str] = typer.Argument(..., help="The question (several words are joined)."),
    timeout: float = typer.Option(60.0, help="Seconds to wait for the answer."),
    tenant: str = typer.Option("", help="Tenant whose documents to search."),
    top_k: Optional[int] = typer.Option(None, help="Sources to return."),
    json_out: bool = typer.Option(False, "--json", help="Print the answer event as JSON."),
) -> None:
    """Publish a query and print its answer."""
    from hybridrag.agents.cli.errors import NOT_ANSWERED, CliError
    from hybridrag.agents.cli.output import print_answer
    from hybridrag.agents.kafka.client import AnswerTimeout, Client, QueryRejected, answer_to_json

    s = _settings()
    _need_broker(s)
    try:
        ans = Client(s).ask(" ".join(question), timeout_s=timeout, tenant=tenant, top_k=top_k)
    except QueryRejected as e:
        raise CliError(str(e), f"shorten or correct the question (limits: `hybridrag settings`); "
                       f"the record is on {s.topology['queries'].dlq}", NOT_ANSWERED) from None
    except AnswerTimeout as e:
        cause, _, fix = str(e).partition(". Is a worker")
        raise CliError(cause, "is a worker running against this broker? Start one with `hybridrag worker`, "
                       "or wait longer with --timeout", NOT_ANSWERED) from None
    if json_out:
        typer.echo(answer_to_json(ans).decode())
    else:
        print_answer(" ".join(question), ans)


@app.command()
def ingest(
    path: Path = typer.Argument(..., help="A .txt, .md or .jsonl file (BEIR corpus.jsonl works), or a directory."),
    tenant: str = typer.Option("", help="Tenant (namespace) of these documents."),
) -> None:
    """Publish documents to the `documents` topic."""
    from tqdm import tqdm

    from hybridrag.agents.cli.errors import BAD_INPUT, CliError
    from hybridrag.agents.kafka.client import AsyncClient
    from hybridrag.agents.rag.ingest_files import FileFormatError, count_documents, iter_documents

    s = _settings()
    # every file and line is checked before connecting: a bad line publishes nothing
    try:
        total = count_documents(path, tenant=tenant)
    except FileNotFoundError:
        raise CliError(f"{path} does not exist", "give a .txt, .md or .jsonl file, or a folder of them", BAD_INPUT) from None
    except FileFormatError as e:
        raise CliError(str(e), "fix or remove that file, then ingest again (nothing was published)", BAD_INPUT) from None
    _need_broker(s)

    async def go() -> int:
        async with AsyncClient(s) as c:
            return await c.publish_documents(tqdm(iter_documents(path, tenant=tenant), total=total,
                                                  desc="publishing", unit="doc"))

    n = asyncio.run(go())
    typer.echo(f"published {n} documents to {s.topology['documents'].name}")


@app.command()
def reindex(
    encoder: str = typer.Option(..., help="Encoder to serve: hybrid, hybrid-fast or original."),
    checkpoint: str = typer.Option("", help="Hybrid checkpoint; empty means the shipped default."),
) -> None:
    """Switch a running deployment to another encoder: the worker re-indexes, then swaps the alias.

    Publishes an ``encoder-promoted`` event to ``retention-updates``, the same
    event the continual learner publishes. Also the way to roll back.
    """
    from hybridrag.agents.kafka.client import AsyncClient
    from hybridrag.models.encoders import load_encoder
    from hybridrag.agents.kafka.schemas import RetentionUpdate, encode

    from hybridrag.agents.cli.errors import BAD_INPUT, CliError
    from hybridrag.models.encoders import ENCODER_NAMES

    if encoder not in ENCODER_NAMES:
        raise CliError(f"{encoder} is not an encoder", f"pass --encoder {' | '.join(ENCODER_NAMES)}", BAD_INPUT)
    s = _settings()
    _need_broker(s)
    if encoder != "original":
        from hybridrag.models.hybrid_encoder import checkpoint_path

        checkpoint = str(checkpoint_path(checkpoint or encoder).resolve())
    version = load_encoder(encoder, checkpoint=checkpoint or None).version
    update = RetentionUpdate(kind="encoder-promoted", encoder_version=version, checkpoint=checkpoint,
                             detail="promoted by hand (hybridrag reindex)")
    topic = s.topology["retention-updates"].name

    async def go() -> None:
        async with AsyncClient(s) as c:
            await c.publish_raw(topic, encode(update), key=version.encode())

    asyncio.run(go())
    typer.echo(f"published encoder-promoted {version} to {topic}; the worker re-indexes, then swaps")


@app.command("settings")
def settings_cmd(markdown: bool = typer.Option(False, help="Print the README's Markdown table.")) -> None:
    """Print every setting with its environment variable and current value (secrets hidden)."""
    from hybridrag.agents.settings import Settings, settings_table

    if markdown:
        typer.echo(settings_table())
        return
    s = Settings()
    for name in Settings.model_fields:
        typer.echo(f"{name:28s} {getattr(s, name)}")


@app.command()
def demo(
    questions: Optional[Path] = typer.Option(None, help="JSONL of {\"question\": ...}; defaults to the shipped questions."),
    corpus: Optional[Path] = typer.Option(None, help="Corpus to ingest; defaults to the shipped demo corpus."),
) -> None:
    """Start the embedded stack, ingest the demo corpus through Kafka and answer questions."""
    from hybridrag.agents.cli.demo import run_demo

    sys.exit(run_demo(questions=questions, corpus=corpus))


@functools.cache  # main() may run more than once in a process (the tests)
def _register_subapps() -> None:
    """Sub-commands that live with the code they drive (evaluation, training, memory, synthesis)."""
    import importlib

    for module, name in [
        ("hybridrag.agents.cli.eval_cli", None),
        ("hybridrag.models.train_encoder", "train"),
        ("hybridrag.agents.cli.memory_cli", "memory"),
        ("hybridrag.agents.cli.adapt", "adapt"),
        ("hybridrag.agents.synthesis.synthesizer", "synth"),
    ]:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and (module == e.name or module.startswith(e.name + ".")):
                continue  # that part is not in this checkout
            raise
        sub = getattr(mod, "app", None)
        if sub is None:
            continue
        if name and callable(getattr(mod, name, None)) and len(sub.registered_commands) == 1:
            # a single command reads `hybridrag synth "query"`, not `hybridrag synth synth "query"`
            app.command(name)(getattr(mod, name))
            continue
        if name is None:
            app.add_typer(sub)
        else:
            app.add_typer(sub, name=name)


def main(argv: Optional[List[str]] = None) -> None:
    """Run the command line; an expected failure is one line on stderr and its exit code."""
    from hybridrag.agents.cli.errors import BUG, explain, print_bug, print_error

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("HYBRIDRAG_DEBUG", "") not in ("", "0")
    if debug and "--debug" in args:
        args.remove("--debug")  # accepted anywhere, not only before the command
    level = os.environ.get("HYBRIDRAG_LOG_LEVEL", "WARNING").upper()
    # a bad level is reported by the settings, in one line, when a command loads them
    logging.basicConfig(level=level if level in logging.getLevelNamesMapping() else "WARNING",
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if not debug:
        # the clients' own retry chatter would bury the one line that says what to do
        for noisy in ("aiokafka", "kafka", "faust", "mode"):
            logging.getLogger(noisy).setLevel(logging.CRITICAL)
    _register_subapps()
    try:
        app(args=args, prog_name="hybridrag")
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the one place every failure is reported
        if debug or isinstance(exc, KeyboardInterrupt):
            raise
        err = explain(exc, _settings_or_none())
        if err is None:
            print_bug(exc)
            sys.exit(BUG)
        print_error(err)
        sys.exit(err.code)


def _settings_or_none():
    """The settings, for naming the broker or Redis in an error; None when they are themselves the error."""
    try:
        return _settings()
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    main()
