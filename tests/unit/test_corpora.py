"""Parsers of the offline corpora and the held-out split, on real lines from each source."""

import json

import pytest

from hybridrag.models import corpora
from hybridrag.models.corpora import (
    Entry,
    clean_foldoc_markup,
    detokenize_brown,
    dictd_b64,
    entry_pairs,
    is_held_out,
    mask_names,
    parse_foldoc_entry,
    parse_wordnet_line,
    split_bucket,
    strip_wikitext,
)
from hybridrag.agents.evaluation.datasets import DEMO_DIR, demo_passage, split_sentences

DOG = (
    "02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 002 @ 02083346 n 0000 "
    "@ 01317541 n 0000 | a member of the genus Canis (probably descended from the common wolf) "
    'that has been domesticated by man since prehistoric times; occurs in many breeds; "the dog barked all night"  '
)

TCP = """Transmission Control Protocol
TCP

   <networking, protocol> (TCP) The most common {transport layer}
   {protocol} used on {Ethernet} and the {Internet}.  It was
   developed by {DARPA}.

   See {Language List (http://example.org/langlist.htm)}.

   (2001-06-14)

"""


def test_wordnet_line_gives_lemmas_definition_and_examples():
    e = parse_wordnet_line(DOG, "n")
    assert e.uid == "wordnet:n02084071"
    assert e.names == ("dog", "domestic dog", "Canis familiaris")
    assert e.text.startswith("a member of the genus Canis")
    assert e.text.endswith("occurs in many breeds")
    assert e.examples == ("the dog barked all night",)
    assert corpora.wordnet_entry_text(e) == "dog, domestic dog, Canis familiaris (noun)"


def test_wordnet_adjective_markers_and_licence_lines():
    line = "00013887 00 s 01 galore(ip) 0 001 & 00013160 a 0000 | in great numbers; \"apples galore\""
    e = parse_wordnet_line(line, "a")
    assert e.names == ("galore",) and e.text == "in great numbers" and e.examples == ("apples galore",)
    assert parse_wordnet_line("  1 This software and database is being provided", "n") is None


def test_foldoc_entry_parsing_strips_markup():
    names, tags, paragraphs = parse_foldoc_entry(TCP)
    assert names == ["Transmission Control Protocol", "TCP"]
    assert tags == ["networking", "protocol"]
    assert paragraphs == [
        "(TCP) The most common transport layer protocol used on Ethernet and the Internet. It was developed by DARPA.",
        "See Language List.",
    ]


def test_clean_foldoc_markup_drops_pronunciation():
    assert clean_foldoc_markup("<memory management> /kash/ A small fast {memory}.") == "A small fast memory."


def test_dictd_base64_numbers():
    assert dictd_b64("A") == 0
    assert dictd_b64("BA") == 64
    assert dictd_b64("Gb9L") == 6 * 64**3 + 27 * 64**2 + 61 * 64 + 11


def test_brown_detokenizer():
    line = "The/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, it/pps did/dod n't/* ./."
    assert detokenize_brown(line) == 'The jury said "no evidence", it didn\'t.'


def test_held_out_split_is_stable_and_near_its_fraction():
    uids = [f"wordnet:n{i:08d}" for i in range(20000)]
    share = sum(map(is_held_out, uids)) / len(uids)
    assert 0.09 < share < 0.11
    assert split_bucket("foldoc:compiler") == split_bucket("foldoc:compiler")
    # chatterbot keeps a larger share (its set is small)
    cb = [f"chatterbot:{i}" for i in range(20000)]
    assert 0.18 < sum(map(is_held_out, cb)) / len(cb) < 0.22


def test_mask_names_hides_whole_words_only():
    got = mask_names("(TCP) TCP carries data; TCPs and ATCP differ.", ["TCP"])
    assert got == "this term carries data; TCPs and ATCP differ."


def test_entry_pairs_shapes():
    wn = parse_wordnet_line(DOG, "n")
    pairs = entry_pairs(wn)
    assert ("dog", wn.text) in pairs
    assert (wn.text, "dog, domestic dog, Canis familiaris (noun)") in pairs
    assert ("the dog barked all night", wn.text) in pairs
    cb = Entry(uid="chatterbot:x", names=("What is AI?",), text="a", examples=("a", "b"))
    assert entry_pairs(cb) == [("What is AI?", "a"), ("What is AI?", "b")]


def test_strip_wikitext():
    raw = (
        "{{Infobox|name=x}}\n'''Anarchism''' is a [[political philosophy]] that advocates "
        "[[self-governance|self-governed]] societies<ref>Smith 2001</ref> based on voluntary institutions, "
        "and these are often described as stateless societies by many of the authors who write on the subject.\n"
        "== History ==\n[[Category:Politics]]"
    )
    (para,) = strip_wikitext(raw)
    assert para.startswith("Anarchism is a political philosophy that advocates self-governed societies based on")


def test_split_sentences():
    assert split_sentences("A cache. It is fast, e.g. very fast. (Sometimes.)") == [
        "A cache.",
        "It is fast, e.g. very fast.",
        "(Sometimes.)",
    ]


def test_demo_passage_moves_alias_to_title():
    names, tags, paragraphs = parse_foldoc_entry(TCP)
    e = Entry(uid="foldoc:transmission control protocol", names=tuple(names), text="\n\n".join(paragraphs[:1]))
    title, text = demo_passage(e)
    assert title == "Transmission Control Protocol (TCP)"
    assert text.startswith("The most common transport layer protocol")


def test_shipped_demo_corpus_is_well_formed():
    docs = [json.loads(l) for l in (DEMO_DIR / "corpus.jsonl").read_text().splitlines()]
    questions = [json.loads(l) for l in (DEMO_DIR / "questions.jsonl").read_text().splitlines()]
    ids = {d["_id"] for d in docs}
    assert 200 <= len(docs) <= 400 and len(ids) == len(docs)
    assert all(d["text"].startswith(d["title"]) and 60 < len(d["text"]) < 1000 for d in docs)
    assert 6 <= len(questions) <= 10
    assert all(q["expected_doc_id"] in ids and q["question"].endswith("?") for q in questions)


@pytest.mark.parametrize("bad", ["nope", "wikipedia"])
def test_unknown_source_is_refused(bad):
    with pytest.raises(ValueError, match="not a valid"):
        corpora.fetch_source(bad)


_MANPAGE = r'''.\" a comment the parser skips
.TH fork 2 2023-02-05 "Linux man-pages 6.03"
.SH NAME
fork, vfork \- create a child process
.SH SYNOPSIS
.nf
.B pid_t fork(void);
.fi
.SH DESCRIPTION
.BR fork ()
creates a new process by duplicating the \fIcalling\fP process.
The child\[aq]s memory
.RB ( mmap (2))
is a copy.
.PP
.EX
int main(void) { return fork(); }
.EE
.IP \[bu] 3
Locks are not inherited\-ever.
.SH SEE ALSO
.BR clone (2)
'''


def test_parse_manpage_gives_names_oneliner_and_prose_without_code():
    """The NAME line splits at the dash; font macros join; code and SEE ALSO are not prose."""
    from hybridrag.models.corpora import parse_manpage

    names, oneliner, sections = parse_manpage(_MANPAGE)
    assert names == ["fork", "vfork"] and oneliner == "create a child process"
    body = dict(sections)
    assert body["DESCRIPTION"] == [
        "fork() creates a new process by duplicating the calling process. The child's memory (mmap(2)) is a copy.",
        "Locks are not inherited-ever.",
    ]
    assert body["SYNOPSIS"] == [] and body["SEE ALSO"] == ["clone(2)"]


def test_chunk_paragraphs_keeps_passages_within_bounds():
    """Short paragraphs join up to the minimum; a long one is cut at sentence ends; every word is kept once.

    A passage stays under the minimum only when the next piece would have pushed it past the maximum.
    """
    from hybridrag.agents.evaluation.datasets import chunk_paragraphs

    short = ["one two three four five."] * 10  # 5 words each
    long = " ".join(f"Sentence number {i} has six words." for i in range(30))  # 180 words
    out = chunk_paragraphs(short + [long], min_words=20, max_words=60)
    assert all(len(p.split()) <= 60 for p in out)
    for a, b in zip(out, out[1:]):
        assert len(a.split()) >= 20 or len(a.split()) + len(b.split("\n\n")[0].split()) > 60
    assert sum(len(p.split()) for p in out) == 50 + 180
