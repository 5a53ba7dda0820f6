"""A long-passage held-out set from Debian manpages-dev (sections 2 and 3), BEIR layout.

Passages are chunks of a page's DESCRIPTION (at most ``max_words`` words, cut at
sentence ends); the page's title is its .TH name. Queries are the one-liners of
the NAME sections (what follows ``\\-``); every chunk of the page is relevant.
No model trains on a NAME line; the chunks are only ever the unlabeled target
corpus of zero-shot adaptation.

``python bench/manpages_set.py --out data/beir/manpages-adapt``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import subprocess
import tempfile
from pathlib import Path

from hybridrag.models import corpora
from hybridrag.agents.evaluation import datasets

_FONT = re.compile(r"\\f(?:\[[^\]]*\]|\(..|.)")
_SPECIAL = {r"\-": "-", r"\(em": " - ", r"\(en": "-", r"\e": "\\", r"\&": "", r"\~": " ", r"\(aq": "'",
            r"\[aq]": "'", r"\(dq": '"', r"\[dq]": '"', r"\(bu": "-", r"\[bu]": "-", r"\ ": " ", r"\|": "",
            r"\c": "", r"\%": "", r"\(lq": '"', r"\(rq": '"', r"\[lq]": '"', r"\[rq]": '"', r"\[em]": " - "}
_FONT_MACROS = {".B", ".I", ".BR", ".RB", ".IR", ".RI", ".BI", ".IB", ".SM", ".SB"}


def fetch_pages(cache: Path) -> Path:
    """manpages-dev unpacked under ``cache`` (``apt-get download``, no root): its man2 and man3 folders."""
    root = cache / "manpages-dev"
    if not (root / "usr/share/man/man2").exists():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["apt-get", "download", "manpages-dev"], cwd=tmp, check=True, capture_output=True)
            deb = next(Path(tmp).glob("manpages-dev_*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, capture_output=True)
    return root / "usr/share/man"


def roff_to_text(lines: list[str]) -> str:
    """Plain text of roff source lines: font macros joined, requests dropped, escapes resolved."""
    out: list[str] = []
    for line in lines:
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith("."):
            macro, _, rest = line.partition(" ")
            if macro not in _FONT_MACROS:
                continue
            args = re.findall(r'"[^"]*"|\S+', rest)
            sep = " " if macro in (".B", ".I", ".SM", ".SB") else ""  # the others alternate fonts, unspaced
            line = sep.join(a.strip('"') for a in args)
        for k, v in _SPECIAL.items():
            line = line.replace(k, v)
        line = _FONT.sub("", line)
        line = re.sub(r"\\\[[^\]]*\]|\\\(..|\\.", "", line)
        out.append(line)
    return re.sub(r"\s+", " ", " ".join(out)).strip()


def sections(source: str) -> dict[str, list[str]]:
    """Lines under each .SH heading."""
    out: dict[str, list[str]] = {}
    current = None
    for line in source.splitlines():
        if line.startswith(".SH"):
            current = line[3:].strip().strip('"').upper()
            out.setdefault(current, [])
        elif current is not None:
            out[current].append(line)
    return out


def chunk(text: str, max_words: int) -> list[str]:
    """Sentences packed into chunks of at most ``max_words`` words (a longer sentence is its own chunk)."""
    chunks, cur = [], []
    for s in corpora.split_sentences(text):
        if cur and len(" ".join(cur).split()) + len(s.split()) > max_words:
            chunks.append(" ".join(cur))
            cur = []
        cur.append(s)
    if cur:
        chunks.append(" ".join(cur))
    return chunks


def build(out: Path, pages: int = 400, chunks_per_page: int = 2, max_words: int = 100, seed: int = 0) -> Path:
    man = fetch_pages(corpora.data_dir() / "cache" / "corpora")
    files = sorted([*man.glob("man2/*.gz"), *man.glob("man3/*.gz")])
    rng = random.Random(seed)
    rng.shuffle(files)
    corpus, queries, qrels, seen = {}, {}, {}, set()
    for f in files:
        if len(queries) >= pages:
            break
        src = gzip.open(f, "rt", encoding="utf-8", errors="replace").read()
        if src.lstrip().startswith(".so"):
            continue  # a redirect to another page
        sec = sections(src)
        name_line = roff_to_text(sec.get("NAME", []))
        if " - " not in name_line or "DESCRIPTION" not in sec:
            continue
        one_liner = name_line.split(" - ", 1)[1].strip()
        parts = [c for c in chunk(roff_to_text(sec["DESCRIPTION"]), max_words) if len(c.split()) >= 12]
        if len(one_liner.split()) < 3 or one_liner.lower() in seen or not parts:
            continue
        seen.add(one_liner.lower())
        title = f.name.split(".")[0]
        qid = f"mpq-{f.parent.name[-1]}-{title}"
        queries[qid] = one_liner
        qrels[qid] = {}
        for i, text in enumerate(parts[:chunks_per_page]):
            did = f"mp-{f.parent.name[-1]}-{title}-{i}"
            corpus[did] = {"title": title, "text": text}
            qrels[qid][did] = 1
    meta = {"name": "manpages-adapt", "source": "Debian manpages-dev, sections 2 and 3",
            "task": "NAME one-liner -> DESCRIPTION chunks of its page", "queries": len(queries),
            "corpus": len(corpus), "seed": seed, "max_words": max_words}
    return datasets.write_beir(out, corpus, queries, qrels, meta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--pages", type=int, default=400)
    a = ap.parse_args()
    path = build(a.out or datasets.beir_dir() / "manpages-adapt", pages=a.pages)
    print(path)


if __name__ == "__main__":
    main()
