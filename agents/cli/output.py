"""How the command line prints an answer."""

from __future__ import annotations

import typer


def print_answer(question: str, ans, latency_s: float | None = None) -> None:
    typer.secho(f"Q: {question}", bold=True)
    typer.echo(f"A: {ans.answer}")
    for i, src in enumerate(ans.sources, 1):
        title = f" ({src.title})" if src.title else ""
        typer.echo(f"   [{i}] {src.doc_id}#{src.chunk}{title}  score {src.score:.3f}")
    t = ans.timings_ms
    extra = f"latency {latency_s * 1e3:.0f} ms, " if latency_s is not None else ""
    typer.secho(
        f"   {extra}batch of {ans.batch_size}: wait {t.get('buffer_wait', 0):.0f} ms, encode {t.get('encode', 0):.0f} ms, "
        f"search {t.get('search', 0):.0f} ms, generate {t.get('generate', 0):.0f} ms; encoder {ans.encoder_version}",
        fg="bright_black",
    )
