"""Text corpora -> packed token blocks: tokenized once, cached on disk, memory-mapped.

A prepared directory ``<cache>/<fingerprint[:16]>/`` (default cache: ``cache_dir()/data``) holds:

- ``train.bin``, ``val.bin``: raw little-endian token ids, ``uint16`` when the vocabulary has at most 65,536 entries,
  else ``uint32``, row-major ``[blocks, seq_len]``.
- ``manifest.json``: the identity fields `IDENTITY_FIELDS` (format version, tokenizer fingerprint, vocabulary size,
  EOS id, dtype, seq_len, split rule, and per source the relative path and sha256 of every file, or the pinned
  packages of the default corpus), their ``fingerprint``, and derived facts: the sources as given, document, token and
  block counts per split and per source, ``val_blocks_by_source`` (per source, the ``[start, stop)`` validation
  blocks holding only its text), the ``sha256`` of each block file (checked at every open), the tokenizer's
  name, the creation time.

The fingerprint depends on file contents, not on where the files lie: the same text prepared from another directory
reuses the cache (its manifest then shows the paths of the first preparation).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from lmdistill.data.corpus import LICENSES, Document, default_corpus, default_corpus_identity, hash_fraction
from lmdistill.errors import LmdistillError
from lmdistill.storage import cache_dir, sha256_file, staged

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
IDENTITY_FIELDS = (
    "format_version", "tokenizer_fingerprint", "vocab_size", "eos_token_id", "dtype", "seq_len", "split", "sources",
)  # fmt: skip
TEXT_SUFFIXES = (".txt", ".md")
SPLIT_RULE = (
    "a document goes to validation iff hash_fraction(document_id) < val_fraction; if that leaves validation without "
    "a block, the last training documents move to validation; a single document gives validation its last tokens"
)
_BATCH_CHARS = 1 << 20  # characters per tokenizer call: the fast tokenizer parallelizes over a batch's texts
_PIECE_CHARS = 1 << 20  # longer documents are tokenized in pieces (see _pieces), bounding memory
_WRITE_TOKENS = 1 << 24

Segment = tuple[int, int, int]  # (start, stop) in the flat token file, document index


@dataclass
class PackedData:
    """Packed token blocks of one corpus, tokenizer and block length.

    Attributes:
        train: ``[N_train, seq_len]`` memory-mapped token ids (``uint16`` or ``uint32``), copy-on-write: writes stay in
            memory and never reach the file.
        val: ``[N_val, seq_len]`` likewise (an in-memory empty array when N_val is 0).
        manifest: The parsed ``manifest.json`` (see the module docstring).
        directory: The prepared directory.
    """

    train: np.ndarray
    val: np.ndarray
    manifest: dict[str, Any]
    directory: Path

    @property
    def fingerprint(self) -> str:
        """sha256 (hex) of the canonical JSON of the manifest's identity fields: equal fingerprints, equal blocks."""
        return data_fingerprint(self.manifest)


def data_fingerprint(manifest: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of a manifest's `IDENTITY_FIELDS`."""
    return _sha256_json({key: manifest[key] for key in IDENTITY_FIELDS})


def _sha256_json(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A stable hash of what decides a tokenizer's token ids.

    Fast tokenizers: sha256 of the canonical JSON of ``backend_tokenizer.to_str()`` (model vocabulary and merges,
    normalizer, pre-tokenizer, added tokens) without the parts that do not change the ids of text tokenized without
    special tokens (truncation, padding, post-processor, decoder), so a tokenizer saved and loaded again keeps its
    fingerprint. Slow tokenizers: the sorted vocabulary plus the contents of their vocabulary/merges/model files.

    Args:
        tokenizer: A Hugging Face tokenizer.

    Returns:
        A 64-character hex digest.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        for key in ("truncation", "padding", "post_processor", "decoder"):
            state.pop(key, None)
        return _sha256_json({"kind": "fast", "state": state})
    files = {}
    for attribute in ("vocab_file", "merges_file", "spm_file", "sp_model_file"):
        path = getattr(tokenizer, attribute, None)
        if isinstance(path, (str, Path)) and Path(path).is_file():
            files[attribute] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return _sha256_json({"kind": type(tokenizer).__name__, "vocab": vocab, "files": files})


def check_same_vocabulary(model_a: Any, tokenizer_a: Any, model_b: Any, tokenizer_b: Any) -> None:
    """Refuse two models that do not share a vocabulary (same embedding rows, same tokenizer fingerprint).

    Args:
        model_a: A causal LM, e.g. the student.
        tokenizer_a: Its tokenizer.
        model_b: Another causal LM, e.g. the teacher.
        tokenizer_b: Its tokenizer.

    Raises:
        LmdistillError: If the embedding tables have different numbers of rows or the tokenizers differ.
    """
    rows_a = model_a.get_input_embeddings().weight.shape[0]
    rows_b = model_b.get_input_embeddings().weight.shape[0]
    if rows_a != rows_b:
        raise LmdistillError(
            f"the models do not share a vocabulary: their embedding tables have {rows_a} and {rows_b} rows; "
            "distillation and comparisons need a student built from the teacher's tokenizer"
        )
    fingerprint_a, fingerprint_b = tokenizer_fingerprint(tokenizer_a), tokenizer_fingerprint(tokenizer_b)
    if fingerprint_a != fingerprint_b:
        raise LmdistillError(
            f"the models' tokenizers differ (fingerprints {fingerprint_a[:12]} and {fingerprint_b[:12]}): the same "
            "token ids would mean different text; use the tokenizer the student was built with"
        )


def vocabulary_size(tokenizer: Any) -> int:
    """Number of token ids a tokenizer can produce: ``max(len(tokenizer), largest id + 1)``."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


@dataclass
class _Pending:
    """A document to tokenize: its text in memory, or a file read when its turn comes."""

    doc_id: str
    source: str
    split: str | None
    size: int  # bytes of UTF-8, for the progress bar
    path: Path | None = None
    text: str | None = None

    def read(self) -> str:
        if self.text is not None:
            return self.text
        try:
            return self.path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            message = f"data file {self.path} is not UTF-8 text ({exc}): convert it or leave it out"
            raise LmdistillError(message) from exc


def prepare_data(
    sources: Sequence[str | Path] | None,
    tokenizer: Any,
    seq_len: int,
    *,
    val_fraction: float = 0.05,
    cache: Path | None = None,
    progress: bool = True,
) -> PackedData:
    """Tokenize text into packed blocks of ``seq_len`` tokens, split into training and validation, cached on disk.

    Each document is tokenized without special tokens; the tokenizer's EOS id (when it has one) goes between
    consecutive documents of a split; the split's token stream is cut into non-overlapping blocks of ``seq_len``
    tokens and the partial last block is dropped.

    Split rule for explicit sources (at the document level, deterministic): a document goes to validation iff
    ``hash_fraction(document_id) < val_fraction`` (sha256 of the id mapped to [0, 1), see `hash_fraction`), where the
    id is the file's path relative to its source (the directory itself, a file's parent folder, or a glob's folder
    before its first wildcard) or, for ``hf:`` sources, ``split/row``. If validation then holds no whole block, the
    last training documents move to validation until it holds ``max(1, round(val_fraction * tokens / seq_len))``
    blocks (at least one document stays in training). A single document gives validation its last
    ``seq_len * max(1, round(val_fraction * tokens / seq_len))`` tokens instead. ``val_fraction = 0`` means no
    validation blocks. With ``sources=None`` the default corpus's own fixed split applies and ``val_fraction`` is
    ignored (see `lmdistill.data.corpus`).

    Args:
        sources: Text files, directories (every ``.txt`` and ``.md`` file below, recursively, sorted, hidden paths
            skipped), globs (``**`` recurses), or Hugging Face datasets ``hf:NAME[:CONFIG]`` (their ``text`` column,
            every split; needs the ``datasets`` library and a reachable hub). None: the default offline corpus.
        tokenizer: The teacher's tokenizer.
        seq_len: Tokens per block (at least 2).
        val_fraction: Target share of documents held out for validation, in [0, 1).
        cache: Folder holding prepared directories (default ``cache_dir()/data``).
        progress: Show a progress bar while tokenizing (and download messages for the default corpus).

    Returns:
        The packed data; ``train`` is ``[N_train, seq_len]``, ``val`` is ``[N_val, seq_len]``.

    Raises:
        LmdistillError: On a source matching nothing, a non-UTF-8 file, too little text for a training block (or for a
            validation block when ``val_fraction > 0``), bad arguments, or a default corpus that cannot be downloaded.
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if seq_len < 2:
        raise LmdistillError(f"seq_len must be at least 2 (a block predicts its tokens after the first), got {seq_len}")
    if not 0 <= val_fraction < 1:
        raise LmdistillError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if sources is not None and not sources:
        raise LmdistillError(
            "no data sources given: pass text files, directories or globs, or none for the default corpus"
        )
    vocab_size = vocabulary_size(tokenizer)
    dtype = np.dtype("<u2" if vocab_size <= 1 << 16 else "<u4")
    plan = _plan(sources, val_fraction, progress)
    identity = {
        "format_version": FORMAT_VERSION,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": vocab_size,
        "eos_token_id": tokenizer.eos_token_id,
        "dtype": dtype.name,
        "seq_len": seq_len,
        "split": plan.split,
        "sources": plan.identities,
    }
    fingerprint = _sha256_json(identity)
    directory = Path(cache).expanduser() if cache is not None else cache_dir() / "data"
    directory = directory / fingerprint[:16]
    prepared = _prepared(directory, fingerprint)
    if prepared is not None:
        return prepared
    return _build(plan.load, identity, fingerprint, plan.inputs, tokenizer, val_fraction, directory, progress)


class _Plan(NamedTuple):
    """The documents of the sources, read when `load` is called, and what the manifest says of them."""

    load: Callable[[], list[_Pending]]
    identities: list[dict[str, Any]]  # per source: what decides its documents (the manifest's "sources")
    inputs: list[dict[str, Any]]  # per source: as given (the manifest's "inputs")
    split: dict[str, Any]  # the split rule


def _plan(sources: Sequence[str | Path] | None, val_fraction: float, progress: bool) -> _Plan:
    """Resolve the sources of `prepare_data` (None: the default corpus, downloaded only when loaded)."""
    if sources is None:
        identity = default_corpus_identity()
        split = {"kind": "corpus", "rule": identity["val_rule"]}
        inputs: list[dict[str, Any]] = [{"source": "default corpus", "licenses": LICENSES}]
        return _Plan(lambda: [_from_document(doc) for doc in default_corpus(progress)], [identity], inputs, split)
    pending: list[_Pending] = []
    identities, inputs, seen = [], [], set()
    for source in sources:
        docs, identity, given = _resolve(str(source), seen)
        pending += docs
        identities.append(identity)
        inputs.append(given)
    split = {"kind": "document-hash", "val_fraction": val_fraction, "rule": SPLIT_RULE}
    return _Plan(lambda: pending, identities, inputs, split)


def _prepared(directory: Path, fingerprint: str) -> PackedData | None:
    """The data prepared in `directory` if it is whole and of `fingerprint`; else None, the directory discarded."""
    if not directory.exists():
        return None
    try:
        data = open_packed(directory)
        if data.fingerprint == fingerprint:
            return data
        problem = f"its fingerprint {data.fingerprint[:16]} is not {fingerprint[:16]}"
    except LmdistillError as exc:
        problem = str(exc)
    log.warning("prepared data in %s is unusable (%s); preparing it again", directory, problem)
    _discard(directory)
    return None


def open_packed(directory: Path) -> PackedData:
    """Open a prepared directory, checking its manifest and the sizes and sha256 of its block files.

    A manifest written before block files had a recorded sha256 gets its token ids checked against its vocabulary
    size instead.

    Args:
        directory: A directory written by `prepare_data`.

    Returns:
        The packed data, memory-mapped copy-on-write (the files are never modified).

    Raises:
        LmdistillError: If the manifest is missing, corrupt or of another format version, or a ``.bin`` file does not
            hold exactly the blocks the manifest records (truncated, or another sha256 or ids beyond the vocabulary:
            corrupt).
    """
    directory = Path(directory)
    try:
        manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LmdistillError(f"{directory} holds no readable manifest.json: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise LmdistillError(f"{directory} is not prepared data of format version {FORMAT_VERSION}")
    try:
        if manifest["fingerprint"] != data_fingerprint(manifest):
            raise LmdistillError(f"the manifest in {directory} was edited: its fingerprint does not match its fields")
        dtype, seq_len, blocks = np.dtype(manifest["dtype"]).newbyteorder("<"), manifest["seq_len"], manifest["blocks"]
    except (KeyError, TypeError) as exc:
        raise LmdistillError(f"the manifest in {directory} lacks {exc}") from exc
    arrays = {}
    for split in ("train", "val"):
        path = directory / f"{split}.bin"
        expected = blocks[split] * seq_len * dtype.itemsize
        actual = path.stat().st_size if path.is_file() else None
        if actual != expected:
            raise LmdistillError(
                f"{path} holds {actual} bytes where the manifest records {blocks[split]} blocks of {seq_len} "
                f"{dtype.name} tokens ({expected} bytes): truncated or replaced"
            )
        shape = (blocks[split], seq_len)
        arrays[split] = np.memmap(path, dtype=dtype, mode="c", shape=shape) if blocks[split] else np.zeros(shape, dtype)
        recorded = manifest.get("sha256")
        if recorded is not None:
            if not isinstance(recorded, dict) or sha256_file(path) != recorded.get(split):
                raise LmdistillError(
                    f"{path} does not have the sha256 its manifest records: corrupt; delete {directory} and it is "
                    "prepared again"
                )
        elif arrays[split].size and arrays[split].max() >= manifest["vocab_size"]:
            raise LmdistillError(
                f"{path} holds token id {arrays[split].max()}, beyond the vocabulary of {manifest['vocab_size']}: "
                f"corrupt; delete {directory} and it is prepared again"
            )
    return PackedData(train=arrays["train"], val=arrays["val"], manifest=manifest, directory=directory)


def _discard(directory: Path) -> None:
    aside = directory.with_name(f".{directory.name}.discard-{uuid.uuid4().hex}")
    try:
        os.rename(directory, aside)
    except OSError:
        return  # another process got there first
    shutil.rmtree(aside, ignore_errors=True)


def _from_document(doc: Document) -> _Pending:
    return _Pending(doc.doc_id, doc.source, doc.split, len(doc.text.encode("utf-8")), text=doc.text)


def _resolve(source: str, seen: set[Path]) -> tuple[list[_Pending], dict[str, Any], dict[str, Any]]:
    """Expand one source into documents, its identity entry and its as-given manifest entry."""
    if source.startswith("hf:"):
        return _resolve_hf(source)
    path = Path(source).expanduser()
    if path.is_dir():
        root, files = path, _text_files(path)
        if not files:
            raise LmdistillError(f"data directory {source} holds no {' or '.join(TEXT_SUFFIXES)} files")
    elif path.is_file():
        root, files = path.parent, [path]
    elif any(char in source for char in "*?["):
        parts = path.parts
        static = next(i for i, part in enumerate(parts) if any(char in part for char in "*?["))
        root = Path(*parts[:static]) if static else Path(".")
        files = []
        for match in sorted(root.glob(str(Path(*parts[static:])))):
            files += _text_files(match) if match.is_dir() else [match] if match.is_file() else []
        if not files:
            raise LmdistillError(f"data glob {source} matches no files")
    else:
        raise LmdistillError(
            f"data source {source} does not exist: give text files, directories, globs or hf:NAME datasets"
        )
    docs, entries = [], []
    for file in files:
        resolved = file.resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        doc_id = file.relative_to(root).as_posix()
        digest = sha256_file(file)
        docs.append(_Pending(doc_id, source, None, file.stat().st_size, path=file))
        entries.append({"path": doc_id, "sha256": digest})
    identity = {"kind": "files", "files": entries}
    return docs, identity, {"source": source, "kind": "files", "root": str(root.resolve()), "files": len(entries)}


def _text_files(directory: Path) -> list[Path]:
    found = [
        path
        for path in directory.rglob("*")
        if path.suffix.lower() in TEXT_SUFFIXES
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(directory).parts)
    ]
    return sorted(found, key=lambda path: path.relative_to(directory).as_posix())


def _resolve_hf(source: str) -> tuple[list[_Pending], dict[str, Any], dict[str, Any]]:
    """Load a Hugging Face dataset's ``text`` column (every split) into memory as documents."""
    name, _, config = source[3:].partition(":")
    if not name:
        raise LmdistillError(f"data source {source}: write hf:NAME or hf:NAME:CONFIG")
    try:
        import datasets
    except ImportError as exc:
        raise LmdistillError(
            f"data source {source} needs the datasets library: pip install datasets (or pass local text files)"
        ) from exc
    try:
        loaded = datasets.load_dataset(name, config or None)
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        raise LmdistillError(
            f"could not load the Hugging Face dataset {source[3:]}: {type(exc).__name__}: "
            f"{lines[0] if lines else ''}. Without a reachable hub, pass local text files instead"
        ) from exc
    splits = {"train": loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)
    docs, hashes = [], {}
    for split_name in sorted(splits):
        table = splits[split_name]
        if "text" not in table.column_names:
            raise LmdistillError(f"dataset {source[3:]} split {split_name} has no 'text' column: {table.column_names}")
        digest = hashlib.sha256()
        for row, text in enumerate(table["text"]):
            text = text or ""
            digest.update(f"{len(text)}:".encode() + text.encode("utf-8"))
            docs.append(_Pending(f"{split_name}/{row}", source, None, len(text.encode("utf-8")), text=text))
        hashes[split_name] = {"rows": len(table), "sha256": digest.hexdigest()}
    identity = {"kind": "hf", "name": name, "config": config or None, "splits": hashes}
    return docs, identity, {"source": source, "kind": "hf", "rows": len(docs)}


def _build(
    load: Callable[[], list[_Pending]],
    identity: dict[str, Any],
    fingerprint: str,
    inputs: list[dict[str, Any]],
    tokenizer: Any,
    val_fraction: float,
    directory: Path,
    progress: bool,
) -> PackedData:
    """Tokenize, split and write a prepared directory atomically (a staging directory renamed into place)."""
    docs = load()
    dtype, seq_len, eos = np.dtype(identity["dtype"]), identity["seq_len"], identity["eos_token_id"]
    with staged(directory, keep_existing=True) as staging:  # another process preparing the same data: keep its copy
        tokens_path = staging / "tokens.tmp"
        lengths = _tokenize(docs, tokenizer, tokens_path, dtype, progress)
        segments = _split(docs, lengths, identity["split"]["kind"], val_fraction, seq_len, eos)
        tokens = np.memmap(tokens_path, dtype=dtype, mode="r") if sum(lengths) else np.zeros(0, dtype)
        counts: dict[str, dict[str, int]] = {"documents": {}, "tokens": {}, "blocks": {}}
        per_source: dict[str, dict[str, dict[str, int]]] = {}
        for split_name in ("train", "val"):
            stream, blocks = _write_stream(staging / f"{split_name}.bin", tokens, segments[split_name], eos, seq_len)
            counts["documents"][split_name] = len(segments[split_name])
            counts["tokens"][split_name] = stream
            counts["blocks"][split_name] = blocks
            for start, stop, index in segments[split_name]:
                entry = per_source.setdefault(docs[index].source, {}).setdefault(
                    split_name, {"documents": 0, "tokens": 0}
                )
                entry["documents"] += 1
                entry["tokens"] += stop - start
        del tokens
        tokens_path.unlink()
        _check_blocks(counts, seq_len, val_fraction, identity["split"]["kind"])
        val_by_source = _blocks_by_source(docs, segments["val"], eos, seq_len, counts["blocks"]["val"])
        manifest = {
            **identity,
            "fingerprint": fingerprint,
            "inputs": inputs,
            "tokenizer_name": str(getattr(tokenizer, "name_or_path", "")),
            **counts,
            "per_source": per_source,
            "val_blocks_by_source": val_by_source,
            "sha256": {split_name: sha256_file(staging / f"{split_name}.bin") for split_name in ("train", "val")},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", "utf-8")
    log.info("prepared data in %s: %s", directory, counts["blocks"])
    return open_packed(directory)


def _pieces(text: str) -> Iterator[str]:
    """Cut text longer than ``_PIECE_CHARS`` where tokenizers split anyway.

    Preferably after a newline, else before a space, either one between two non-space characters (byte-level BPE
    merges runs of whitespace, so a cut inside one would change the tokens).
    """
    start = 0
    while len(text) - start > _PIECE_CHARS:
        end = start + _PIECE_CHARS
        for separator, offset in (("\n", 1), (" ", 0)):
            at = text.rfind(separator, start + 1, end)
            while at > start and (text[at - 1].isspace() or text[at + 1 : at + 2].isspace()):
                at = text.rfind(separator, start + 1, at)
            if at > start:
                end = at + offset
                break
        yield text[start:end]
        start = end
    yield text[start:]


def _tokenize(docs: list[_Pending], tokenizer: Any, path: Path, dtype: np.dtype, progress: bool) -> list[int]:
    """Tokenize every document in order into one flat token file; return each document's token count."""
    lengths = [0] * len(docs)
    limit = np.iinfo(dtype).max
    bar = tqdm(total=sum(doc.size for doc in docs), unit="B", unit_scale=True, desc="tokenizing", disable=not progress)
    pieces = ((index, piece) for index, doc in enumerate(docs) for piece in _pieces(doc.read()))
    with path.open("wb") as out:
        while batch := _take_batch(pieces):
            ids = tokenizer(
                [piece for _, piece in batch],
                add_special_tokens=False,
                return_attention_mask=False,
                return_token_type_ids=False,
                verbose=False,
            )["input_ids"]
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=sum(map(len, ids)))
            if flat.size and (flat.min() < 0 or flat.max() > limit):
                raise LmdistillError(
                    f"the tokenizer produced id {flat.max()}, beyond {dtype.name}: is len(tokenizer) wrong?"
                )
            out.write(flat.astype(dtype).tobytes())
            for (index, piece), piece_ids in zip(batch, ids, strict=True):
                lengths[index] += len(piece_ids)
                bar.update(len(piece.encode("utf-8")))
    bar.close()
    return lengths


def _take_batch(pieces: Iterator[tuple[int, str]]) -> list[tuple[int, str]]:
    batch, size = [], 0
    for item in pieces:
        batch.append(item)
        size += len(item[1])
        if size >= _BATCH_CHARS:
            break
    return batch


def _split(
    docs: list[_Pending], lengths: list[int], kind: str, val_fraction: float, seq_len: int, eos: int | None
) -> dict[str, list[Segment]]:
    """Assign token ranges to train and validation (see `prepare_data` for the rule); empty documents are skipped."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    nonempty = [i for i, n in enumerate(lengths) if n]
    if not nonempty:
        raise LmdistillError("the data holds no text: every document tokenized to nothing")

    def segments(indices: list[int]) -> list[Segment]:
        return [(offsets[i], offsets[i + 1], i) for i in indices]

    if kind == "corpus":
        return {s: segments([i for i in nonempty if docs[i].split == s]) for s in ("train", "val")}
    if val_fraction == 0:
        return {"train": segments(nonempty), "val": []}
    total = _stream_length(segments(nonempty), eos)
    want = seq_len * max(1, round(val_fraction * total / seq_len))
    if len(nonempty) == 1:
        start, stop, index = segments(nonempty)[0]
        held = min(want, stop - start)
        return {"train": [(start, stop - held, index)], "val": [(stop - held, stop, index)]}
    val = {i for i in nonempty if hash_fraction(docs[i].doc_id) < val_fraction}
    if _stream_length(segments(sorted(val)), eos) < seq_len:
        train = [i for i in nonempty if i not in val]
        while len(train) > 1 and _stream_length(segments(sorted(val)), eos) < want:
            val.add(train.pop())
    return {
        "train": segments([i for i in nonempty if i not in val]),
        "val": segments([i for i in nonempty if i in val]),
    }


def _stream_length(segments: list[Segment], eos: int | None) -> int:
    separators = max(0, len(segments) - 1) if eos is not None else 0
    return sum(stop - start for start, stop, _ in segments) + separators


def _write_stream(
    path: Path, tokens: np.ndarray, segments: list[Segment], eos: int | None, seq_len: int
) -> tuple[int, int]:
    """Write the segments, EOS between them, up to the last whole block; return (stream tokens, blocks)."""
    stream = _stream_length(segments, eos)
    blocks = stream // seq_len
    remaining = blocks * seq_len
    separator = np.array([] if eos is None else [eos], dtype=tokens.dtype).tobytes()
    with path.open("wb") as out:
        for k, (start, stop, _) in enumerate(segments):
            if k and separator and remaining:
                out.write(separator)
                remaining -= 1
            stop = min(stop, start + remaining)
            for chunk in range(start, stop, _WRITE_TOKENS):
                out.write(tokens[chunk : min(stop, chunk + _WRITE_TOKENS)].tobytes())
            remaining -= max(0, stop - start)
    return stream, blocks


def _blocks_by_source(
    docs: list[_Pending], segments: list[Segment], eos: int | None, seq_len: int, blocks: int
) -> dict[str, list[int]]:
    """Per source, the ``[start, stop)`` range of a split's blocks that hold only that source's text (EOS between its
    documents included); blocks that straddle two sources belong to neither. Segments follow the documents' order,
    which groups them by source."""
    ranges: dict[str, list[int]] = {}
    position = 0
    for k, (start, stop, index) in enumerate(segments):
        position += 1 if k and eos is not None else 0
        first, position = position, position + stop - start
        span = ranges.setdefault(docs[index].source, [first, position])
        span[1] = position
    return {
        source: [-(-first // seq_len), min(blocks, last // seq_len)]
        for source, (first, last) in ranges.items()
        if min(blocks, last // seq_len) > -(-first // seq_len)
    }


def _check_blocks(counts: dict[str, dict[str, int]], seq_len: int, val_fraction: float, kind: str) -> None:
    tokens, blocks = counts["tokens"], counts["blocks"]
    if not blocks["train"]:
        raise LmdistillError(
            f"too little text: {tokens['train']} training tokens do not fill one block of seq_len {seq_len}; "
            "add text or lower seq_len"
        )
    if not blocks["val"] and (val_fraction > 0 or kind == "corpus"):
        raise LmdistillError(
            f"too little text for validation: {tokens['val']} held-out tokens do not fill one block of seq_len "
            f"{seq_len}; add text, lower seq_len, or pass val_fraction 0"
        )
