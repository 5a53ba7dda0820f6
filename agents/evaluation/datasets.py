"""Evaluation sets in the BEIR layout, built from the offline corpora.

A BEIR dataset is a folder with ``corpus.jsonl`` (``{"_id", "title", "text"}``),
``queries.jsonl`` (``{"_id", "text"}``) and ``qrels/test.tsv``
(``query-id<TAB>corpus-id<TAB>score`` with a header line); see
https://github.com/beir-cellar/beir. :func:`load_beir` reads any such folder.

Test queries come only from items that :func:`hybridrag.models.corpora.is_held_out`
marks as held out, so no training stream in :mod:`hybridrag.models.corpora` sees them.
The corpus holds every entry of the source (more distractors), capped in size.

Also here: the demo corpus that ``make demo`` ingests (:func:`build_demo`),
shipped under ``agents/resources/demo/``.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

from hybridrag.models import corpora
from hybridrag.models.corpora import split_sentences

from hybridrag.agents.settings import RESOURCES

DEMO_DIR = RESOURCES / "demo"

# ---------------------------------------------------------------- BEIR io


def write_beir(
    out_dir: Path | str,
    corpus: dict[str, dict],
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    meta: dict | None = None,
) -> Path:
    """Write a BEIR folder. ``corpus``: id -> {"title", "text"}; ``qrels``: qid -> {doc id: grade}."""
    out = Path(out_dir)
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        for doc_id, doc in corpus.items():
            row = {"_id": doc_id, "title": doc.get("title", ""), "text": doc["text"]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(out / "queries.jsonl", "w", encoding="utf-8") as f:
        for qid, text in queries.items():
            f.write(json.dumps({"_id": qid, "text": text}, ensure_ascii=False) + "\n")
    with open(out / "qrels" / "test.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for qid, rels in qrels.items():
            for doc_id, grade in rels.items():
                f.write(f"{qid}\t{doc_id}\t{grade}\n")
    if meta is not None:
        (out / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return out


def load_beir(
    path: Path | str, split: str = "test"
) -> tuple[dict[str, dict], dict[str, str], dict[str, dict[str, int]]]:
    """Read a BEIR folder: ``(corpus, queries, qrels)``.

    ``corpus``: doc id -> {"title", "text"}; ``queries``: query id -> text, only
    those with a qrel; ``qrels``: query id -> {doc id: grade}.
    """
    path = Path(path)
    corpus: dict[str, dict] = {}
    with open(path / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                corpus[str(row["_id"])] = {"title": row.get("title") or "", "text": row.get("text") or ""}
    qrels: dict[str, dict[str, int]] = {}
    with open(path / "qrels" / f"{split}.tsv", encoding="utf-8") as f:
        for i, line in enumerate(f):
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3 or (i == 0 and not parts[2].lstrip("-").isdigit()):
                continue  # header
            qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    queries: dict[str, str] = {}
    with open(path / "queries.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                qid = str(row["_id"])
                if qid in qrels:
                    queries[qid] = row["text"]
    return corpus, queries, qrels


# ---------------------------------------------------------------- demo corpus

# Tags of FOLDOC entries that read as trivia rather than explanation.
_DEMO_SKIP_TAGS = {"jargon", "company", "humour", "publication", "body", "project", "person", "history"}

# The demo's questions; each names the FOLDOC entry that answers it.
DEMO_QUESTIONS = [
    ("What does a compiler do?", "compiler"),
    ("Which transport protocol gives reliable, full-duplex connections?", "transmission control protocol"),
    ("What is a cache memory for?", "cache"),
    ("What is a deadlock between processes?", "deadlock"),
    ("How does a hash table find an item quickly?", "hash coding"),
    ("What is virtual memory?", "virtual memory"),
    ("What does a firewall protect against?", "firewall"),
    ("What is recursion?", "recursion"),
]


def _popularity(entries: list[corpora.Entry]) -> Counter:
    """Inbound cross-references per entry: a proxy for how central a term is."""
    by_name: dict[str, str] = {}
    for e in entries:
        for n in e.names:
            by_name.setdefault(n.lower(), e.uid)
    counts: Counter = Counter()
    for e in entries:
        for ref in set(e.extra.get("xrefs", ())):
            target = by_name.get(ref)
            if target and target != e.uid:
                counts[target] += 1
    return counts


def demo_passage(entry: corpora.Entry, max_sentences: int = 4) -> tuple[str, str] | None:
    """(title, text) for one FOLDOC entry: its opening explanation, 1-4 sentences."""
    paragraphs = [p for p in entry.text.split("\n\n") if not p.startswith("(Note")]
    if not paragraphs:
        return None
    title = entry.names[0]
    first = re.sub(r"^1\.\s+", "", paragraphs[0])
    alias = re.match(r"^\(([^()]{1,40})\)\s+", first)
    if alias and alias.group(1).lower() in {n.lower() for n in entry.names[1:]}:
        title = f"{title} ({alias.group(1)})"
        first = first[alias.end() :]
    first = re.sub(r'^\((?:Or|or) "[^"]*"\)\s+', "", first)  # '(Or "hashing") A scheme...'
    sentences = split_sentences(first)
    # a one-line definition reads thin; let the next paragraph finish the thought
    if len(" ".join(sentences)) < 140 and len(paragraphs) > 1 and not re.match(r"^\d\.", paragraphs[1]):
        sentences += split_sentences(paragraphs[1])
    sentences = sentences[:max_sentences]
    text = " ".join(sentences)
    if not (60 <= len(text) <= 900) or text.lower().startswith("see "):
        return None
    if re.search(r"https?:|ftp:|news:|newsgroup|E-mail|@\w", text, flags=re.I):
        return None
    if not text[0].isupper() or not text.endswith((".", "!", "?", ")")):
        return None
    return title, text


def build_demo(out_dir: Path | str = DEMO_DIR, size: int = 300) -> Path:
    """Write the demo corpus and its questions from FOLDOC's most-referenced entries."""
    entries = corpora.foldoc_entries()
    by_uid = {e.uid: e for e in entries}
    popularity = _popularity(entries)
    wanted = [f"foldoc:{doc}" for _, doc in DEMO_QUESTIONS]
    missing = [u for u in wanted if u not in by_uid or demo_passage(by_uid[u]) is None]
    if missing:
        raise RuntimeError(f"demo questions point at unusable entries: {missing}")
    chosen: list[str] = list(wanted)
    for uid, _ in popularity.most_common():
        if len(chosen) >= size:
            break
        e = by_uid[uid]
        if uid in chosen or set(e.tags) & _DEMO_SKIP_TAGS or not e.tags:
            continue
        if demo_passage(e) is not None:
            chosen.append(uid)
    chosen.sort(key=lambda u: by_uid[u].names[0].lower())
    ids: dict[str, str] = {}
    for uid in chosen:  # "C" and "C++" slug alike
        base = _demo_id(uid)
        doc_id, n = base, 2
        while doc_id in ids.values():
            doc_id, n = f"{base}-{n}", n + 1
        ids[uid] = doc_id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        for uid in chosen:
            title, text = demo_passage(by_uid[uid])
            # the text names its subject so that a passage reads on its own in a prompt
            row = {"_id": ids[uid], "title": title, "text": f"{title}: {text}"}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(out / "questions.jsonl", "w", encoding="utf-8") as f:
        for question, doc in DEMO_QUESTIONS:
            row = {"question": question, "expected_doc_id": ids[f"foldoc:{doc}"]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out


def _demo_id(uid: str) -> str:
    name = uid.split(":", 1)[1].lower().replace("+", " plus ").replace("#", " sharp ")
    return "foldoc-" + re.sub(r"[^a-z0-9]+", "-", name).strip("-")


# ---------------------------------------------------------------- BEIR builders

DEFAULT_MAX_QUERIES = 1000
DEFAULT_MAX_CORPUS = 20_000


def beir_dir() -> Path:
    return corpora.data_dir() / "beir"


def _word_bounded(name: str, text: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text, flags=re.I) is not None


def _doc_id(prefix: str, text: str) -> str:
    import hashlib

    return f"{prefix}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"


def _training_strings(source: str) -> set[str]:
    """Every text and pair side the training streams draw from ``source``.

    A held-out item whose text also occurs as a training item elsewhere (a
    repeated gloss, a shared answer) is no test of generalisation: skip it.
    """
    texts = set(corpora.training_texts(sources=(source,)))
    for q, p in corpora.training_pairs(sources=(source,)):
        texts.add(q)
        texts.add(p)
    return texts


def build_wordnet_revdict(
    out_dir: Path | str | None = None,
    max_queries: int = DEFAULT_MAX_QUERIES,
    max_corpus: int = DEFAULT_MAX_CORPUS,
    seed: int = 0,
) -> Path:
    """WordNet reverse dictionary: a held-out synset's definition -> its word entry.

    A word entry is the synset's lemmas and part of speech ("dog, domestic dog,
    Canis familiaris (noun)"). Synsets whose entries read the same share one
    document, so a query is relevant to the one entry text it names. The corpus
    holds every test entry plus distractor entries sampled from all of WordNet.
    """
    entries = corpora.wordnet_entries()
    seen_in_training = _training_strings("wordnet")
    rng = random.Random(seed)
    candidates = [
        e
        for e in entries
        if e.held_out
        and e.text not in seen_in_training  # WordNet repeats a few glosses across synsets
        and len(e.text.split()) >= 4
        and not any(_word_bounded(n, e.text) for n in e.names)
    ]
    rng.shuffle(candidates)
    tests = candidates[:max_queries]
    corpus: dict[str, dict] = {}
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for e in tests:
        entry_text = corpora.wordnet_entry_text(e)
        doc_id = _doc_id("wn", entry_text)
        corpus[doc_id] = {"title": e.names[0], "text": entry_text}
        qid = e.uid.replace("wordnet:", "wnq-")
        queries[qid] = e.text
        qrels[qid] = {doc_id: 1}
    pool = list(entries)
    rng.shuffle(pool)
    for e in pool:
        if len(corpus) >= max_corpus:
            break
        entry_text = corpora.wordnet_entry_text(e)
        corpus.setdefault(_doc_id("wn", entry_text), {"title": e.names[0], "text": entry_text})
    meta = {
        "name": "wordnet-revdict",
        "source": "WordNet 3.0 (Debian wordnet-base)",
        "task": "definition of a held-out synset -> its word entry (lemmas + part of speech)",
        "queries": len(queries),
        "corpus": len(corpus),
        "seed": seed,
    }
    return write_beir(out_dir or beir_dir() / "wordnet-revdict", corpus, queries, qrels, meta)


def foldoc_query(entry: corpora.Entry, max_sentences: int = 2, max_chars: int = 300) -> str | None:
    """The opening of a FOLDOC definition with the entry's own names hidden."""
    first = corpora.foldoc_first_paragraph(entry)
    if first.lower().startswith(("see ", "(note")):
        return None
    first = re.sub(r'^\((?:Or|or) "[^"]*"\)\s+', "", first)
    text = " ".join(split_sentences(first)[:max_sentences])[:max_chars]
    text = corpora.mask_names(text, entry.names)
    if len(text) < 30 or text.count("this term") > 2:
        return None
    return text


def build_foldoc(
    out_dir: Path | str | None = None,
    max_queries: int = DEFAULT_MAX_QUERIES,
    seed: int = 0,
    max_corpus: int | None = None,
) -> Path:
    """FOLDOC: the opening of a held-out term's definition (names masked) -> the term entry.

    A term entry is the headword, its aliases and domain tags
    ("Transmission Control Protocol; TCP (networking, protocol)"). The corpus
    holds every FOLDOC entry (~11.8k).
    """
    entries = corpora.foldoc_entries()
    corpus: dict[str, dict] = {}
    doc_of: dict[str, str] = {}
    for e in entries:
        text = corpora.foldoc_term_entry(e)
        doc_id = _doc_id("fd", text)
        corpus.setdefault(doc_id, {"title": e.names[0], "text": text})
        doc_of[e.uid] = doc_id
    seen_in_training = _training_strings("foldoc")
    rng = random.Random(seed)
    tests = [e for e in entries if e.held_out]
    rng.shuffle(tests)
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for e in tests:
        if len(queries) >= max_queries:
            break
        q = foldoc_query(e)
        if q is None or q in seen_in_training:
            continue
        qid = _doc_id("fdq", e.uid)
        queries[qid] = q
        qrels[qid] = {doc_of[e.uid]: 1}
    if max_corpus is not None and len(corpus) > max_corpus:
        # every judged entry stays; distractors are a seeded sample of the rest
        judged = {d for rels in qrels.values() for d in rels}
        rest = sorted(set(corpus) - judged)
        random.Random(seed + 1).shuffle(rest)
        keep = judged | set(rest[: max(0, max_corpus - len(judged))])
        corpus = {d: doc for d, doc in corpus.items() if d in keep}
    meta = {
        "name": "foldoc",
        "source": "FOLDOC (Debian dict-foldoc)",
        "task": "opening of a held-out term's definition, names masked -> the term entry",
        "queries": len(queries),
        "corpus": len(corpus),
        "seed": seed,
    }
    return write_beir(out_dir or beir_dir() / "foldoc", corpus, queries, qrels, meta)


def build_chatterbot(out_dir: Path | str | None = None, seed: int = 0) -> Path:
    """chatterbot-corpus (English): a held-out question -> any of its answers.

    The corpus is every distinct answer in the corpus; an answer shared by two
    questions is relevant to both.
    """
    entries = corpora.chatterbot_entries()
    corpus: dict[str, dict] = {}
    for e in entries:
        for a in e.examples:
            corpus.setdefault(_doc_id("cb", a), {"title": "", "text": a})
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    seen_in_training = _training_strings("chatterbot")
    for e in sorted((e for e in entries if e.held_out), key=lambda e: e.uid):
        if e.names[0] in seen_in_training:  # "Greetings!" is also another question's answer
            continue
        qid = e.uid.replace("chatterbot:", "cbq-")
        queries[qid] = e.names[0]
        qrels[qid] = {_doc_id("cb", a): 1 for a in e.examples}
    meta = {
        "name": "chatterbot",
        "source": "chatterbot-corpus 1.3.3 (PyPI), English",
        "task": "held-out question -> its answers",
        "queries": len(queries),
        "corpus": len(corpus),
        "seed": seed,
    }
    return write_beir(out_dir or beir_dir() / "chatterbot", corpus, queries, qrels, meta)


# The NAME one-liners that say nothing a reader would ask (".. functions", "wrapper"):
# below this many words of their own a query is too thin to judge retrieval by.
MANPAGE_MIN_QUERY_WORDS = 3


def chunk_paragraphs(paragraphs: list[str], min_words: int = 150, max_words: int = 300) -> list[str]:
    """Join paragraphs into passages of ``min_words``-``max_words`` words, in order.

    A paragraph longer than ``max_words`` is cut at sentence ends; a short tail
    joins the passage before it when the two fit in ``max_words``.
    """
    pieces: list[str] = []
    for p in paragraphs:
        if len(p.split()) <= max_words:
            pieces.append(p)
            continue
        part: list[str] = []
        for sentence in split_sentences(p):
            if part and len(" ".join(part + [sentence]).split()) > max_words:
                pieces.append(" ".join(part))
                part = []
            part.append(sentence)
        if part:
            pieces.append(" ".join(part))
    passages: list[list[str]] = []
    words = 0
    for piece in pieces:
        n = len(piece.split())
        if passages and words < min_words and words + n <= max_words:
            passages[-1].append(piece)
            words += n
        else:
            passages.append([piece])
            words = n
    out = ["\n\n".join(p) for p in passages]
    if len(out) > 1 and len(out[-1].split()) < min_words and len((out[-2] + " " + out[-1]).split()) <= max_words:
        out[-2:] = [out[-2] + "\n\n" + out[-1]]
    return out


def build_manpages(
    out_dir: Path | str | None = None,
    max_queries: int = DEFAULT_MAX_QUERIES,
    seed: int = 0,
    min_words: int = 150,
    max_words: int = 300,
    max_pages: int | None = None,
) -> Path:
    """Linux man-pages (sections 2 and 3): a page's NAME one-liner -> the first passage of its description.

    Long technical passages: the DESCRIPTION-onward prose of every page,
    chunked into ``min_words``-``max_words`` words, never the NAME line. A
    query is the one-liner after the dash ("create a child process"); pages
    whose one-liner is short (under :data:`MANPAGE_MIN_QUERY_WORDS` words) or
    shared with another page are not queries, but their passages stay in the
    corpus as distractors. The whole domain is held out: no training stream
    reads man pages. ``max_pages`` keeps a seeded sample of whole pages (a
    smaller corpus where encoding the whole set is too slow).
    """
    entries = corpora.manpage_entries()
    counts = Counter(e.extra["oneliner"].lower() for e in entries)
    if max_pages is not None and len(entries) > max_pages:  # a seeded sample of whole pages
        entries = [entries[i] for i in sorted(random.Random(seed + 1).sample(range(len(entries)), max_pages))]
    # a one-liner that is also a training text elsewhere ("random number generator" is a FOLDOC headword)
    # would test recall of training, not generalisation
    seen_in_training = set(corpora.training_texts())
    seen_in_training.update(x for pair in corpora.training_pairs() for x in pair)
    corpus: dict[str, dict] = {}
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    candidates: list[tuple[str, str, str]] = []
    for e in entries:
        page = e.uid.split(":", 1)[1]  # "fork.2"
        name, _, section = page.rpartition(".")
        title = f"{name}({section})"
        passages = chunk_paragraphs(e.text.split("\n\n"), min_words, max_words)
        for i, text in enumerate(passages):
            corpus[f"man-{page}-{i}"] = {"title": title, "text": text}
        oneliner = e.extra["oneliner"]
        if oneliner in seen_in_training:
            continue
        if counts[oneliner.lower()] == 1 and len(re.findall(r"[A-Za-z]{2,}", oneliner)) >= MANPAGE_MIN_QUERY_WORDS:
            candidates.append((f"manq-{page}", oneliner, f"man-{page}-0"))
    random.Random(seed).shuffle(candidates)
    for qid, text, doc_id in sorted(candidates[:max_queries]):
        queries[qid] = text
        qrels[qid] = {doc_id: 1}
    meta = {
        "name": "manpages",
        "source": "Linux man-pages 6.03, sections 2 and 3 (Debian manpages-dev)",
        "task": "a page's NAME one-liner -> the first passage of its DESCRIPTION (long technical passages)",
        "passage_words": [min_words, max_words],
        "queries": len(queries),
        "corpus": len(corpus),
        "seed": seed,
    }
    return write_beir(out_dir or beir_dir() / "manpages", corpus, queries, qrels, meta)


BUILDERS = {
    "wordnet-revdict": build_wordnet_revdict,
    "foldoc": build_foldoc,
    "chatterbot": build_chatterbot,
    "manpages": build_manpages,
}


def build(name: str, out_dir: Path | str | None = None, **kwargs) -> Path:
    if name not in BUILDERS:
        raise ValueError(f"{name} is not a valid dataset ({', '.join(BUILDERS)})")
    return BUILDERS[name](out_dir, **kwargs)


def dataset_path(name_or_path: str) -> Path:
    """A dataset name under ``data/beir/`` (built on first use) or a path to any BEIR folder."""
    p = Path(name_or_path)
    if (p / "corpus.jsonl").exists():
        return p
    if name_or_path in BUILDERS:
        path = beir_dir() / name_or_path
        if not (path / "qrels" / "test.tsv").exists():
            build(name_or_path, path)
        return path
    raise ValueError(f"{name_or_path} is not a BEIR folder nor a known dataset ({', '.join(BUILDERS)})")
