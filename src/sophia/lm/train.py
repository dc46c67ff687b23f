"""``sophia train``: one training loop for every optimizer.

Step ``i`` (0-based) draws ``grad_accum`` micro-batches (over all ranks: under DDP each rank runs
``grad_accum / world_size`` of them, as the GPT-2 presets' 480 sequences per step assume),
backpropagates their mean loss, clips the gradient norm, sets the scheduled lr and steps the
optimizer, unless the gradient norm is not finite: then the step is skipped (parameters and
optimizer state untouched), counted and logged, and after ``max_skipped_steps`` such steps in a row
the run stops with its last good checkpoint intact. Sophia-G then refreshes its
Gauss-Newton-Bartlett estimate after steps k-1, 2k-1, ... (the authors' schedule) on a fresh
batch; Sophia-H hands a Hutchinson estimate over before its refresh steps. Every extra
forward/backward is counted in the logs. Events of step ``i`` are logged with ``step = i+1``
(steps completed); the checkpoint after it holds ``step = i+1``; a resumed run drops logged
events after its checkpoint and continues bitwise as if never interrupted (on CPU).

On CUDA the loop is built for throughput: compiled model (training and evaluation), bf16
autocast, TF32 for fp32 matmuls, pinned and non-blocking batch copies with the next micro-batch
prepared while the current one computes, losses summed on the device (one host sync per step, for
the finite-gradient check, and one per logged step), fused AdamW and SophiaG's CUDA-graph step.
"""

from __future__ import annotations

import datetime
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sophia.hessian import SampledLoss, hutchinson
from sophia.hessian.refresh import (
    AllReduceSum,
    HutchinsonAverage,
    WrapperAverage,
    gnb_refresh_micro_batches,
    label_generator,
)
from sophia.lm import parallel
from sophia.lm.checkpoint import (
    METRICS,
    MetricsLog,
    has_checkpoint,
    keep_tokenizer,
    load_checkpoint,
    remove_stale,
    save_checkpoint,
    save_sharded_checkpoint,
    set_aside,
    tokenizer_fingerprint,
)
from sophia.lm.config import LEGACY_DEFAULTS, TrainConfig, TrainError, check_writable_dir
from sophia.lm.device import resolve_device as check_device
from sophia.lm.memory import GiB, device_memory_bytes, estimate_run, fit_advice, flops_per_token, peak_tflops
from sophia.lm.model import GPT, GPTConfig
from sophia.lm.muon import cpu_has_native_bf16
from sophia.lm.optimizers import NEEDS_CREATE_GRAPH, OptimizerSettings, build_optimizer, needs_create_graph
from sophia.lm.tokenizers import parse_spec


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to lr, cosine decay to min_lr at decay_steps, then min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if step >= cfg.decay_steps:
        return cfg.min_lr
    span = max(1, cfg.decay_steps - cfg.warmup_steps)
    ratio = (step - cfg.warmup_steps) / span
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def resolve_device(device_pref: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """The device ``--device`` names (``auto``: CUDA when present); under torchrun, each rank's own GPU."""
    device = check_device(device_pref, allow_auto=True)
    if device.type == "cuda":
        if world_size > 1:
            device = torch.device("cuda", local_rank)
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise TrainError(f"--device {device_pref}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


class Distributed:
    """Rank bookkeeping; the process group (torchrun) is formed by :meth:`start`, after the data is ready."""

    def __init__(self, device_pref: str, timeout_min: float = 30.0, sharded: bool = False) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(device_pref, self.local_rank, self.world_size)
        self.timeout_min = timeout_min
        self.enabled = self.world_size > 1
        self.sharded = sharded  # FSDP2: a process group even for one rank (sharding over one, same code path)
        self._owns_group = False

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if dist.is_initialized():
            return
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=self.timeout_min)
        if self.enabled:
            dist.init_process_group(backend, timeout=timeout)
            self._owns_group = True
        elif self.sharded:  # one process without torchrun: a group of one, no rendezvous needed
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
            self._owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t)
        return t

    def all_reduce_mean_(self, tensors: list[torch.Tensor]) -> None:
        if self.enabled:
            for t in tensors:
                dist.all_reduce(t)
                t.div_(self.world_size)

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _vocab_guess(tokenizer: str) -> int:
    """The vocabulary a tokenizer spec gives, known before any data is read (GPT-2's if unsure)."""
    try:
        kind, n = parse_spec(tokenizer)
    except ValueError:
        return 50257
    return {"byte": 256}.get(kind, n or 50257)


def use_bf16(cfg: TrainConfig, device_type: str) -> bool:
    if cfg.dtype == "bfloat16":
        return True
    if cfg.dtype == "auto" and device_type == "cuda":
        return torch.cuda.is_bf16_supported() if torch.cuda.is_available() else True
    return False


@contextmanager
def _tf32(enabled: bool):
    """TF32 matmuls and convolutions for the block; the caller's settings afterwards."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


class StopRequestedError(Exception):
    """SIGINT or SIGTERM arrived: the current step finished and a checkpoint was written."""


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor is finite, with one host sync per device. Optimizer state can mix devices (a
    step count kept on the CPU beside CUDA moments), so the flags are reduced per device."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel():
            flags.setdefault(t.device, []).append(torch.isfinite(t).all())
    return all(bool(torch.stack(f).all().item()) for f in flags.values())


def in_forward_sampled_losses(model: torch.nn.Module, inputs: Sequence[Callable[[], torch.Tensor]],
                              generator_for: Callable[[int], torch.Generator],
                              autocast: Any = None) -> list[Callable[[], SampledLoss]]:
    """Sophia-G's sampled-label losses as ``sophia train`` computes them, one callable per micro-batch for the
    shared refresh: ``inputs[m]()`` gives micro-batch m's tokens (B, T) (read when the refresh reaches it),
    one uniform number per position comes from ``generator_for(m)``, and the harness's GPT draws the labels
    from them inside its (compiled) forward. Every position is a prediction: n = B * T."""
    def one(micro: int) -> Callable[[], SampledLoss]:
        def sampled_loss() -> SampledLoss:
            x = inputs[micro]()
            u = torch.rand(x.shape, generator=generator_for(micro), device=x.device)
            with autocast if autocast is not None else nullcontext():
                _, loss = model(x, sample_uniform=u)
            return SampledLoss(loss, x.numel())
        return sampled_loss
    return [one(m) for m in range(len(inputs))]


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: bool | str = False, log=None,
                 schedule_changes: dict[str, tuple[Any, Any]] | None = None) -> None:
        self.cfg = cfg
        self.resume_mode = resume  # False, True, or "auto" (resume when a checkpoint exists)
        self.fsdp = cfg.parallel == "fsdp"
        self.dist = Distributed(cfg.device, cfg.dist_timeout_min, sharded=self.fsdp)
        self.device = self.dist.device
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.out_dir = Path(cfg.out_dir)
        self.schedule_changes = schedule_changes or {}
        self._attn_warned = False
        self._stop_signal: int | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    # -- set-up ---------------------------------------------------------------------------
    def _check_out_dir(self) -> None:
        check_writable_dir(self.out_dir, "--out-dir")
        data_root = Path(self.cfg.data_root)
        if data_root.exists() and not data_root.is_dir():
            raise TrainError(f"--data-root {data_root} is a file, not a directory")
        exists = has_checkpoint(self.out_dir)
        if self.resume_mode == "auto":
            self.resume = exists
        else:
            self.resume = bool(self.resume_mode)
            if exists and not self.resume:
                raise TrainError(f"{self.out_dir} already holds a checkpoint; pass --resume to continue it (or "
                                 "--resume auto) or choose another --out-dir (nothing was changed)")
            if self.resume and not exists:
                raise TrainError(f"--resume: no checkpoint in {self.out_dir}")

    def _load_data(self):
        """Prepare (if needed) and map the dataset, before any process group exists: under torchrun the
        first local rank prepares while the others wait for the finished directory on the file system,
        so nobody sits in a collective that could time out."""
        from sophia.lm.data import DataError, dataset_ready, load_dataset, prepare

        cfg = self.cfg
        try:
            if not self.dist.enabled or self.dist.local_rank == 0:
                ds_dir = prepare(cfg.corpus, cfg.tokenizer, Path(cfg.data_root),
                                 log=self.log if self.dist.main else (lambda m: None))
            else:
                waited = 0.0
                while (ds_dir := dataset_ready(cfg.corpus, cfg.tokenizer, Path(cfg.data_root))) is None:
                    if waited % 60 == 0 and waited > 0:
                        self.log(f"rank {self.dist.rank}: waiting for local rank 0 to prepare the dataset "
                                 f"({waited / 60:.0f} min)")
                    time.sleep(1.0)
                    waited += 1.0
            return load_dataset(ds_dir)
        except DataError as e:
            raise TrainError(str(e)) from None

    def setup(self) -> None:
        cfg = self.cfg
        world = self.dist.world_size
        if cfg.grad_accum >= world and cfg.grad_accum % world:
            raise TrainError(f"--grad-accum ({cfg.grad_accum}) counts micro-batches over all ranks and must be "
                             f"divisible by the number of ranks ({world})")
        # Fewer micro-batches than ranks: each rank runs one, and the global batch grows (said at start).
        self.accum = max(1, cfg.grad_accum // world)
        self._check_out_dir()
        ckpt = load_checkpoint(self.out_dir) if self.resume else None
        if ckpt is not None and self.dist.main:
            # A damaged checkpoint newer than the one resumed from is moved aside: the run's checkpoints from here
            # on are newer than the resumed one, and a damaged one among them would count toward
            # --keep-checkpoints (or be overwritten when its step is saved again).
            for path, reason in ckpt["skipped"]:
                aside = set_aside(Path(path))
                self.log(f"warning: checkpoint {path} {reason}: moved aside to {aside.name} (never read; delete it "
                         f"when you no longer need it); resuming from the older {Path(ckpt['path']).name}")
        if ckpt is not None:
            saved_world = ckpt.get("world_size", 1)
            if saved_world != world and (cfg.grad_accum < max(world, saved_world)):
                raise TrainError(f"--resume: the checkpoint was written by {saved_world} rank(s), not {world}, and "
                                 f"--grad-accum {cfg.grad_accum} is below one of them, so the global batch would "
                                 "change; resume on the same number of ranks")
        self.compile = cfg.compile if cfg.compile is not None else self.cuda
        if self.compile and cfg.optimizer in NEEDS_CREATE_GRAPH:
            if cfg.compile:
                raise TrainError(f"--compile does not support the double backward that {cfg.optimizer} needs")
            self.compile = False
        self._check_memory(_vocab_guess(cfg.tokenizer))  # before preparing data, which can take long
        self.data = self._load_data()
        self.tokenizer_sha256 = tokenizer_fingerprint(self.data.dir)  # recorded in checkpoints, checked by sample
        self.dist.start()
        if len(self.data.train) <= cfg.block_size + 1 or len(self.data.val) <= cfg.block_size + 1:
            raise TrainError(f"the dataset is too small for --block-size {cfg.block_size}")
        self.model_config = GPTConfig(block_size=cfg.block_size, vocab_size=self.data.vocab_size,
                                      n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                      dropout=cfg.dropout, bias=cfg.bias, qk_norm=cfg.qk_norm,
                                      vocab_pad_multiple=cfg.vocab_pad_multiple)
        self._check_memory(self.data.vocab_size)
        torch.manual_seed(cfg.seed)
        bf16 = use_bf16(cfg, self.device.type)
        if self.fsdp:
            # Built whole on the CPU with DDP's initialisation, then sharded onto the devices by fully_shard.
            self.model = GPT(self.model_config)
            self.model.set_activation_checkpointing(cfg.activation_checkpointing)
            if self.compile:  # per block, as FSDP2 wants it: the sharded module's hooks stay outside the graphs
                for block in self.model.blocks:
                    block.compile()
            parallel.shard_gpt(self.model, self.device, bf16_params=bf16 and self.cuda)
            self._replica = parallel.HutchinsonReplica(self.model, self.model_config) \
                if cfg.optimizer == "sophiah" else None
        else:
            self.model = GPT(self.model_config).to(self.device)
            self.model.set_activation_checkpointing(cfg.activation_checkpointing)
        # Dropout differs per rank (identical streams would correlate the ranks' noise).
        torch.manual_seed(cfg.seed + 7919 * self.dist.rank)
        self.raw_model = self.model
        self.eval_model = self.raw_model
        if self.compile and not self.fsdp:
            self.model = self.eval_model = torch.compile(self.raw_model)
        if self.dist.enabled and not self.fsdp:
            if cfg.optimizer == "adahessian":
                raise TrainError("adahessian needs backward(create_graph=True), which DDP does not support")
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.cuda else None)
        settings = OptimizerSettings(lr=cfg.lr, weight_decay=cfg.weight_decay, beta1=cfg.beta1, beta2=cfg.beta2,
                                     rho=cfg.rho, eps=cfg.eps, hessian_interval=cfg.hessian_interval,
                                     muon_lr=cfg.muon_lr, muon_ns_dtype=getattr(torch, cfg.muon_ns_dtype))
        fast = cfg.fused_optimizer and self.cuda and not self.fsdp
        if self.fsdp and self.cuda and cfg.fused_optimizer and cfg.optimizer in ("adamw", "sophiag") \
                and self.dist.main:
            self.log(f"--parallel fsdp: {cfg.optimizer} runs its foreach update on the sharded weights (the fused "
                     "AdamW kernel and SophiaG's CUDA-graph step are for whole, unsharded tensors)")
        self.opt = build_optimizer(cfg.optimizer, self.raw_model.param_groups(cfg.weight_decay), settings,
                                   fused=fast and cfg.optimizer in ("adamw", "muon"),
                                   cuda_graph=fast and cfg.optimizer == "sophiag")
        if cfg.optimizer == "muon" and cfg.muon_ns_dtype == "bfloat16" and not self.cuda and self.dist.main \
                and cpu_has_native_bf16() is False:
            self.log("muon: this CPU has no native bfloat16 matmuls, so the bfloat16 Newton-Schulz iteration is "
                     "slow here (20-25x float32's step time measured on one such CPU); --muon-ns-dtype float32 "
                     "avoids it")
        # The CUDA-graph step replays on the same gradient tensors: keep them, zeroed in place.
        self.grads_to_none = not (fast and cfg.optimizer == "sophiag")
        self.data_gen = torch.Generator().manual_seed(cfg.seed + 1)
        from sophia.lm.data import fixed_batches

        self.val_batches = fixed_batches(self.data.val, cfg.batch_size, cfg.block_size, cfg.eval_batches,
                                         seed=1234)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        self.amp_dtype = "bfloat16" if bf16 else "float32"
        self.flops_per_token = flops_per_token(self.raw_model.num_parameters(non_embedding=True), cfg.n_layer,
                                               cfg.n_embd, cfg.block_size)
        self.peak_tflops = cfg.peak_tflops or peak_tflops(self.device)
        self.counters = {"step": 0, "tokens": 0, "train_passes": 0, "hessian_passes": 0, "elapsed": 0.0,
                         "skipped_steps": 0}
        self.consecutive_skips = 0
        self.metrics = MetricsLog(self.out_dir, enabled=self.dist.main)
        if ckpt is not None:
            self._restore(ckpt)
        elif self.dist.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            old = self.out_dir / METRICS
            if old.exists():  # an earlier run's log without a checkpoint: kept, under another name
                kept = self.out_dir / f"{METRICS}.{time.strftime('%Y%m%d-%H%M%S')}.old"
                old.rename(kept)
                self.log(f"{old} (from an earlier run without a checkpoint) was kept as {kept.name}")
        if self.dist.main:
            remove_stale(self.out_dir)  # temporary files and folders left by a kill during a save
            keep_tokenizer(self.out_dir, self.data.dir, log=self.log)

    def _check_memory(self, vocab: int) -> None:
        cfg = self.cfg
        if not cfg.memory_check:
            return
        def est(batch_size: int | None = None):
            return estimate_run(cfg, vocab, world_size=self.dist.world_size, device_type=self.device.type,
                                bf16=use_bf16(cfg, self.device.type), batch_size=batch_size)

        e = est()
        have = int(cfg.device_memory_gib * GiB) if cfg.device_memory_gib else device_memory_bytes(self.device)
        if e.total > 0.9 * have:
            advice = fit_advice(est, cfg.batch_size, cfg.grad_accum, self.dist.world_size, int(0.9 * have))
            raise TrainError(f"{cfg.preset} with {cfg.optimizer} needs about {e.total / GiB:.1f} GiB per device on "
                             f"{self.device} ({e.parameters / 1e6:.0f}M parameters, micro-batch {cfg.batch_size}x"
                             f"{cfg.block_size}) but the device has {have / GiB:.1f} GiB (90% usable); try {advice}, "
                             "or --no-memory-check to run anyway (`--dry-run` shows the estimate's parts)")

    def _restore(self, ckpt: dict[str, Any]) -> None:
        saved = ckpt["config"]
        for key in ("optimizer", "n_layer", "n_head", "n_embd", "block_size", "bias", "qk_norm", "vocab_pad_multiple",
                    "corpus", "tokenizer"):
            if saved.get(key, LEGACY_DEFAULTS.get(key)) != getattr(self.cfg, key):
                raise TrainError(f"--resume: the checkpoint was trained with {key}={saved.get(key)!r}, "
                                 f"not {getattr(self.cfg, key)!r}")
        self._check_same_dataset(ckpt)
        sharded_ckpt = ckpt.get("format") == "dcp"
        if sharded_ckpt != self.fsdp:
            raise TrainError(f"--resume: the checkpoint {Path(ckpt['path']).name} was written by --parallel "
                             f"{'fsdp' if sharded_ckpt else 'ddp'}, this run uses --parallel {self.cfg.parallel}; "
                             "resume with the --parallel it was written by")
        try:
            if sharded_ckpt:
                self._load_sharded(ckpt)
            else:
                self.raw_model.load_state_dict(ckpt["model"])
                self.opt.load_state_dict(ckpt["optimizer"])
            self.counters = {**self.counters, **ckpt["counters"]}
            rng = ckpt["rng"]
            per_rank = rng["torch_per_rank"]
            if self.dist.rank < len(per_rank):
                torch.set_rng_state(per_rank[self.dist.rank])
            self.data_gen.set_state(rng["data"])
            if self.cuda and "cuda_per_rank" in rng and self.dist.rank < len(rng["cuda_per_rank"]):
                torch.cuda.set_rng_state(rng["cuda_per_rank"][self.dist.rank], self.device)
        except (KeyError, IndexError, RuntimeError, ValueError) as e:
            raise TrainError(f"--resume: the checkpoint {ckpt.get('path', self.out_dir)} does not fit this run "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        self.metrics.truncate_after(self.counters["step"], log=self.log)
        saved_world = ckpt.get("world_size", 1)
        self.log(f"resumed {self.out_dir} at step {self.counters['step']} from {Path(ckpt['path']).name}")
        if saved_world != self.dist.world_size and self.dist.main:
            self.log(f"the checkpoint was written by {saved_world} rank(s), this run has {self.dist.world_size}: "
                     "every step trains on the same windows (the global batch is split differently), but the "
                     "labels Sophia-G samples, dropout masks and float summation order differ, so the run is not "
                     "bitwise the one it would have been")
        self._resume_event = {"from_checkpoint": Path(ckpt["path"]).name, "world_size": self.dist.world_size,
                              "saved_world_size": saved_world,
                              "changes": {k: {"was": a, "now": b} for k, (a, b) in self.schedule_changes.items()}}

    def _sharded_state(self, optimizer: bool) -> dict[str, Any]:
        """The model's and (if ``optimizer``) the optimizer's sharded state dicts, keyed by parameter names.

        get_optimizer_state_dict fills an empty optimizer state by a step with lr 0, which counts a step
        (AdamW's bias correction, Sophia-H's refresh schedule): never asked before the first real step."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        state = {"model": get_model_state_dict(self.model)}
        if optimizer:
            state["optimizer"] = get_optimizer_state_dict(self.model, self.opt)
        return state

    def _load_sharded(self, ckpt: dict[str, Any]) -> None:
        """Each rank reads its shards of a DCP checkpoint (DCP reshards when the world size changed)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        state = self._sharded_state(optimizer=ckpt.get("optimizer_saved", True))
        dcp.load(state, checkpoint_id=ckpt["path"])
        set_model_state_dict(self.model, state["model"])
        if "optimizer" in state:  # a step-0 checkpoint has no optimizer state yet
            set_optimizer_state_dict(self.model, self.opt, state["optimizer"])
        counters = ckpt.get("optimizer_counters")
        if counters:  # Sophia's refresh counts live beside its state dict, which the name-keyed form drops
            self.opt.load_state_dict({**self.opt.state_dict(), **counters})

    def _check_same_dataset(self, ckpt: dict[str, Any]) -> None:
        """The data a resumed run reads must be the data the checkpoint trained on."""
        saved = ckpt.get("dataset")
        if not saved:
            return
        meta = self.data.meta
        for key in ("source_sha256", "train_tokens", "val_tokens", "vocab_size", "tokenizer"):
            if saved.get(key) is not None and meta.get(key) is not None and saved[key] != meta[key]:
                raise TrainError(f"--resume: the dataset at {self.data.dir} is not the one the checkpoint trained on "
                                 f"({key} {meta.get(key)!r}, was {saved[key]!r} at {saved.get('dir')}); point "
                                 "--data-root at the original data")

    def _gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        if not self.dist.enabled:
            return [t]
        out: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(out, t)
        return out

    def _state_is_finite(self) -> bool:
        """Whether the weights and optimizer state are finite (under FSDP each rank checks its shards, and the
        ranks agree by a collective)."""
        tensors = [parallel.local(p) for p in self.raw_model.parameters()]
        for state in self.opt.state.values():
            tensors += [parallel.local(v) for v in state.values() if torch.is_tensor(v) and v.is_floating_point()]
        if self.fsdp:
            return parallel.all_ranks_true(all_finite(tensors), self.device)
        return all_finite(tensors)

    def _checkpoint(self) -> None:
        """Written by rank 0, with every rank's RNG state (a collective: all ranks call it). Never with
        non-finite weights or optimizer state: the run stops instead, its earlier checkpoints intact."""
        if not self._state_is_finite():
            self._event(event="diverged", reason="non-finite weights or optimizer state")
            raise TrainError(f"the weights or optimizer state are not finite at step {self.counters['step']}; no "
                             f"checkpoint was written and the earlier ones in {self.out_dir} are intact: resume with "
                             "--resume and a lower --lr" + (" or a larger --rho" if self.cfg.optimizer.startswith(
                                 "sophia") else ""))
        rng = {"torch_per_rank": self._gather(torch.get_rng_state()), "data": self.data_gen.get_state()}
        if self.cuda:
            rng["cuda_per_rank"] = self._gather(torch.cuda.get_rng_state(self.device))
        meta = self.data.meta
        if self.fsdp:
            opt_sd_extra = {k: v for k, v in self.opt.state_dict().items() if k not in ("state", "param_groups")} \
                if hasattr(self.opt, "diagnostics") else {}
            saved = bool(self.opt.state)
            info = {"optimizer_counters": opt_sd_extra, "optimizer_saved": saved}
            state = self._sharded_state(optimizer=saved)
        elif not self.dist.main:
            return
        else:
            info = {"model": self.raw_model.state_dict(), "optimizer": self.opt.state_dict()}
        info.update({
            "step": self.counters["step"], "counters": dict(self.counters), "config": self.cfg.to_dict(),
            "model_config": self.model_config.to_dict(), "rng": rng,
            "schedule": {"lr": lr_at(self.counters["step"], self.cfg)}, "data_position": rng["data"],
            "dataset_dir": str(Path(self.data.dir).resolve()), "world_size": self.dist.world_size,
            "dataset": {"dir": str(Path(self.data.dir).resolve()),
                        **{k: meta.get(k) for k in ("source_sha256", "train_tokens", "val_tokens", "vocab_size",
                                                     "tokenizer")},
                        "tokenizer_sha256": self.tokenizer_sha256},
        })
        if self.fsdp:
            save_sharded_checkpoint(self.out_dir, state, info, main=self.dist.main, keep=self.cfg.keep_checkpoints,
                                    log=self.log)
        else:
            save_checkpoint(self.out_dir, info, keep=self.cfg.keep_checkpoints, log=self.log)

    # -- pieces of a step -----------------------------------------------------------------
    def _batch(self, batch_size: int):
        from sophia.lm.data import get_batch

        x, y = get_batch(self.data.train, batch_size, self.cfg.block_size, self.data_gen,
                         rank=self.dist.rank, world_size=self.dist.world_size)
        if self.cuda:  # pinned memory: the copy runs asynchronously, overlapping the computation
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y

    def _hessian_batch_size(self) -> int:
        return max(1, round(self.cfg.batch_size * self.cfg.hessian_batch_fraction))

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed validation batches, split across ranks (rank r takes batches r, r+W, ...):
        the same mean as one process computes (a collective: every rank calls it). Under FSDP a forward is a
        collective too, so every rank runs as many forwards: a rank short of one repeats batch 0, uncounted."""
        self.eval_model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        n, world = len(self.val_batches), self.dist.world_size
        rounds = -(-n // world) if self.fsdp else 0
        for k in range(max(rounds, -(-(n - self.dist.rank) // world))):
            j = self.dist.rank + k * world
            x, y = self.val_batches[j if j < n else 0]
            with self.autocast:
                _, loss = self.eval_model(x.to(self.device), y.to(self.device))
            if j < n:
                total += loss.double()
        self.eval_model.train()
        self.dist.all_reduce_sum_(total)
        return (total / len(self.val_batches)).item()

    @torch.no_grad()
    def attention_stats(self) -> dict[str, list[float]]:
        """Per-layer largest attention logit and attention entropy on the first validation batch
        (one extra forward at evaluations, on rank 0 only: every rank holds the same weights; under FSDP on
        every rank, with the weights gathered, a collective)."""
        if self.fsdp:
            self.raw_model.eval()
            with parallel.unsharded(self.raw_model), self.autocast:
                stats = self.raw_model.attention_stats(self.val_batches[0][0].to(self.device))
            self.raw_model.train()
            if not self.dist.main:
                return {}
        elif not self.dist.main:
            return {}
        else:
            self.raw_model.eval()
            with self.autocast:
                stats = self.raw_model.attention_stats(self.val_batches[0][0].to(self.device))
            self.raw_model.train()
        stats = {k: [round(v, 4) for v in vals] for k, vals in stats.items()}
        worst = max(stats["attn_max_logit"], default=0.0)
        if self.cfg.attn_logit_warn > 0 and worst > self.cfg.attn_logit_warn and not self._attn_warned:
            self._attn_warned = True
            self.log(f"warning: an attention logit reached {worst:,.0f} (above --attn-logit-warn "
                     f"{self.cfg.attn_logit_warn:g}): attention is saturating (entropy per layer "
                     f"{', '.join(f'{e:.2f}' for e in stats['attn_entropy'])} nats). "
                     "Remedies: --qk-norm, or a lower --lr")
        return stats

    def _zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=self.grads_to_none)

    def _gnb_refresh(self, step: int) -> None:
        """Sampled-label backward over the whole (or a fraction of the) global batch, then N*g**2, after
        optimizer step ``step`` (1-based), by the shared refresh (sophia.hessian.refresh): the DDP/FSDP
        wrapper reduces, the labels are drawn inside the (compiled) forward from the package's label
        generator of (seed, step, rank, micro-batch).

        A fraction that is a whole number of micro-batches (1/4 of 8) runs that many micro-batches of the
        training shape, as the authors' code refreshes on one micro-batch: a compiled model sees no new
        shape and the device runs at its training batch size. Otherwise each micro-batch shrinks."""
        cfg = self.cfg
        whole = cfg.hessian_batch_fraction * self.accum
        if self.accum > 1 and whole >= 1 and abs(whole - round(whole)) < 1e-9:
            n_micro, bs = round(whole), cfg.batch_size
        else:
            n_micro, bs = self.accum, self._hessian_batch_size()
        losses = in_forward_sampled_losses(self.model, [lambda: self._batch(bs)[0]] * n_micro,
                                           lambda micro: label_generator(self.device, cfg.seed, step,
                                                                         self.dist.rank, micro),
                                           self.autocast)
        gnb_refresh_micro_batches(self.opt, losses, reduction=WrapperAverage(self._sync) if self.dist.enabled else None,
                                  max_grad_norm=cfg.grad_clip if cfg.grad_clip > 0 else None)
        self.counters["hessian_passes"] += n_micro * self.dist.world_size * bs / cfg.batch_size

    def _hutchinson_refresh(self) -> None:
        """Sophia-H: a Hutchinson estimate on a fresh batch, averaged over ranks, handed to the optimizer."""
        cfg = self.cfg
        params = [p for g in self.opt.param_groups for p in g["params"]]
        x, y = self._batch(self._hessian_batch_size())
        if self.fsdp:
            def loss_of(module, weights):
                with self.autocast:
                    return torch.func.functional_call(module, weights, (x, y))[1]

            est = self._replica.estimate(params, loss_of, hutchinson)
            est = [parallel.shard_mean(e, p) for e, p in zip(est, params)]
        else:
            def loss_fn(ps):  # the parameters are the module's own: plain autograd, no functional call needed
                with self.autocast:
                    return self.raw_model(x, y)[1]

            with self.raw_model.use_attention("math"):
                average = HutchinsonAverage(params)
                average.add(hutchinson(loss_fn, params), x.numel())
            est = average.result(AllReduceSum() if self.dist.enabled else None)
        self.opt.update_hessian(estimates=est)
        # a forward and backward with graph, then the Hessian-vector product (about one more backward)
        self.counters["hessian_passes"] += 2 * self.dist.world_size * self._hessian_batch_size() / cfg.batch_size

    def _grad_norm(self) -> torch.Tensor:
        """The global gradient norm (clipping to --grad-clip when it is > 0), on the device."""
        if self.fsdp:
            return parallel.grad_norm(self.raw_model.parameters(), self.cfg.grad_clip, self.device)
        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        if self.cfg.grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        if not params:
            return torch.zeros((), device=self.device)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))

    def _sync(self, last: bool):
        """Gradients are reduced across ranks in the last micro-batch's backward only."""
        if self.fsdp:
            parallel.set_gradient_sync(self.model, last)
            return nullcontext()
        return self.model.no_sync() if self.dist.enabled and not last else nullcontext()

    def train_step(self, i: int) -> tuple[torch.Tensor, float, bool]:
        """One optimizer step; returns (mean training loss on this rank as a device tensor, lr, skipped)."""
        cfg = self.cfg
        lr = lr_at(i, cfg)
        for group in self.opt.param_groups:  # a group may run at a fixed multiple of the schedule (lr_scale)
            group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr
        if cfg.optimizer == "sophiah" and self.opt.hessian_due():
            self._hutchinson_refresh()
        create_graph = needs_create_graph(cfg.optimizer, i, cfg.hessian_interval)
        attention = self.raw_model.use_attention("math") if create_graph else nullcontext()
        total = torch.zeros((), device=self.device)
        with attention:
            nxt = self._batch(cfg.batch_size)
            for micro in range(self.accum):
                x, y = nxt
                sync = self._sync(micro == self.accum - 1)
                with sync:
                    with self.autocast:
                        _, loss = self.model(x, y)
                    if micro < self.accum - 1:  # the next copy starts while this backward runs
                        nxt = self._batch(cfg.batch_size)
                    (loss / self.accum).backward(create_graph=create_graph)
                total += loss.detach()
        norm = self._grad_norm()
        skipped = not bool(torch.isfinite(norm).item())  # the same on every rank: gradients are all-reduced
        if skipped:
            self.counters["skipped_steps"] += 1
            self.consecutive_skips += 1
        else:
            self.opt.step()
            self.consecutive_skips = 0
        self._zero_grad()
        self.counters["train_passes"] += self.accum * self.dist.world_size
        if create_graph:
            # the Hessian-vector product's backward
            self.counters["hessian_passes"] += self.accum * self.dist.world_size
        if cfg.optimizer == "sophiag" and self.opt.hessian_due():  # after steps k, 2k, ...: the optimizer's clock
            self._gnb_refresh(i + 1)
        self.counters["step"] = i + 1
        self.counters["tokens"] += cfg.batch_size * cfg.block_size * self.accum * self.dist.world_size
        self._last_grad_norm = norm
        return total / self.accum, lr, skipped

    def _diagnostics(self, full: bool = True) -> dict[str, Any]:
        """Sophia's refresh counters always; the win rate and Hessian norm (a pass over the state) if full."""
        if not hasattr(self.opt, "diagnostics"):
            return {}
        if not full:
            return {"hessian_updates": self.opt.hessian_updates, "hessian_skipped": self.opt.hessian_skipped}
        d = self.opt.diagnostics()
        return {k: d[k] for k in ("win_rate", "hessian_norm", "hessian_updates", "hessian_skipped")}

    def _event(self, **fields) -> dict[str, Any]:
        c = self.counters
        event = {"step": c["step"], **fields, "tokens": c["tokens"], "elapsed": round(c["elapsed"], 3),
                 "train_passes": c["train_passes"], "hessian_passes": c["hessian_passes"]}
        self.metrics.write(event)
        return event

    def _speed(self, tokens: float, seconds: float) -> dict[str, float]:
        if seconds <= 0 or tokens <= 0:
            return {}
        out = {"tokens_per_s": round(tokens / seconds, 1)}
        if self.peak_tflops:
            out["mfu"] = round(tokens / seconds * self.flops_per_token / (self.peak_tflops * 1e12), 4)
        return out

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from sophia.denormal import flush_denormals

        try:
            with ExitStack() as stack:
                if self.cfg.flush_denormal and self.device.type == "cpu":
                    stack.enter_context(flush_denormals(True))
                if self.cuda:
                    stack.enter_context(_tf32(self.cfg.tf32))
                stack.enter_context(self._signals())
                self.setup()
                return self._loop()
        finally:
            self.dist.close()

    @contextmanager
    def _signals(self):
        """SIGINT and SIGTERM (a cluster's notice before pre-emption) finish the current step (under torchrun:
        the next logged step), write a checkpoint and stop; a second signal interrupts at once. Only in the
        main thread."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signum
            if self.dist.main:
                self.log(f"{signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
                         "(send it again to stop at once)")

        before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in before:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in before.items():
                signal.signal(s, h)

    def _stop_now(self) -> bool:
        """Whether any rank received a stop signal (a collective, so that all ranks stop together)."""
        flag = torch.tensor([1.0 if self._stop_signal is not None else 0.0], device=self.device)
        if self.dist.enabled:
            dist.all_reduce(flag)
        return bool(flag.item() > 0)

    def _loop(self) -> dict[str, Any]:
        cfg = self.cfg
        if not self.resume:
            if self.dist.main:
                self.log(f"training {cfg.preset} ({self.raw_model.num_parameters() / 1e6:.2f}M parameters) with "
                         f"{cfg.optimizer} for {cfg.max_steps} steps on {self.device} ({self.amp_dtype}"
                         f"{', compiled' if self.compile else ''}"
                         f"{f', FSDP2 over {self.dist.world_size} rank(s)' if self.fsdp else ''}"
                         f"{', activation checkpointing' if cfg.activation_checkpointing else ''}), "
                         f"{cfg.batch_size * cfg.block_size * self.accum * self.dist.world_size} tokens per step")
            self._event(event="start", config=cfg.to_dict(), parameters=self.raw_model.num_parameters(),
                        world_size=self.dist.world_size, device=str(self.device),
                        flops_per_token=self.flops_per_token, peak_tflops=self.peak_tflops)
            self._event(event="eval", val_loss=self.evaluate(), lr=lr_at(0, cfg),
                        **self.attention_stats())  # evaluate is a collective
            if cfg.grad_accum < self.dist.world_size and self.dist.main:
                self.log(f"--grad-accum {cfg.grad_accum} < {self.dist.world_size} ranks: one micro-batch per rank")
            self._checkpoint()  # step 0: a run killed before its first periodic checkpoint can resume
        start_step = self.counters["step"]
        if start_step >= cfg.max_steps:
            if self.dist.main:
                self.log(f"nothing to do: the checkpoint is at step {start_step} and --max-steps is {cfg.max_steps}; "
                         "give a larger --max-steps to train further")
            return self.summary(record=False)
        if self.resume:
            self._event(event="resume", **self._resume_event)
            for key, (was, now) in self.schedule_changes.items():
                if self.dist.main:
                    self.log(f"--resume with {key} {now} (was {was}): recorded in {METRICS}")
        bar = None
        if self.dist.main and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.max_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr,
                       mininterval=1.0)
        last_val = None
        # Throughput over a window that leaves out compilation and the first steps after (re)start, and for
        # the optimizers with a Hessian refresh its first one (the sampled-label forward compiles its own graph).
        first = 10 if cfg.optimizer not in ("sophiag", "sophiah", "adahessian") else max(10, cfg.hessian_interval + 1)
        warm_step = start_step + min(first, max(1, (cfg.max_steps - start_step) // 2))
        self._speed_mark: tuple[float, float] | None = None
        interval_mark = (self.counters["tokens"], self.counters["elapsed"])
        t_last = time.perf_counter()
        try:
            for i in range(start_step, cfg.max_steps):
                loss, lr, skipped = self.train_step(i)
                now = time.perf_counter()
                self.counters["elapsed"] += now - t_last
                t_last = now
                step = i + 1
                if skipped:
                    self._event(event="skipped", lr=lr, grad_norm=float(self._last_grad_norm.item()),
                                consecutive=self.consecutive_skips, skipped_steps=self.counters["skipped_steps"])
                    if self.dist.main:
                        self.log(f"step {step}: the gradient norm is not finite; step skipped (weights and optimizer "
                                 f"state unchanged; {self.consecutive_skips} in a row)")
                    if self.consecutive_skips >= cfg.max_skipped_steps:
                        self._event(event="diverged", lr=lr, skipped_steps=self.counters["skipped_steps"])
                        raise TrainError(
                            f"training diverged: {self.consecutive_skips} steps in a row (up to step {step}) had a "
                            f"non-finite gradient; the last good checkpoint in {self.out_dir} is intact: continue it "
                            "with --resume and a lower --lr"
                            + (" or a larger --rho" if cfg.optimizer.startswith("sophia") else ""))
                if step == warm_step:
                    self._speed_mark = (self.counters["tokens"], self.counters["elapsed"])
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    mean = loss.clone()  # this step's loss, averaged over its micro-batches and the ranks
                    self.dist.all_reduce_mean_([mean])
                    train_loss = mean.item()  # the host sync of a logged step
                    self.counters["elapsed"] += time.perf_counter() - t_last  # now that the device caught up
                    t_last = time.perf_counter()
                    extra = self._diagnostics(full=step % cfg.eval_every == 0 or step == cfg.max_steps)
                    speed = self._speed(self.counters["tokens"] - interval_mark[0],
                                        self.counters["elapsed"] - interval_mark[1])
                    interval_mark = (self.counters["tokens"], self.counters["elapsed"])
                    self._event(event="train", train_loss=train_loss, lr=lr,
                                grad_norm=round(float(self._last_grad_norm.item()), 6),
                                skipped_steps=self.counters["skipped_steps"], **speed, **extra)
                    if bar is not None:
                        bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{last_val:.3f}" if last_val else "-",
                                        tok_s=f"{speed.get('tokens_per_s', 0):,.0f}", refresh=False)
                if step % cfg.eval_every == 0 or step == cfg.max_steps:
                    last_val = self.evaluate()
                    self._event(event="eval", val_loss=last_val, lr=lr, **self.attention_stats())
                if self.dist.enabled:  # agreed by a collective, only at logged steps (no extra sync per step)
                    stop = (step % cfg.log_every == 0 or step == cfg.max_steps) and self._stop_now()
                else:
                    stop = self._stop_signal is not None
                if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or stop:
                    self._checkpoint()
                if stop:
                    self._event(event="stopped", signal=signal.Signals(self._stop_signal or signal.SIGTERM).name)
                    raise StopRequestedError(f"stopped at step {step} on request; checkpoint written in "
                                             f"{self.out_dir}. Continue with: sophia train --out-dir "
                                             f"{self.out_dir} --resume")
                t_last = time.perf_counter()  # evaluation and checkpoints are not training time
                if bar is not None:
                    bar.update(1)
            if self.dist.enabled:
                self._check_ranks_identical()
        finally:
            if bar is not None:
                bar.close()
        return self.summary()

    def _check_ranks_identical(self) -> None:
        """Every rank must hold the same weights; a cheap float64 fingerprint, gathered. Under FSDP each
        weight exists once, in shards: there is nothing to compare, and the event says so."""
        if self.fsdp:
            self._event(event="ranks", sharded=True, world_size=self.dist.world_size)
            return
        with torch.no_grad():
            fp = torch.stack([p.double().sum() for p in self.raw_model.parameters()]).to(self.device)
        gathered = [torch.empty_like(fp) for _ in range(self.dist.world_size)]
        dist.all_gather(gathered, fp)
        same = all(torch.equal(gathered[0], g) for g in gathered[1:])
        self._event(event="ranks", ranks_identical=same, world_size=self.dist.world_size)
        if not same:
            raise TrainError("the ranks ended with different weights")

    def summary(self, record: bool = True) -> dict[str, Any]:
        from sophia.lm.checkpoint import read_metrics

        events = read_metrics(self.out_dir, log=self.log if self.dist.main else None) \
            if (self.out_dir / METRICS).exists() else []
        evals = [e for e in events if e.get("event") == "eval"]
        c = self.counters
        out = {"out_dir": str(self.out_dir), "optimizer": self.cfg.optimizer, "preset": self.cfg.preset,
               "steps": c["step"], "tokens": c["tokens"], "elapsed": c["elapsed"],
               "train_passes": c["train_passes"], "hessian_passes": c["hessian_passes"],
               "skipped_steps": c.get("skipped_steps", 0),
               "final_val_loss": evals[-1]["val_loss"] if evals else None,
               "best_val_loss": min((e["val_loss"] for e in evals), default=None),
               **{k: evals[-1][k] for k in ("attn_max_logit", "attn_entropy") if evals and k in evals[-1]},
               **self._diagnostics()}
        mark = getattr(self, "_speed_mark", None)
        if mark is not None:
            steady = self._speed(c["tokens"] - mark[0], c["elapsed"] - mark[1])
            out.update({f"steady_{k}": v for k, v in steady.items()})
        if record and self.dist.main and events:
            self.metrics.write({"step": c["step"], "event": "summary", **{k: v for k, v in out.items()
                                                                            if k != "out_dir"}})
        return out


def format_summary(s: dict[str, Any]) -> str:
    speed = f"{s['tokens'] / max(s['elapsed'], 1e-9):,.0f} tokens/s"
    if "steady_tokens_per_s" in s:
        speed = f"{s['steady_tokens_per_s']:,.0f} tokens/s after warm-up"
        if "steady_mfu" in s:
            speed += f", MFU {100 * s['steady_mfu']:.1f}%"
    lines = [f"run        {s['out_dir']}  ({s['preset']}, {s['optimizer']})",
             f"steps      {s['steps']}  tokens {s['tokens']:,}  time {s['elapsed']:.1f}s  ({speed})",
             f"passes     {s['train_passes']} training forward/backward + {s['hessian_passes']:g} for Hessian "
             "estimates" + (f"; {s['skipped_steps']} step(s) skipped (non-finite gradient)"
                            if s.get("skipped_steps") else ""),
             f"val loss   final {s['final_val_loss']:.4f}  best {s['best_val_loss']:.4f}"
             if s["final_val_loss"] is not None else "val loss   -"]
    if s.get("attn_max_logit"):
        lines.append(f"attention  max logit per layer {', '.join(f'{v:.0f}' for v in s['attn_max_logit'])}; "
                     f"entropy {', '.join(f'{v:.2f}' for v in s['attn_entropy'])} nats")
    if "win_rate" in s:
        lines.append(f"sophia     win rate {s['win_rate']:.3f}  hessian norm {s['hessian_norm']:.3g}  "
                     f"refreshes {s['hessian_updates']} (skipped {s['hessian_skipped']})")
    return "\n".join(lines)


def train(cfg: TrainConfig, *, resume: bool | str = False, log=None,
          schedule_changes: dict[str, tuple[Any, Any]] | None = None) -> dict[str, Any]:
    return Trainer(cfg, resume=resume, log=log, schedule_changes=schedule_changes).run()


__all__ = ["StopRequestedError", "Trainer", "format_summary", "lr_at", "train"]
