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

import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from sophia.lm.checkpoint import keep_tokenizer, remove_stale, tokenizer_fingerprint
from sophia.lm.checkpointer import Checkpointer, TrainingState
from sophia.lm.config import TrainConfig, TrainError, check_writable_dir
from sophia.lm.curvature import curvature_refresh, in_forward_sampled_losses
from sophia.lm.data.batches import Batches
from sophia.lm.distributed import Parallel, all_finite, resolve_device
from sophia.lm.evaluator import Evaluator
from sophia.lm.memory import GiB, device_memory_bytes, estimate_run, fit_advice, flops_per_token, peak_tflops
from sophia.lm.metrics import METRICS, Metrics, Progress
from sophia.lm.model import GPTConfig
from sophia.lm.muon import cpu_has_native_bf16
from sophia.lm.optimizers import OptimizerSettings, optimizer_entry
from sophia.lm.schedule import due, lr_at
from sophia.lm.signals import StopRequestedError, StopSignals
from sophia.lm.sinks import attach_sinks
from sophia.lm.tokenizers import parse_spec


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


class Trainer:
    """``sophia train``: :meth:`setup` builds the run's parts, :meth:`run` trains. The parts: ``dist`` (the ranks
    and the parallel wrapper), ``checkpointer``, ``metrics``, ``evaluator``, ``refresh`` (the curvature refresh
    the optimizer's registry entry asks for), ``signals`` and ``batches``."""

    def __init__(self, cfg: TrainConfig, *, resume: bool | str = False, log=None,
                 schedule_changes: dict[str, tuple[Any, Any]] | None = None) -> None:
        self.cfg = cfg
        self.resume_mode = resume  # False, True, or "auto" (resume when a checkpoint exists)
        self.entry = optimizer_entry(cfg.optimizer)
        self.dist = Parallel(cfg.device, cfg.dist_timeout_min, sharded=cfg.parallel == "fsdp")
        self.device = self.dist.device
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.out_dir = Path(cfg.out_dir)
        self.schedule_changes = schedule_changes or {}
        self.signals = StopSignals(announce=self.log if self.dist.main else None)
        self.checkpointer = Checkpointer(cfg, self.dist, self.log)
        self.counters = {"step": 0, "tokens": 0, "train_passes": 0, "hessian_passes": 0, "elapsed": 0.0,
                         "skipped_steps": 0}
        self.consecutive_skips = 0
        self.resume = False
        self._resume_event: dict[str, Any] = {}

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    # -- set-up ---------------------------------------------------------------------------
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
        cfg, entry, ranks = self.cfg, self.entry, self.dist
        self.accum = ranks.micro_batches_per_rank(cfg.grad_accum)
        check_writable_dir(self.out_dir, "--out-dir")
        data_root = Path(cfg.data_root)
        if data_root.exists() and not data_root.is_dir():
            raise TrainError(f"--data-root {data_root} is a file, not a directory")
        self.resume = self.checkpointer.resumes(self.resume_mode)
        ckpt = self.checkpointer.load() if self.resume else None
        self.compile = cfg.compile if cfg.compile is not None else self.cuda
        if self.compile and entry.second_order_graph:
            if cfg.compile:
                raise TrainError(f"--compile does not support the double backward that {cfg.optimizer} needs")
            self.compile = False
        self._check_memory(_vocab_guess(cfg.tokenizer))  # before preparing data, which can take long
        self.data = self._load_data()
        self.tokenizer_sha256 = tokenizer_fingerprint(self.data.dir)  # recorded in checkpoints, checked by sample
        ranks.start()
        if len(self.data.train) <= cfg.block_size + 1 or len(self.data.val) <= cfg.block_size + 1:
            raise TrainError(f"the dataset is too small for --block-size {cfg.block_size}")
        self.model_config = GPTConfig(block_size=cfg.block_size, vocab_size=self.data.vocab_size,
                                      n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                      dropout=cfg.dropout, bias=cfg.bias, qk_norm=cfg.qk_norm,
                                      vocab_pad_multiple=cfg.vocab_pad_multiple)
        self._check_memory(self.data.vocab_size)
        bf16 = use_bf16(cfg, self.device.type)
        torch.manual_seed(cfg.seed)
        self.model, self.raw_model, self.eval_model = ranks.wrap(
            self.model_config, entry, compile=self.compile, bf16=bf16,
            activation_checkpointing=cfg.activation_checkpointing)
        # Dropout differs per rank (identical streams would correlate the ranks' noise).
        torch.manual_seed(cfg.seed + 7919 * ranks.rank)
        self.opt = self._build_optimizer()
        self.batches = Batches(self.data.train, cfg.block_size, cfg.seed + 1, device=self.device, rank=ranks.rank,
                               world_size=ranks.world_size)
        from sophia.lm.data import fixed_batches

        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        self.amp_dtype = "bfloat16" if bf16 else "float32"
        self.evaluator = Evaluator(fixed_batches(self.data.val, cfg.batch_size, cfg.block_size, cfg.eval_batches,
                                                 seed=1234),
                                   ranks, self.autocast, attn_logit_warn=cfg.attn_logit_warn, log=self.log)
        self.refresh = curvature_refresh(entry, self.opt, ranks, self.batches, model=self.model, gpt=self.raw_model,
                                         cfg=cfg, micro_batches=self.accum, autocast=self.autocast)
        self.flops_per_token = flops_per_token(self.raw_model.num_parameters(non_embedding=True), cfg.n_layer,
                                               cfg.n_embd, cfg.block_size)
        self.peak_tflops = cfg.peak_tflops or peak_tflops(self.device)
        self.metrics = Metrics(self.out_dir, self.counters, main=ranks.main, flops_per_token=self.flops_per_token,
                               peak_tflops=self.peak_tflops, log=self.log)
        self.state = TrainingState(self.model, self.raw_model, self.opt, self.counters, self.batches.generator,
                                   self.model_config, Path(self.data.dir), self.data.meta, self.tokenizer_sha256)
        if ckpt is not None:
            self._restore(ckpt)
        elif ranks.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            old = self.out_dir / METRICS
            if old.exists():  # an earlier run's log without a checkpoint: kept, under another name
                kept = self.out_dir / f"{METRICS}.{time.strftime('%Y%m%d-%H%M%S')}.old"
                old.rename(kept)
                self.log(f"{old} (from an earlier run without a checkpoint) was kept as {kept.name}")
        if ranks.main:
            remove_stale(self.out_dir)  # temporary files and folders left by a kill during a save
            keep_tokenizer(self.out_dir, self.data.dir, log=self.log)
            attach_sinks(self.metrics, cfg, resumed=ckpt is not None)  # --log-to: TensorBoard, W&B

    def _build_optimizer(self):
        cfg, entry = self.cfg, self.entry
        settings = OptimizerSettings(lr=cfg.lr, weight_decay=cfg.weight_decay, beta1=cfg.beta1, beta2=cfg.beta2,
                                     rho=cfg.rho, eps=cfg.eps, hessian_interval=cfg.hessian_interval,
                                     muon_lr=cfg.muon_lr, muon_ns_dtype=getattr(torch, cfg.muon_ns_dtype))
        fast = cfg.fused_optimizer and self.cuda and not self.dist.sharded and entry.has_fast_step
        if self.dist.sharded and self.cuda and cfg.fused_optimizer and entry.has_fast_step and entry.fsdp_refusal \
                is None and self.dist.main:
            self.log(f"--parallel fsdp: {cfg.optimizer} runs its foreach update on the sharded weights (the fused "
                     "AdamW kernel and SophiaG's CUDA-graph step are for whole, unsharded tensors)")
        opt = entry.build(self.raw_model.param_groups(cfg.weight_decay), settings, fast)
        if cfg.optimizer == "muon" and cfg.muon_ns_dtype == "bfloat16" and not self.cuda and self.dist.main \
                and cpu_has_native_bf16() is False:
            self.log("muon: this CPU has no native bfloat16 matmuls, so the bfloat16 Newton-Schulz iteration is "
                     "slow here (20-25x float32's step time measured on one such CPU); --muon-ns-dtype float32 "
                     "avoids it")
        # The CUDA-graph step replays on the same gradient tensors: keep them, zeroed in place.
        self.grads_to_none = not (fast and entry.cuda_graph)
        return opt

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
        self.checkpointer.restore(ckpt, self.state)
        self.metrics.truncate_after(self.counters["step"])
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

    # -- one step ---------------------------------------------------------------------------
    def train_step(self, i: int) -> tuple[torch.Tensor, float, bool]:
        """One optimizer step: the schedule, the refresh before it, the micro-batches' forward and backward, the
        step (or, with a non-finite gradient norm, its skip), the refresh after it. Returns (the mean training
        loss on this rank as a device tensor, lr, skipped)."""
        cfg, ranks = self.cfg, self.dist
        lr = lr_at(i, cfg)
        for group in self.opt.param_groups:  # a group may run at a fixed multiple of the schedule (lr_scale)
            group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr
        self.counters["hessian_passes"] += self.refresh.before_step(i)
        create_graph = self.refresh.create_graph(i)
        total = torch.zeros((), device=self.device)
        with self.raw_model.use_attention("math") if create_graph else nullcontext():
            nxt = self.batches(cfg.batch_size)
            for micro in range(self.accum):
                x, y = nxt
                with ranks.sync(micro == self.accum - 1):
                    with self.autocast:
                        _, loss = self.model(x, y)
                    if micro < self.accum - 1:  # the next copy starts while this backward runs
                        nxt = self.batches(cfg.batch_size)
                    (loss / self.accum).backward(create_graph=create_graph)
                total += loss.detach()
        norm = ranks.grad_norm(self.raw_model.parameters(), cfg.grad_clip)
        skipped = not bool(torch.isfinite(norm).item())  # the same on every rank: gradients are all-reduced
        if skipped:
            self.counters["skipped_steps"] += 1
            self.consecutive_skips += 1
        else:
            self.opt.step()
            self.consecutive_skips = 0
        self.opt.zero_grad(set_to_none=self.grads_to_none)
        self.counters["train_passes"] += self.accum * ranks.world_size
        self.counters["hessian_passes"] += self.refresh.after_step(i)
        self.counters["step"] = i + 1
        self.counters["tokens"] += cfg.batch_size * cfg.block_size * self.accum * ranks.world_size
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

    def _divergence_advice(self) -> str:
        return f"with --resume and a lower --lr{self.entry.divergence_hint}"

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from sophia.denormal import flush_denormals

        try:
            with ExitStack() as stack:
                if self.cfg.flush_denormal and self.device.type == "cpu":
                    stack.enter_context(flush_denormals(True))
                if self.cuda:
                    stack.enter_context(_tf32(self.cfg.tf32))
                stack.enter_context(self.signals.installed())
                self.setup()
                return self._loop()
        finally:
            if getattr(self, "metrics", None) is not None:
                self.metrics.close()
            self.dist.close()

    def _loop(self) -> dict[str, Any]:
        cfg, metrics = self.cfg, self.metrics
        start_step = self._begin()
        if start_step >= cfg.max_steps:
            if self.dist.main:
                self.log(f"nothing to do: the checkpoint is at step {start_step} and --max-steps is {cfg.max_steps}; "
                         "give a larger --max-steps to train further")
            return self.summary(record=False)
        # Throughput over a window that leaves out compilation and the first steps after (re)start, and for
        # the optimizers with a Hessian refresh its first one (the sampled-label forward compiles its own graph).
        metrics.start_windows(start_step, cfg.max_steps,
                              max(10, cfg.hessian_interval + 1) if self.entry.estimates_curvature else 10)
        progress = Progress(cfg.max_steps, start_step, enabled=self.dist.main and cfg.progress)
        metrics.clock.restart()
        try:
            for i in range(start_step, cfg.max_steps):
                loss, lr, skipped = self.train_step(i)
                metrics.clock.lap()
                step = i + 1
                if skipped:
                    self._skipped(step, lr)
                metrics.step_done(step)
                logged = due(step, cfg.log_every, cfg.max_steps)
                if logged:
                    self._log_train(step, loss, lr, progress)
                if due(step, cfg.eval_every, cfg.max_steps):
                    progress.val = self._evaluate(lr)
                stop = self._stop_agreed(logged)
                if self.checkpointer.due(step, stop):
                    self._checkpoint()
                if stop:
                    metrics.event(event="stopped", signal=self.signals.name)
                    raise StopRequestedError(f"stopped at step {step} on request; checkpoint written in "
                                             f"{self.out_dir}. Continue with: sophia train --out-dir "
                                             f"{self.out_dir} --resume")
                metrics.clock.restart()  # evaluation and checkpoints are not training time
                progress.update()
            if self.dist.enabled:
                self._check_ranks_identical()
        finally:
            progress.close()
        return self.summary()

    def _begin(self) -> int:
        """A new run's start event, first evaluation and step-0 checkpoint; a resumed run's resume event. The
        step the loop starts from."""
        cfg, ranks = self.cfg, self.dist
        if not self.resume:
            if ranks.main:
                self.log(f"training {cfg.preset} ({self.raw_model.num_parameters() / 1e6:.2f}M parameters) with "
                         f"{cfg.optimizer} for {cfg.max_steps} steps on {self.device} ({self.amp_dtype}"
                         f"{', compiled' if self.compile else ''}"
                         f"{f', FSDP2 over {ranks.world_size} rank(s)' if ranks.sharded else ''}"
                         f"{', activation checkpointing' if cfg.activation_checkpointing else ''}), "
                         f"{cfg.batch_size * cfg.block_size * self.accum * ranks.world_size} tokens per step")
            self.metrics.event(event="start", config=cfg.to_dict(), parameters=self.raw_model.num_parameters(),
                               world_size=ranks.world_size, device=str(self.device),
                               flops_per_token=self.flops_per_token, peak_tflops=self.peak_tflops)
            self._evaluate(lr_at(0, cfg))
            if cfg.grad_accum < ranks.world_size and ranks.main:
                self.log(f"--grad-accum {cfg.grad_accum} < {ranks.world_size} ranks: one micro-batch per rank")
            self._checkpoint()  # step 0: a run killed before its first periodic checkpoint can resume
        elif self.counters["step"] < cfg.max_steps:
            self.metrics.event(event="resume", **self._resume_event)
            for key, (was, now) in self.schedule_changes.items():
                if ranks.main:
                    self.log(f"--resume with {key} {now} (was {was}): recorded in {METRICS}")
        return self.counters["step"]

    def _skipped(self, step: int, lr: float) -> None:
        """A step skipped for a non-finite gradient: logged; too many in a row stop the run."""
        self.metrics.event(event="skipped", lr=lr, grad_norm=float(self._last_grad_norm.item()),
                           consecutive=self.consecutive_skips, skipped_steps=self.counters["skipped_steps"])
        if self.dist.main:
            self.log(f"step {step}: the gradient norm is not finite; step skipped (weights and optimizer state "
                     f"unchanged; {self.consecutive_skips} in a row)")
        if self.consecutive_skips >= self.cfg.max_skipped_steps:
            self.metrics.event(event="diverged", lr=lr, skipped_steps=self.counters["skipped_steps"])
            raise TrainError(f"training diverged: {self.consecutive_skips} steps in a row (up to step {step}) had a "
                             f"non-finite gradient; the last good checkpoint in {self.out_dir} is intact: continue it "
                             + self._divergence_advice())

    def _log_train(self, step: int, loss: torch.Tensor, lr: float, progress: Progress) -> None:
        mean = loss.clone()  # this step's loss, averaged over its micro-batches and the ranks
        self.dist.mean_([mean])
        train_loss = mean.item()  # the host sync of a logged step
        self.metrics.clock.lap()  # now that the device caught up
        extra = self._diagnostics(full=due(step, self.cfg.eval_every, self.cfg.max_steps))
        speed = self.metrics.window_speed()
        self.metrics.event(event="train", train_loss=train_loss, lr=lr,
                           grad_norm=round(float(self._last_grad_norm.item()), 6),
                           skipped_steps=self.counters["skipped_steps"], **speed, **extra)
        progress.show(train_loss, lr, speed.get("tokens_per_s", 0))

    def _evaluate(self, lr: float) -> float:
        """The validation loss and attention statistics, logged (collectives: every rank calls it)."""
        val_loss = self.evaluator.loss(self.eval_model)
        self.metrics.event(event="eval", val_loss=val_loss, lr=lr, **self.evaluator.attention(self.raw_model))
        return val_loss

    def _stop_agreed(self, logged: bool) -> bool:
        """Whether to stop after this step: a signal on any rank, agreed by a collective at logged steps only
        under torchrun (no extra sync per step)."""
        if self.dist.enabled:
            return logged and self.dist.any_rank(self.signals.requested)
        return self.signals.requested

    def _checkpoint(self) -> None:
        """A checkpoint (a collective); never with non-finite weights or optimizer state: the run stops instead,
        its earlier checkpoints intact."""
        if not self.dist.state_is_finite(self.raw_model.parameters(), self.opt):
            self.metrics.event(event="diverged", reason="non-finite weights or optimizer state")
            raise TrainError(f"the weights or optimizer state are not finite at step {self.counters['step']}; no "
                             f"checkpoint was written and the earlier ones in {self.out_dir} are intact: resume "
                             + self._divergence_advice())
        self.checkpointer.save(self.state)

    def _check_ranks_identical(self) -> None:
        fields = self.dist.ranks_identical(self.raw_model.parameters())
        self.metrics.event(event="ranks", **fields)
        if fields.get("ranks_identical") is False:
            raise TrainError("the ranks ended with different weights")

    def summary(self, record: bool = True) -> dict[str, Any]:
        base = {"out_dir": str(self.out_dir), "optimizer": self.cfg.optimizer, "preset": self.cfg.preset,
                **self._diagnostics()}
        return self.metrics.summary(base, record=record)


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


__all__ = ["StopRequestedError", "Trainer", "all_finite", "format_summary", "in_forward_sampled_losses",
           "lr_at", "resolve_device", "train", "use_bf16"]
