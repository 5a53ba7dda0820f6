"""``hybridrag``: run the worker, create topics, ingest, ask, and run the demo."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(help="Event-driven RAG on Kafka.", no_args_is_help=True, add_completion=False)
topics_app = typer.Typer(help="Topics from topics.yaml.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"hybridrag {version('hybridrag')}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the installed version and exit.")) -> None:
    """Event-driven RAG on Kafka."""


def _settings(**overrides):
    from hybridrag.agents.settings import Settings

    env = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**env)


def _need_broker(settings) -> None:
    if not settings.kafka_bootstrap_servers:
        typer.secho(
            "KAFKA_BOOTSTRAP_SERVERS is not set. Point it at your Kafka cluster, "
            "or run `make demo` for the embedded broker.", fg="red", err=True,
        )
        raise typer.Exit(2)


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
def worker(create: bool = typer.Option(True, help="Create missing topics before joining the group.")) -> None:
    """Run the Faust worker (same as `faust -A hybridrag.agents.app worker`)."""
    s = _settings()
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
    from hybridrag.agents.cli.output import print_answer
    from hybridrag.agents.kafka.client import AnswerTimeout, Client, answer_to_json

    s = _settings()
    _need_broker(s)
    try:
        ans = Client(s).ask(" ".join(question), timeout_s=timeout, tenant=tenant, top_k=top_k)
    except AnswerTimeout as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(1)
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

    from hybridrag.agents.kafka.client import AsyncClient
    from hybridrag.agents.rag.ingest_files import iter_documents

    s = _settings()
    _need_broker(s)

    async def go() -> int:
        async with AsyncClient(s) as c:
            return await c.publish_documents(tqdm(iter_documents(path, tenant=tenant), desc="publishing", unit="doc"))

    n = asyncio.run(go())
    typer.echo(f"published {n} documents to {s.topology['documents'].name}")


@app.command()
def reindex(
    encoder: str = typer.Option(..., help="Encoder to serve: original or hybrid."),
    checkpoint: str = typer.Option("", help="Hybrid checkpoint; empty means the shipped default."),
) -> None:
    """Switch a running deployment to another encoder: the worker re-indexes, then swaps the alias.

    Publishes an ``encoder-promoted`` event to ``retention-updates``, the same
    event the continual learner publishes. Also the way to roll back.
    """
    from hybridrag.agents.kafka.client import AsyncClient
    from hybridrag.models.encoders import load_encoder
    from hybridrag.agents.kafka.schemas import RetentionUpdate, encode

    s = _settings()
    _need_broker(s)
    if encoder not in ("original", "hybrid"):
        raise typer.BadParameter(f"{encoder} is not a valid encoder (original, hybrid)")
    if encoder == "hybrid":
        from hybridrag.models.hybrid_encoder import DEFAULT_CHECKPOINT

        checkpoint = str(Path(checkpoint or DEFAULT_CHECKPOINT).resolve())
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


def _register_subapps() -> None:
    """Sub-commands that live with the code they drive (evaluation, training, memory, synthesis)."""
    import importlib

    for module, name in [
        ("hybridrag.agents.cli.eval_cli", None),
        ("hybridrag.models.train_encoder", "train"),
        ("hybridrag.agents.cli.memory_cli", "memory"),
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


def main() -> None:
    logging.basicConfig(level=os.environ.get("HYBRIDRAG_LOG_LEVEL", "WARNING").upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    _register_subapps()
    app()


if __name__ == "__main__":
    main()
