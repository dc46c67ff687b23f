"""``sophia sample``: text from a trained run's checkpoint, streamed as it is generated."""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from numbers import Real
from pathlib import Path

import torch

from sophia.lm.checkpoint import TOKENIZER_DIR, load_checkpoint, load_sharded_model, tokenizer_fingerprint
from sophia.lm.config import TrainError
from sophia.lm.model import GPT, GPTConfig

MAX_NEW_TOKENS = 100_000  # per sample; without a KV cache each token costs a forward of the context
# Tokens a decoder holds back while they end inside a multi-byte character (UTF-8 needs at most 4
# bytes; merged BPE tokens reach it sooner); past this it prints what it has.
_HOLD_TOKENS = 8


def check_settings(max_new_tokens: int, temperature: float, top_k: int | None, num_samples: int) -> None:
    """Raise TrainError naming the first sampling setting that is out of range."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise TrainError(f"--max-new-tokens must be between 1 and {MAX_NEW_TOKENS}, got {max_new_tokens!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise TrainError(f"--num-samples must be >= 1, got {num_samples!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, Real) \
            or not (math.isfinite(temperature) and temperature >= 0):
        raise TrainError(f"--temperature must be a finite number >= 0 (0: greedy, always the most likely "
                         f"token), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise TrainError(f"--top-k must be >= 0 (0: no top-k filtering), got {top_k!r}")


class _Detokenizer:
    """Decodes a growing token sequence piece by piece; a character whose bytes span several
    tokens is held back until its last token arrives (the decoders render a partial one as U+FFFD)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.pending: list[int] = []

    def push(self, ids: Sequence[int]) -> str:
        self.pending.extend(ids)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < _HOLD_TOKENS:
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load(folder: Path):
    """``(tokenizer, fingerprint)`` of ``folder``, or why it cannot be read (without the loader's advice, which
    is for a dataset folder)."""
    from sophia.lm.data import DataError
    from sophia.lm.tokenizers import load_tokenizer

    if not any((folder / name).is_file() for name in ("meta.json", "meta.pkl", "train.bin")):
        return "it has no meta.json"
    try:
        return load_tokenizer(folder), tokenizer_fingerprint(folder)
    except (DataError, OSError, ValueError) as e:
        return re.split(r"; (?:delete|prepare|remove|nanoGPT's) ", str(e))[0]


def _mismatch(tok, fingerprint: str | None, ckpt: dict) -> str | None:
    """Why ``tok`` is not the tokenizer ``ckpt`` trained with, or None. Checkpoints since the run folder kept a
    fingerprint say exactly; older ones by the spec and the vocabulary size."""
    saved = ckpt.get("dataset") or {}
    vocab = ckpt["model_config"]["vocab_size"]
    want = saved.get("tokenizer_sha256")
    if want is not None and fingerprint != want:
        if tok.name == saved.get("tokenizer"):
            return f"it holds a {tok.name} trained on other text than the checkpoint's"
        return f"it holds {tok.name}, the checkpoint trained with {saved.get('tokenizer') or 'another'}"
    if isinstance(saved.get("tokenizer"), str) and tok.name != saved["tokenizer"]:
        return f"it holds {tok.name}, the checkpoint trained with {saved['tokenizer']}"
    if tok.vocab_size > vocab:
        return f"its {tok.vocab_size} tokens do not fit the model's vocabulary of {vocab}"
    return None


def run_tokenizer(out_dir: Path, ckpt: dict, log: Callable[[str], None] | None = _stderr):
    """The tokenizer ``ckpt`` trained with: the run folder's copy, else (said through ``log``) its dataset's. A
    copy that is damaged or another run's is never used: the error says which and what to do."""
    kept = Path(out_dir) / TOKENIZER_DIR
    name = Path(ckpt["path"]).name
    problem = None
    if kept.is_dir():
        got = _load(kept)
        if isinstance(got, str):
            problem = f"the run folder's tokenizer copy {kept} is damaged ({got})"
        else:
            why = _mismatch(*got, ckpt)
            if why is None:
                return got[0]
            problem = f"the run folder's tokenizer copy {kept} is not the one {name} trained with ({why}; left by " \
                      "another run in this folder?)"
    dataset = Path(ckpt.get("dataset_dir") or (ckpt.get("dataset") or {}).get("dir") or "")
    got = _load(dataset) if str(dataset) not in ("", ".") and dataset.is_dir() else None
    if got is not None and not isinstance(got, str) and _mismatch(*got, ckpt) is None:
        if problem and log is not None:
            log(f"warning: {problem}; using the tokenizer of the dataset {dataset} instead (`sophia train --out-dir "
                f"{out_dir} --resume` writes the copy again)")
        return got[0]
    config = ckpt.get("config") or {}
    where = (f"the dataset it trained on, {dataset}, is " + ("gone" if got is None else
             f"unusable too ({got if isinstance(got, str) else _mismatch(*got, ckpt)})"))
    first = problem or f"{out_dir} has no {TOKENIZER_DIR}/ copy (runs of earlier versions kept none)"
    raise TrainError(f"{first}, and {where}: prepare that dataset again with `sophia data prepare "
                     f"{config.get('corpus', 'CORPUS')} --tokenizer {config.get('tokenizer', 'SPEC')} --data-root "
                     f"{dataset.parent}` (the same corpus gives the same tokenizer), then sample again")


@torch.no_grad()
def _next_token(model: GPT, idx: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator) -> torch.Tensor:
    if temperature == 0:  # greedy: the most likely token, no randomness
        logits, _ = model(idx[:, -model.config.block_size:])
        return logits[:, -1, :].argmax(dim=-1, keepdim=True)
    return model.generate(idx, 1, temperature=temperature, top_k=top_k, generator=generator)[:, -1:]


def stream(out_dir: str, *, start: str = "\n", max_new_tokens: int = 300, temperature: float = 0.8,
           top_k: int | None = 200, seed: int = 0, num_samples: int = 1,
           log: Callable[[str], None] | None = _stderr) -> Iterator[tuple[int, str]]:
    """Yield ``(sample number, text)`` pieces as they are generated: each sample's prompt first,
    then its new text a token (or a completed character) at a time. ``temperature=0`` is greedy.
    Warnings (a damaged newest checkpoint skipped, the dataset's tokenizer used) go to ``log``."""
    check_settings(max_new_tokens, temperature, top_k, num_samples)
    top_k = top_k or None
    ckpt = load_checkpoint(Path(out_dir), purpose="sample")
    for path, reason in ckpt["skipped"]:
        if log is not None:
            log(f"warning: checkpoint {path} {reason}; sampling from the older {Path(ckpt['path']).name}")
    model = GPT(GPTConfig(**ckpt["model_config"]))
    if ckpt.get("format") == "dcp":  # written by --parallel fsdp: the shards, assembled here
        load_sharded_model(Path(ckpt["path"]), model)
    else:
        model.load_state_dict(ckpt["model"])
    model.eval()
    tok = run_tokenizer(Path(out_dir), ckpt, log)
    try:
        ids = tok.encode(start) or [0]
    except ValueError as e:  # a character-level vocabulary lacks one of the prompt's characters
        raise TrainError(f"--start: {e}") from None
    gen = torch.Generator().manual_seed(seed)
    for i in range(num_samples):
        idx = torch.tensor([ids], dtype=torch.long)
        text = _Detokenizer(tok)
        yield i, text.push(ids)
        for _ in range(max_new_tokens):
            nxt = _next_token(model, idx, temperature, top_k, gen)
            idx = torch.cat([idx, nxt], dim=1)
            piece = text.push(nxt[0].tolist())
            if piece:
                yield i, piece
        yield i, text.flush()


def sample(out_dir: str, *, start: str = "\n", max_new_tokens: int = 300, temperature: float = 0.8,
           top_k: int | None = 200, seed: int = 0, num_samples: int = 1,
           log: Callable[[str], None] | None = _stderr) -> list[str]:
    """The samples of :func:`stream`, each as one string (prompt included)."""
    parts: list[list[str]] = []
    for i, piece in stream(out_dir, start=start, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_k=top_k, seed=seed, num_samples=num_samples, log=log):
        if i == len(parts):
            parts.append([])
        parts[i].append(piece)
    return ["".join(p) for p in parts]
