"""Read documents from files: ``.txt`` and ``.md`` (one document each), ``.jsonl``
(one per line; BEIR ``corpus.jsonl`` with ``_id``/``title``/``text`` works as is)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import orjson

from hybridrag.agents.kafka.schemas import Document

SUFFIXES = {".txt", ".md", ".jsonl"}
# formats people hand to `ingest` that are not text; each needs converting first
BINARY_MAGIC = {b"%PDF": "a PDF", b"PK\x03\x04": "a ZIP container (docx, xlsx, epub, ...)", b"\x89PNG": "a PNG image",
                b"\xff\xd8\xff": "a JPEG image", b"\x1f\x8b": "gzip-compressed", b"\x7fELF": "an executable"}


class FileFormatError(ValueError):
    pass


def binary_kind(head: bytes) -> str | None:
    """What a file is when its first bytes say it is not text (None for text)."""
    for magic, kind in BINARY_MAGIC.items():
        if head.startswith(magic):
            return kind
    return "binary (it contains NUL bytes)" if b"\x00" in head else None


def _doc_id(path: Path, root: Path) -> str:
    rel = path.relative_to(root) if path != root else Path(path.name)
    return re.sub(r"[^A-Za-z0-9_.:/@+=\-]", "_", str(rel.with_suffix("")))[:256] or "doc"


def files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)


def iter_documents(path: str | Path, tenant: str = "") -> Iterator[Document]:
    """Documents in a file or a directory tree. A bad line or a binary file raises ``FileFormatError`` naming it."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    base = root if root.is_dir() else root.parent
    files = files_under(root)
    if not files:
        raise FileFormatError(f"{root} holds no {', '.join(sorted(SUFFIXES))} files")
    for f in files:
        with f.open("rb") as fh:
            kind = binary_kind(fh.read(8192))
        if kind:
            raise FileFormatError(f"{f} is {kind}, not text: convert it to .txt or .md first (pdftotext, pandoc)")
        if f.suffix.lower() == ".jsonl":
            with f.open("rb") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = orjson.loads(line)
                        doc_id = str(obj.get("_id") or obj.get("doc_id") or obj.get("id") or "")
                        yield Document(
                            doc_id=doc_id, text=str(obj["text"]), title=str(obj.get("title") or ""), tenant=tenant
                        )
                    except Exception as e:
                        raise FileFormatError(f"{f}:{lineno}: {line_problem(e)}") from None
        else:
            text = f.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield Document(doc_id=_doc_id(f, base), text=text, title=f.stem.replace("_", " "), tenant=tenant)


def line_problem(exc: Exception) -> str:
    """One line on what is wrong with one JSONL line."""
    if isinstance(exc, KeyError):
        return f"no {exc.args[0]!r} field"
    errors = getattr(exc, "errors", None)
    if callable(errors):  # pydantic
        first = errors()[0]
        where = ".".join(map(str, first.get("loc", ()))) or "record"
        return f"{where}: {first['msg']}"
    if isinstance(exc, orjson.JSONDecodeError):
        return f"not JSON ({exc})"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def count_documents(path: str | Path, tenant: str = "") -> int:
    """Read every document once without keeping them: a bad file or line fails here, before anything is published."""
    return sum(1 for _ in iter_documents(path, tenant=tenant))
