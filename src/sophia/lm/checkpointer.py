"""The run's checkpoints: whether a run resumes, what it resumes from, when it saves, and what a checkpoint holds.

The file formats (one ``.pt`` file, or a DCP folder under FSDP2), atomic writes and rotation are in
:mod:`sophia.lm.checkpoint`; :class:`Checkpointer` decides and assembles. A checkpoint holds the model and
optimizer state, the run's counters, every rank's RNG state and the data generator's, the config, and the
identity of the dataset and tokenizer it trained on; a resumed run continues bitwise (on CPU) as if never
interrupted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sophia.lm.checkpoint import (
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
    set_aside,
)
from sophia.lm.config import LEGACY_DEFAULTS, TrainConfig, TrainError
from sophia.lm.distributed import Parallel
from sophia.lm.model import GPTConfig
from sophia.lm.schedule import due

# the settings a checkpoint cannot continue under other values of
_FIXED = ("optimizer", "n_layer", "n_head", "n_embd", "block_size", "bias", "qk_norm", "vocab_pad_multiple", "corpus",
          "tokenizer")
_DATASET_KEYS = ("source_sha256", "train_tokens", "val_tokens", "vocab_size", "tokenizer")


@dataclass
class TrainingState:
    """What a checkpoint saves and restores (references to the run's live objects)."""

    model: torch.nn.Module          # the module the step calls (the FSDP2 module for sharded state)
    gpt: torch.nn.Module            # the GPT itself (its state dict for a plain checkpoint)
    optimizer: torch.optim.Optimizer
    counters: dict[str, Any]
    data_generator: torch.Generator
    model_config: GPTConfig
    dataset_dir: Path
    dataset_meta: dict[str, Any]
    tokenizer_sha256: str | None


class Checkpointer:
    def __init__(self, cfg: TrainConfig, ranks: Parallel, log: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.out_dir = Path(cfg.out_dir)
        self.ranks = ranks
        self.log = log

    # -- resuming -------------------------------------------------------------------------------
    def resumes(self, mode: bool | str) -> bool:
        """Whether this run continues a checkpoint in the out-dir: ``mode`` True (it must), False (there must be
        none) or ``"auto"`` (when there is one)."""
        exists = has_checkpoint(self.out_dir)
        if mode == "auto":
            return exists
        if exists and not mode:
            raise TrainError(f"{self.out_dir} already holds a checkpoint; pass --resume to continue it (or "
                             "--resume auto) or choose another --out-dir (nothing was changed)")
        if mode and not exists:
            raise TrainError(f"--resume: no checkpoint in {self.out_dir}")
        return bool(mode)

    def load(self) -> dict[str, Any]:
        """The newest good checkpoint. A damaged one newer than it is moved aside (by rank 0): the run's
        checkpoints from here on are newer than the resumed one, and a damaged one among them would count toward
        --keep-checkpoints (or be overwritten when its step is saved again)."""
        ckpt = load_checkpoint(self.out_dir)
        if self.ranks.main:
            for path, reason in ckpt["skipped"]:
                aside = set_aside(Path(path))
                self.log(f"warning: checkpoint {path} {reason}: moved aside to {aside.name} (never read; delete it "
                         f"when you no longer need it); resuming from the older {Path(ckpt['path']).name}")
        saved_world, world, accum = ckpt.get("world_size", 1), self.ranks.world_size, self.cfg.grad_accum
        if saved_world != world and accum < max(world, saved_world):
            raise TrainError(f"--resume: the checkpoint was written by {saved_world} rank(s), not {world}, and "
                             f"--grad-accum {accum} is below one of them, so the global batch would change; resume "
                             "on the same number of ranks")
        return ckpt

    def restore(self, ckpt: dict[str, Any], state: TrainingState) -> None:
        """Continue ``ckpt`` in ``state``: the same model, optimizer and data; weights, optimizer state, counters
        and RNG states loaded. TrainError (nothing loaded) when it does not fit this run."""
        cfg, ranks = self.cfg, self.ranks
        saved = ckpt["config"]
        for key in _FIXED:
            if saved.get(key, LEGACY_DEFAULTS.get(key)) != getattr(cfg, key):
                raise TrainError(f"--resume: the checkpoint was trained with {key}={saved.get(key)!r}, "
                                 f"not {getattr(cfg, key)!r}")
        self._check_same_dataset(ckpt, state)
        sharded_ckpt = ckpt.get("format") == "dcp"
        if sharded_ckpt != ranks.sharded:
            raise TrainError(f"--resume: the checkpoint {Path(ckpt['path']).name} was written by --parallel "
                             f"{'fsdp' if sharded_ckpt else 'ddp'}, this run uses --parallel {cfg.parallel}; "
                             "resume with the --parallel it was written by")
        try:
            if sharded_ckpt:
                self._load_sharded(ckpt, state)
            else:
                state.gpt.load_state_dict(ckpt["model"])
                state.optimizer.load_state_dict(ckpt["optimizer"])
            state.counters.update(ckpt["counters"])
            rng = ckpt["rng"]
            per_rank = rng["torch_per_rank"]
            if ranks.rank < len(per_rank):
                torch.set_rng_state(per_rank[ranks.rank])
            state.data_generator.set_state(rng["data"])
            if ranks.cuda and "cuda_per_rank" in rng and ranks.rank < len(rng["cuda_per_rank"]):
                torch.cuda.set_rng_state(rng["cuda_per_rank"][ranks.rank], ranks.device)
        except (KeyError, IndexError, RuntimeError, ValueError) as e:
            raise TrainError(f"--resume: the checkpoint {ckpt.get('path', self.out_dir)} does not fit this run "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None

    def _check_same_dataset(self, ckpt: dict[str, Any], state: TrainingState) -> None:
        """The data a resumed run reads must be the data the checkpoint trained on."""
        saved = ckpt.get("dataset")
        if not saved:
            return
        meta = state.dataset_meta
        for key in _DATASET_KEYS:
            if saved.get(key) is not None and meta.get(key) is not None and saved[key] != meta[key]:
                raise TrainError(f"--resume: the dataset at {state.dataset_dir} is not the one the checkpoint trained "
                                 f"on ({key} {meta.get(key)!r}, was {saved[key]!r} at {saved.get('dir')}); point "
                                 "--data-root at the original data")

    # -- saving ---------------------------------------------------------------------------------
    def due(self, step: int, stop: bool = False) -> bool:
        """Whether a checkpoint is written after completed step ``step`` (periodically, at the end, on a stop)."""
        return due(step, self.cfg.checkpoint_every, self.cfg.max_steps) or stop

    def save(self, state: TrainingState) -> None:
        """Written by rank 0 (under FSDP2 every rank its shards), with every rank's RNG state: a collective, all
        ranks call it. The caller checks first that the state is finite."""
        cfg, ranks, counters = self.cfg, self.ranks, state.counters
        rng = {"torch_per_rank": ranks.gather(torch.get_rng_state()), "data": state.data_generator.get_state()}
        if ranks.cuda:
            rng["cuda_per_rank"] = ranks.gather(torch.cuda.get_rng_state(ranks.device))
        opt = state.optimizer
        if ranks.sharded:
            opt_sd_extra = {k: v for k, v in opt.state_dict().items() if k not in ("state", "param_groups")} \
                if hasattr(opt, "diagnostics") else {}
            saved = bool(opt.state)
            info = {"optimizer_counters": opt_sd_extra, "optimizer_saved": saved}
            sharded_state = self._sharded_state(state, optimizer=saved)
        elif not ranks.main:
            return
        else:
            info = {"model": state.gpt.state_dict(), "optimizer": opt.state_dict()}
        dataset_dir = str(Path(state.dataset_dir).resolve())
        info.update({
            "step": counters["step"], "counters": dict(counters), "config": cfg.to_dict(),
            "model_config": state.model_config.to_dict(), "rng": rng,
            "world_size": ranks.world_size, "dataset_dir": dataset_dir,  # (sample reads dataset_dir)
            "dataset": {"dir": dataset_dir, **{k: state.dataset_meta.get(k) for k in _DATASET_KEYS},
                        "tokenizer_sha256": state.tokenizer_sha256},
        })
        if ranks.sharded:
            save_sharded_checkpoint(self.out_dir, sharded_state, info, main=ranks.main, keep=cfg.keep_checkpoints,
                                    log=self.log)
        else:
            save_checkpoint(self.out_dir, info, keep=cfg.keep_checkpoints, log=self.log)

    # -- FSDP2: sharded state -------------------------------------------------------------------
    @staticmethod
    def _sharded_state(state: TrainingState, optimizer: bool) -> dict[str, Any]:
        """The model's and (if ``optimizer``) the optimizer's sharded state dicts, keyed by parameter names.

        get_optimizer_state_dict fills an empty optimizer state by a step with lr 0, which counts a step
        (AdamW's bias correction, Sophia-H's refresh schedule): never asked before the first real step."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        out = {"model": get_model_state_dict(state.model)}
        if optimizer:
            out["optimizer"] = get_optimizer_state_dict(state.model, state.optimizer)
        return out

    def _load_sharded(self, ckpt: dict[str, Any], state: TrainingState) -> None:
        """Each rank reads its shards of a DCP checkpoint (DCP reshards when the world size changed)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        sharded = self._sharded_state(state, optimizer=ckpt.get("optimizer_saved", True))
        dcp.load(sharded, checkpoint_id=ckpt["path"])
        set_model_state_dict(state.model, sharded["model"])
        if "optimizer" in sharded:  # a step-0 checkpoint has no optimizer state yet
            set_optimizer_state_dict(state.model, state.optimizer, sharded["optimizer"])
        counters = ckpt.get("optimizer_counters")
        if counters:  # Sophia's refresh counts live beside its state dict, which the name-keyed form drops
            state.optimizer.load_state_dict({**state.optimizer.state_dict(), **counters})


__all__ = ["Checkpointer", "TrainingState"]
