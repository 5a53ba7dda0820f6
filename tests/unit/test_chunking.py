import pytest

from hybridrag.agents.rag.chunking import chunk_document, chunk_text, embed_text


def test_windows_overlap_and_cover_every_word():
    words = [f"w{i}" for i in range(25)]
    chunks = chunk_text(" ".join(words), size=10, overlap=3)
    assert chunks[0].split() == words[:10]
    assert chunks[1].split()[:3] == words[7:10]
    assert chunks[-1].split()[-1] == "w24"
    assert set(" ".join(chunks).split()) == set(words)


def test_short_and_empty_texts():
    assert chunk_text("one two", 10, 2) == ["one two"]
    assert chunk_text("   ", 10, 2) == []


def test_ids_are_deterministic_and_titles_are_embedded_not_stored():
    a = chunk_document("doc-1", "alpha " * 30, "Title", 10, 2)
    b = chunk_document("doc-1", "alpha " * 30, "Title", 10, 2)
    assert [c.id for c in a] == [c.id for c in b] == [f"doc-1#{i}" for i in range(len(a))]
    assert a[0].embed_text.startswith("Title: ") and not a[0].text.startswith("Title")


def test_a_title_the_text_already_holds_is_not_repeated():
    assert embed_text("Lisp", "LISP (language): a family of languages") == "LISP (language): a family of languages"
    assert embed_text("Lisp", "a family of languages") == "Lisp: a family of languages"
    assert embed_text("", "text") == "text"


@pytest.mark.parametrize("size, overlap", [(0, 0), (5, 5), (5, -1)])
def test_bad_window_is_an_error(size, overlap):
    with pytest.raises(ValueError):
        chunk_text("a b c", size, overlap)
