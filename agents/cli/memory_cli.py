"""``hybridrag memory``: inspect the memory manager's Redis state.

Registered in agents/cli/main.py with ``app.add_typer(memory_app, name="memory")``.
Eviction and recovery need the vector store, which Milvus Lite lets only one
process open, so the worker runs them (``recover`` at start-up, ``evict`` after
ingest batches) rather than this CLI.
"""

from __future__ import annotations

import json
import time

import typer

app = typer.Typer(help="The memory manager (Redis): size, hit rates, evictions, important documents.",
                  no_args_is_help=True)


def _manager():
    from hybridrag.agents.retention.memory_manager import MemoryConfig, MemoryManager
    from hybridrag.agents.settings import Settings

    return MemoryManager(MemoryConfig.from_settings(Settings()))


def _unavailable(exc: Exception) -> None:
    from hybridrag.agents.cli.errors import REDIS, CliError

    raise CliError(f"the memory manager's Redis is unavailable ({exc})",
                   "start Redis (redis-server --daemonize yes) or point REDIS_URL at it", REDIS) from None


@app.command()
def stats(json_out: bool = typer.Option(False, "--json", help="Print the stats as JSON.")) -> None:
    """Size, bytes, hit rate and evictions by policy."""
    from hybridrag.agents.retention.memory_manager import MemoryUnavailable

    try:
        s = _manager().stats()
    except MemoryUnavailable as exc:
        _unavailable(exc)
    if json_out:
        typer.echo(json.dumps(s, indent=2))
        return
    cap = lambda v: "no limit" if not v else f"{v:,}"  # noqa: E731
    lines = [
        ("prefix", s["prefix"]),
        ("policy", s["policy"]),
        ("documents", f"{s['documents']:,} (capacity {cap(s['capacity_docs'])})"),
        ("bytes", f"{s['bytes']:,} (capacity {cap(s['capacity_bytes'])})"),
        ("queries", f"{s['queries']:,}"),
        ("hit rate", f"{s['hit_rate']:.1%} of queries had confident context"),
        ("cite rate", f"{s['cite_rate']:.1%} of retrieved documents were cited"),
        ("evictions", ", ".join(f"{p} {n:,}" for p, n in s["evictions"].items())
         + f" ({s['evicted_bytes']:,} bytes)"),
        ("pending evictions", str(s["pending_evictions"])),
        ("query patterns", f"{s['patterns']:,}"),
    ]
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        typer.echo(f"{k:<{width}}  {v}")


@app.command()
def top(n: int = typer.Option(10, help="How many documents.")) -> None:
    """The most important documents now."""
    from hybridrag.agents.retention.memory_manager import MemoryUnavailable

    try:
        docs = _manager().top_important(n)
    except MemoryUnavailable as exc:
        _unavailable(exc)
    now = time.time()
    for d in docs:
        age = (now - d.last_access) / 3600
        kind = "synthetic" if d.synthetic else "document"
        typer.echo(f"{d.importance:9.3f}  {d.doc_id:40s} {kind:9s} accesses={d.accesses} hits={d.hits} "
                   f"quality={d.quality:.2f} last={age:.1f}h ago")


@app.command()
def patterns(n: int = typer.Option(10, help="How many patterns.")) -> None:
    """The most important query patterns and the documents their answers cited."""
    from hybridrag.agents.retention.memory_manager import MemoryUnavailable

    try:
        pats = _manager().top_patterns(n)
    except MemoryUnavailable as exc:
        _unavailable(exc)
    for p in pats:
        typer.echo(f"{p.importance:9.3f}  x{p.count:<5d} {p.query!r} -> {', '.join(p.doc_ids[:5]) or '-'}")
