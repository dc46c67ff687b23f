"""A prepared dataset on disk: its layout and name, the checks of ``meta.json`` (and of nanoGPT's folders, which
have none), and ``load_dataset``, which maps the token files after checking them.

A prepared dataset is a directory holding ``train.bin`` and ``val.bin`` (token ids in a flat array, uint16
unless the vocabulary needs uint32: nanoGPT's layout) and ``meta.json``, which says what they hold; a directory
that has a ``meta.json`` is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sophia.lm.data.partials import _PARTIAL_NAME
from sophia.lm.tokenizers import DataError, canonical_spec, read_nanogpt_meta

FORMAT = 1
META_FILE = "meta.json"
TRAIN_FILE = "train.bin"
VAL_FILE = "val.bin"
DTYPES: dict[str, type[np.unsignedinteger]] = {"uint16": np.uint16, "uint32": np.uint32}
CORPORA = ("shakespeare", "openwebtext")

NANOGPT_VOCAB_SIZE = 50257  # nanoGPT's default when a data directory has no meta.pkl: GPT-2


@dataclass(frozen=True)
class TokenDataset:
    """A loaded dataset: ``train`` and ``val`` are read-only memory maps of the token files."""

    dir: Path
    train: np.memmap
    val: np.memmap
    vocab_size: int
    meta: dict[str, Any] = field(repr=False)

    @property
    def tokenizer_spec(self) -> str:
        return self.meta["tokenizer"]


def dataset_name(corpus: str, tokenizer: str) -> str:
    """The directory name of a dataset under the data root.

    >>> dataset_name("shakespeare", "bpe:2048")
    'shakespeare-bpe-2048'
    >>> dataset_name("/tmp/my corpus.txt", "byte")[:10]
    'my-corpus-'
    """
    tok = _path_safe(canonical_spec(tokenizer))
    if corpus in CORPORA:
        return f"{corpus}-{tok}"
    path = _absolute(corpus)
    stem = _path_safe(path.name if path.is_dir() else path.stem) or "corpus"
    return f"{stem}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}-{tok}"


def check_corpus(corpus: str, tokenizer: str) -> None:
    """What ``prepare`` refuses before any work in a corpus that is not a prepared dataset folder: a tokenizer
    spec that names no tokenizer (TokenizerSpecError), a corpus that is neither a name nor a file or folder."""
    canonical_spec(tokenizer)
    if corpus not in CORPORA and not _absolute(corpus).exists():
        raise DataError(f"unknown corpus {corpus!r}: not one of {', '.join(CORPORA)} and no file or folder of that "
                        "name")


def check_data_root(data_root: Path) -> None:
    """A DataError, before any work, when ``data_root`` (or a folder above it) is a file: no dataset can go there."""
    for folder in (data_root, *data_root.parents):
        if folder.exists():
            if not folder.is_dir():
                raise DataError(f"--data-root {data_root}: {folder} is a file, not a directory")
            return


def prepared_meta(corpus: str) -> dict[str, Any] | None:
    """The description of the prepared dataset folder (train.bin and val.bin, read as they are) that ``corpus``
    names: its ``meta.json``, or for a nanoGPT folder what its ``meta.pkl`` says (tokenizer ``gpt2`` or
    ``nanogpt-char``). None when ``corpus`` is a corpus name or raw text, or when the folder's description cannot
    be read (loading it then says why)."""
    if corpus in CORPORA or not _is_dataset_dir(_absolute(corpus)):
        return None
    d = _absolute(corpus)
    try:
        return _checked_meta(d) if (d / META_FILE).exists() else _nanogpt_meta(d)
    except (OSError, DataError):
        return None


def folder_tokenizer(corpus: str, asked: str | None) -> str | None:
    """For a prepared dataset folder ``corpus``: its tokenizer (``prepared_meta``), the one a run on it uses
    and records, after refusing an ``asked`` tokenizer that differs (the folder's token files cannot be read with
    another). None for any other corpus."""
    meta = prepared_meta(corpus)
    own = None if meta is None else meta["tokenizer"]
    if own is None or asked is None:
        return own
    try:
        same = canonical_spec(asked) == canonical_spec(own)
    except ValueError:  # nanoGPT's character tokenizer has no spec
        same = asked.strip().lower() == own
    if not same:
        raise DataError(f"--tokenizer {asked}: {_absolute(corpus)} is a prepared dataset tokenized with {own}, which "
                        f"it is always read with; leave out --tokenizer, or prepare the text with --tokenizer "
                        f"{asked} (sophia data prepare TEXT --tokenizer {asked})")
    return own


def _is_dataset_dir(path: Path) -> bool:
    """A directory that already holds token files (ours, or nanoGPT's train.bin/val.bin)."""
    return path.is_dir() and (path / TRAIN_FILE).is_file() and (path / VAL_FILE).is_file()


def dataset_ready(corpus: str, tokenizer: str, data_root: Path) -> Path | None:
    """The directory ``prepare`` would return, if it is already complete (a cheap check, no building);
    else None."""
    if corpus not in CORPORA and _is_dataset_dir(_absolute(corpus)):
        return _absolute(corpus)
    try:
        spec = canonical_spec(tokenizer)
        target = Path(data_root) / dataset_name(corpus, spec)
    except (ValueError, DataError):
        return None
    if not (target / META_FILE).is_file():
        return None
    try:
        _checked_meta(target)
    except DataError:
        return None
    return target


def load_dataset(path: Path) -> TokenDataset:
    """Map the token files of a prepared dataset, after checking them against ``meta.json``.

    A nanoGPT data directory (``train.bin`` and ``val.bin`` as uint16, no ``meta.json``) is read too; its
    vocabulary size comes from its ``meta.pkl``, or is GPT-2's 50257 without one.
    """
    d = Path(path)
    if not d.is_dir():
        raise DataError(f"no dataset at {d}: the directory does not exist; prepare one with "
                        "`sophia data prepare CORPUS --tokenizer SPEC`")
    if _PARTIAL_NAME.fullmatch(d.name):
        raise DataError(f"{d} is the unfinished work of an interrupted prepare, not a dataset; prepare again "
                        "(it will be removed)")
    if (d / META_FILE).exists():
        meta = _checked_meta(d)
    elif (d / TRAIN_FILE).is_file() and (d / VAL_FILE).is_file():
        meta = _nanogpt_meta(d)
    else:
        raise DataError(f"{d} is not a dataset: it has no {META_FILE} (nor nanoGPT's {TRAIN_FILE} and "
                        f"{VAL_FILE}); prepare it with `sophia data prepare CORPUS --tokenizer SPEC`")
    dtype = DTYPES[meta["dtype"]]
    train = np.memmap(d / TRAIN_FILE, dtype=dtype, mode="r")
    val = np.memmap(d / VAL_FILE, dtype=dtype, mode="r")
    vocab = int(meta["vocab_size"])
    for name, tokens in ((TRAIN_FILE, train), (VAL_FILE, val)):
        top = _max_token(tokens)
        if top >= vocab:  # caught here, not as an embedding index error (a device-side assert on a GPU) mid-run
            raise DataError(f"{d / name} holds token id {top}, but the vocabulary has {vocab} ids (0 to {vocab - 1}) "
                            f"per its {META_FILE if meta.get('format') else 'meta.pkl (or the GPT-2 default)'}; the "
                            "token files and the vocabulary do not belong together: prepare the data again")
    return TokenDataset(dir=d, train=train, val=val, vocab_size=vocab, meta=meta)


def _max_token(tokens: np.ndarray, chunk: int = 1 << 26) -> int:
    """The largest id in a token memmap, read once in chunks (about a second per 2 GB)."""
    top = 0
    for start in range(0, len(tokens), chunk):
        top = max(top, int(tokens[start:start + chunk].max()))
    return top


def _checked_meta(d: Path) -> dict[str, Any]:
    """``meta.json`` of ``d`` after checking it and the sizes of the token files; a DataError says what is wrong."""
    again = f"delete {d} and prepare it again"
    meta_path = d / META_FILE
    if not meta_path.is_file():
        raise DataError(f"it has no {META_FILE} (a foreign directory, or one from an older interrupted run)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{meta_path} is not valid JSON ({e}); {again}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path} is not a JSON object; {again}")
    fmt = meta.get("format")
    if isinstance(fmt, int) and fmt > FORMAT:
        raise DataError(f"{d} has data format {fmt}, newer than this sophia reads ({FORMAT}); upgrade sophia-lab")
    if fmt != FORMAT:
        raise DataError(f"{meta_path} has format {fmt!r}, not {FORMAT}; {again}")
    for key, kind in (("vocab_size", int), ("train_tokens", int), ("val_tokens", int), ("dtype", str),
                      ("tokenizer", str), ("corpus", str), ("source_sha256", str)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise DataError(f"{meta_path}: {key!r} is missing or not {kind.__name__}; {again}")
    if meta["dtype"] not in DTYPES:
        raise DataError(f"{meta_path}: dtype {meta['dtype']!r} is not one of {', '.join(DTYPES)}; {again}")
    if meta["vocab_size"] < 1 or meta["vocab_size"] > np.iinfo(DTYPES[meta["dtype"]]).max + 1:
        raise DataError(f"{meta_path}: vocab_size {meta['vocab_size']} does not fit dtype {meta['dtype']}; {again}")
    itemsize = np.dtype(DTYPES[meta["dtype"]]).itemsize
    for fname, key in ((TRAIN_FILE, "train_tokens"), (VAL_FILE, "val_tokens")):
        f = d / fname
        if not f.is_file():
            raise DataError(f"{f} is missing; {again}")
        size, want = f.stat().st_size, meta[key] * itemsize
        if size != want or want == 0:
            raise DataError(f"{f} has {size:,} bytes but {META_FILE} says {meta[key]:,} {meta['dtype']} tokens "
                            f"({want:,} bytes): the file is truncated or replaced; {again}")
    return meta


def _nanogpt_meta(d: Path) -> dict[str, Any]:
    pkl = read_nanogpt_meta(d)
    vocab_size = pkl["vocab_size"] if pkl is not None else NANOGPT_VOCAB_SIZE
    if vocab_size > 2**16:
        raise DataError(f"{d}/meta.pkl says vocab_size {vocab_size}, which uint16 token files cannot hold")
    counts = {}
    for fname in (TRAIN_FILE, VAL_FILE):
        size = (d / fname).stat().st_size
        if size == 0 or size % 2:
            raise DataError(f"{d / fname} has {size} bytes, not a whole non-zero number of uint16 tokens; "
                            "prepare the data again")
        counts[fname] = size // 2
    tokenizer = "nanogpt-char" if pkl is not None and "stoi" in pkl else "gpt2"
    if pkl is not None and "stoi" not in pkl and vocab_size != NANOGPT_VOCAB_SIZE:
        tokenizer = "unknown"
    return {"format": None, "nanogpt": True, "corpus": str(d), "tokenizer": tokenizer, "vocab_size": vocab_size,
            "dtype": "uint16", "train_tokens": counts[TRAIN_FILE], "val_tokens": counts[VAL_FILE]}


def _absolute(corpus: str | os.PathLike[str]) -> Path:
    return Path(corpus).expanduser().resolve()


def _path_safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-.")
