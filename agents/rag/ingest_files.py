"""Read documents from files: ``.txt`` and ``.md`` (one document each), ``.jsonl``
(one per line; BEIR ``corpus.jsonl`` with ``_id``/``title``/``text`` works as is)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import orjson

from hybridrag.agents.kafka.schemas import Document

SUFFIXES = {".txt", ".md", ".jsonl"}


class FileFormatError(ValueError):
    pass


def _doc_id(path: Path, root: Path) -> str:
    rel = path.relative_to(root) if path != root else Path(path.name)
    return re.sub(r"[^A-Za-z0-9_.:/@+=\-]", "_", str(rel.with_suffix("")))[:256] or "doc"


def files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)


def iter_documents(path: str | Path, tenant: str = "") -> Iterator[Document]:
    """Documents in a file or a directory tree. A bad line raises ``FileFormatError`` naming it."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    base = root if root.is_dir() else root.parent
    for f in files_under(root):
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
                        raise FileFormatError(f"{f}:{lineno}: {e}") from None
        else:
            text = f.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield Document(doc_id=_doc_id(f, base), text=text, title=f.stem.replace("_", " "), tenant=tenant)
