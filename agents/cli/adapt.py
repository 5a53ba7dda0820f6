"""``hybridrag adapt``: adapt the encoder to an unlabeled corpus (zero-shot domain adaptation).

Reads only ``--corpus`` (a BEIR ``corpus.jsonl``) and writes only ``--out`` and the
cache; ``hybridrag eval -d DIR --systems original,hybrid --checkpoint OUT`` then
scores it. The recipe is in :mod:`hybridrag.agents.retention.domain_adaptation`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from hybridrag.agents.retention import domain_adaptation as da

app = typer.Typer(no_args_is_help=True, add_completion=False)
_D = da.AdaptConfig()


@app.command("adapt")
def adapt(
    corpus: Path = typer.Option(..., help="The target domain's corpus.jsonl (BEIR: _id, title, text)."),
    out: Path = typer.Option(..., help="Where to write the adapted checkpoint."),
    minutes: float = typer.Option(_D.minutes, help="Training budget in CPU minutes of the process (after one pass over the corpus)."),
    mode: str = typer.Option(_D.mode, help="What trains: branch (conv branch, transformer frozen), head, full."),
    queries: str = typer.Option(_D.queries, help="Pseudo-queries: ict, title, ict+title."),
    labels: str = typer.Option(_D.labels, help="Pseudo-labels: infonce, dense, bm25, ensemble."),
    base: Optional[str] = typer.Option(None, help="Encoder to adapt (profile or checkpoint; default: the shipped one)."),
    threads: int = typer.Option(_D.threads, help="Torch threads."),
    max_passages: int = typer.Option(_D.max_passages, help="Sample the corpus down to this many passages."),
    seed: int = typer.Option(_D.seed),
) -> None:
    """Adapt the encoder to a corpus from the corpus alone: pseudo-queries, mined negatives, pseudo-labels."""
    from hybridrag.agents.cli.errors import BAD_INPUT, CliError

    if not corpus.is_file():
        raise CliError(f"{corpus} is not a file", "pass a BEIR corpus.jsonl with --corpus", BAD_INPUT)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        cfg = da.AdaptConfig(mode=mode, queries=queries, labels=labels, minutes=minutes, threads=threads,
                             max_passages=max_passages, seed=seed)
        result = da.adapt(corpus, out, cfg, base_checkpoint=base, progress=True)
    except ValueError as e:
        raise CliError(str(e), "check --corpus and the options (hybridrag adapt --help)", BAD_INPUT) from None
    c = result.self_check
    summary = {k: v for k, v in json.loads(json.dumps(result.__dict__)).items() if k != "history"}
    typer.echo(json.dumps(summary, indent=2))
    if c.get("pairs"):
        typer.echo(f"self-check on {c['pairs']} held-out pseudo-queries: nDCG@10 {c['base']:.4f} -> {c['adapted']:.4f} "
                   f"(paired 95% interval of the change [{c['delta_lo']:+.4f}, {c['delta_hi']:+.4f}])")
    typer.echo(f"wrote {out} ({result.version}, {result.steps} steps in {result.train_seconds:.0f}s "
               f"after a {result.encode_seconds:.0f}s pass over the corpus)")
