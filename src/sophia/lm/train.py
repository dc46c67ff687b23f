"""``sophia train``: one training loop for every optimizer.

Step ``i`` (0-based) draws ``grad_accum`` micro-batches (over all ranks: under DDP each rank runs
``grad_accum / world_size`` of them, as the GPT-2 presets' 480 sequences per step assume),
backpropagates their mean loss, clips
the gradient norm, sets the scheduled lr and steps the optimizer. Sophia-G then refreshes its
Gauss-Newton-Bartlett estimate after steps k-1, 2k-1, ... (the authors' schedule) on a fresh
batch; Sophia-H hands a Hutchinson estimate over before its refresh steps. Every extra
forward/backward is counted in the logs. Events of step ``i`` are logged with ``step = i+1``
(steps completed); the checkpoint after it holds ``step = i+1``; a resumed run drops logged
events after its checkpoint and continues bitwise as if never interrupted (on CPU).
"""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sophia.hessian import categorical_sampled_loss, hutchinson
from sophia.lm.checkpoint import CHECKPOINT, MetricsLog, load_checkpoint, save_checkpoint
from sophia.lm.config import TrainConfig, TrainError
from sophia.lm.model import GPT, GPTConfig
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


class Distributed:
    """Rank bookkeeping; initialises torch.distributed when launched by torchrun."""

    def __init__(self, device_pref: str) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_pref == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        elif device_pref == "cpu" or device_pref.startswith("cuda"):
            try:
                device = torch.device(device_pref)
            except RuntimeError:
                raise TrainError(f"--device must be auto, cpu or cuda[:N], got {device_pref!r}") from None
        else:
            raise TrainError(f"--device must be auto, cpu or cuda[:N], got {device_pref!r}")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise TrainError(f"--device {device_pref}: CUDA is not available on this machine")
            if self.world_size > 1:
                device = torch.device("cuda", self.local_rank)
            elif device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(device)
        self.device = device
        self.enabled = self.world_size > 1
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_mean_(self, tensors: list[torch.Tensor]) -> None:
        if self.enabled:
            for t in tensors:
                dist.all_reduce(t)
                t.div_(self.world_size)

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _estimate_memory_bytes(cfg: TrainConfig, n_params: int, vocab: int) -> int:
    weights_grads_state = 16 * n_params  # fp32 weights, grads, two state tensors
    tokens = cfg.batch_size * cfg.block_size
    per_layer = tokens * cfg.n_embd * 34 * 2 + 5 * cfg.n_head * tokens * cfg.block_size * 2
    logits = tokens * vocab * 4 * 3
    return weights_grads_state + cfg.n_layer * per_layer + logits


def _vocab_guess(tokenizer: str) -> int:
    """The vocabulary a tokenizer spec gives, known before any data is read (GPT-2's if unsure)."""
    try:
        kind, n = parse_spec(tokenizer)
    except ValueError:
        return 50257
    return {"byte": 256}.get(kind, n or 50257)


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: bool = False, log=None) -> None:
        self.cfg = cfg
        self.resume = resume
        self.dist = Distributed(cfg.device)
        self.device = self.dist.device
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.out_dir = Path(cfg.out_dir)
        self._attn_warned = False

    # -- set-up ---------------------------------------------------------------------------
    def _check_out_dir(self) -> None:
        ckpt = self.out_dir / CHECKPOINT
        if ckpt.exists() and not self.resume:
            raise TrainError(f"{self.out_dir} already holds a checkpoint; pass --resume to continue it or choose "
                             "another --out-dir (nothing was changed)")
        if self.resume and not ckpt.exists():
            raise TrainError(f"--resume: no checkpoint at {ckpt}")

    def _load_data(self):
        from sophia.lm.data import DataError, load_dataset, prepare

        try:
            if self.dist.main:
                ds_dir = prepare(self.cfg.corpus, self.cfg.tokenizer, Path(self.cfg.data_root), log=self.log)
            self.dist.barrier()
            if not self.dist.main:
                ds_dir = prepare(self.cfg.corpus, self.cfg.tokenizer, Path(self.cfg.data_root), log=lambda m: None)
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
        ckpt = load_checkpoint(self.out_dir) if self.resume else None  # fail before any work
        if ckpt is not None and ckpt.get("world_size", 1) != world:
            raise TrainError(f"--resume: the checkpoint was written by {ckpt.get('world_size', 1)} rank(s), not "
                             f"{world}; the data stream would differ")
        if cfg.compile and cfg.optimizer in NEEDS_CREATE_GRAPH:
            raise TrainError(f"--compile does not support the double backward that {cfg.optimizer} needs")
        self._check_memory(_vocab_guess(cfg.tokenizer))  # before preparing data, which can take long
        self.data = self._load_data()
        if len(self.data.train) <= cfg.block_size + 1 or len(self.data.val) <= cfg.block_size + 1:
            raise TrainError(f"the dataset is too small for --block-size {cfg.block_size}")
        self.model_config = GPTConfig(block_size=cfg.block_size, vocab_size=self.data.vocab_size,
                                      n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                      dropout=cfg.dropout, bias=cfg.bias, qk_norm=cfg.qk_norm)
        self._check_memory(self.data.vocab_size)
        torch.manual_seed(cfg.seed)
        self.model = GPT(self.model_config).to(self.device)
        # Dropout differs per rank (identical streams would correlate the ranks' noise).
        torch.manual_seed(cfg.seed + 7919 * self.dist.rank)
        self.raw_model = self.model
        if self.dist.enabled:
            if cfg.optimizer == "adahessian":
                raise TrainError("adahessian needs backward(create_graph=True), which DDP does not support")
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            self.model = torch.compile(self.model)
        settings = OptimizerSettings(lr=cfg.lr, weight_decay=cfg.weight_decay, beta1=cfg.beta1, beta2=cfg.beta2,
                                     rho=cfg.rho, eps=cfg.eps, hessian_interval=cfg.hessian_interval)
        self.opt = build_optimizer(cfg.optimizer, self.raw_model.param_groups(cfg.weight_decay), settings)
        self.data_gen = torch.Generator().manual_seed(cfg.seed + 1)
        from sophia.lm.data import fixed_batches

        self.val_batches = fixed_batches(self.data.val, cfg.batch_size, cfg.block_size, cfg.eval_batches,
                                         seed=1234)
        use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and self.device.type == "cuda"
                                               and torch.cuda.is_bf16_supported())
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext())
        self.amp_dtype = "bfloat16" if use_bf16 else "float32"
        self.counters = {"step": 0, "tokens": 0, "train_passes": 0, "hessian_passes": 0, "elapsed": 0.0}
        self.metrics = MetricsLog(self.out_dir, enabled=self.dist.main)
        if ckpt is not None:
            self._restore(ckpt)
        elif self.dist.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)
        if self.dist.main:
            for stale in self.out_dir.glob(f".{CHECKPOINT}.*.tmp"):  # left by a kill during a save
                stale.unlink(missing_ok=True)

    def _check_memory(self, vocab: int) -> None:
        cfg = self.cfg
        mc = GPTConfig(block_size=cfg.block_size, vocab_size=vocab, n_layer=cfg.n_layer, n_head=cfg.n_head,
                       n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias)
        with torch.device("meta"):
            n_params = GPT(mc).num_parameters(non_embedding=False)
        need, have = _estimate_memory_bytes(cfg, n_params, vocab), _available_bytes(self.device)
        if need > 0.9 * have:
            raise TrainError(f"preset {cfg.preset} needs about {need / 2**30:.1f} GiB on {self.device} "
                             f"({n_params / 1e6:.0f}M parameters, batch {cfg.batch_size}x{cfg.block_size}) but "
                             f"the device has {have / 2**30:.1f} GiB; lower --batch-size or --block-size, or use a "
                             "smaller preset")

    def _restore(self, ckpt: dict[str, Any]) -> None:
        saved = ckpt["config"]
        for key in ("optimizer", "n_layer", "n_head", "n_embd", "block_size", "bias", "qk_norm", "corpus",
                    "tokenizer"):
            if saved.get(key, False if key == "qk_norm" else None) != getattr(self.cfg, key):
                raise TrainError(f"--resume: the checkpoint was trained with {key}={saved.get(key)!r}, "
                                 f"not {getattr(self.cfg, key)!r}")
        try:
            self.raw_model.load_state_dict(ckpt["model"])
            self.opt.load_state_dict(ckpt["optimizer"])
            self.counters = dict(ckpt["counters"])
            rng = ckpt["rng"]
            torch.set_rng_state(rng["torch_per_rank"][self.dist.rank])
            self.data_gen.set_state(rng["data"])
            if self.device.type == "cuda" and "cuda_per_rank" in rng:
                torch.cuda.set_rng_state(rng["cuda_per_rank"][self.dist.rank], self.device)
        except (KeyError, IndexError, RuntimeError, ValueError) as e:
            raise TrainError(f"--resume: the checkpoint in {self.out_dir} does not fit this run "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        self.metrics.truncate_after(self.counters["step"])
        self.log(f"resumed {self.out_dir} at step {self.counters['step']}")

    def _gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        if not self.dist.enabled:
            return [t]
        out: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(out, t)
        return out

    def _checkpoint(self) -> None:
        """Written by rank 0, with every rank's RNG state (a collective: all ranks call it)."""
        rng = {"torch_per_rank": self._gather(torch.get_rng_state()), "data": self.data_gen.get_state()}
        if self.device.type == "cuda":
            rng["cuda_per_rank"] = self._gather(torch.cuda.get_rng_state(self.device))
        if not self.dist.main:
            return
        save_checkpoint(self.out_dir, {
            "model": self.raw_model.state_dict(), "optimizer": self.opt.state_dict(),
            "step": self.counters["step"], "counters": dict(self.counters), "config": self.cfg.to_dict(),
            "model_config": self.model_config.to_dict(), "rng": rng,
            "schedule": {"lr": lr_at(self.counters["step"], self.cfg)}, "data_position": rng["data"],
            "dataset_dir": str(Path(self.data.dir).resolve()), "world_size": self.dist.world_size,
        })

    # -- pieces of a step -----------------------------------------------------------------
    def _batch(self, batch_size: int):
        from sophia.lm.data import get_batch

        x, y = get_batch(self.data.train, batch_size, self.cfg.block_size, self.data_gen,
                         rank=self.dist.rank, world_size=self.dist.world_size)
        return x.to(self.device), y.to(self.device)

    def _hessian_batch_size(self) -> int:
        return max(1, round(self.cfg.batch_size * self.cfg.hessian_batch_fraction))

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total = 0.0
        for x, y in self.val_batches:
            with self.autocast:
                _, loss = self.raw_model(x.to(self.device), y.to(self.device))
            total += loss.item()
        self.model.train()
        loss = torch.tensor(total / len(self.val_batches), device=self.device)
        self.dist.all_reduce_mean_([loss])
        return loss.item()

    @torch.no_grad()
    def attention_stats(self) -> dict[str, list[float]]:
        """Per-layer largest attention logit and attention entropy on the first validation batch
        (one extra forward at evaluations only; the same weights on every rank)."""
        self.raw_model.eval()
        with self.autocast:
            stats = self.raw_model.attention_stats(self.val_batches[0][0].to(self.device))
        self.raw_model.train()
        stats = {k: [round(v, 4) for v in vals] for k, vals in stats.items()}
        worst = max(stats["attn_max_logit"], default=0.0)
        if (self.cfg.attn_logit_warn > 0 and worst > self.cfg.attn_logit_warn and self.dist.main
                and not self._attn_warned):
            self._attn_warned = True
            self.log(f"warning: an attention logit reached {worst:,.0f} (above --attn-logit-warn "
                     f"{self.cfg.attn_logit_warn:g}): attention is saturating (entropy per layer "
                     f"{', '.join(f'{e:.2f}' for e in stats['attn_entropy'])} nats). "
                     "Remedies: --qk-norm, or a lower --lr")
        return stats

    def _label_generator(self, micro: int) -> torch.Generator:
        """Labels sampled independently per rank (shared draws would bias N*g**2 under DDP), and
        reproducibly per (seed, step, rank, micro-batch), so resuming needs no extra state."""
        key = ((self.cfg.seed * 1_000_003 + self.counters["step"]) * 1009 + self.dist.rank) * 101 + micro
        return torch.Generator(device=self.device).manual_seed(key % (2**63 - 1))

    def _gnb_refresh(self) -> None:
        """Sampled-label backward over the whole (or a fraction of the) global batch, then N*g**2."""
        cfg = self.cfg
        self.opt.zero_grad(set_to_none=True)
        n_local = 0
        bs = self._hessian_batch_size()
        for micro in range(self.accum):
            x, _ = self._batch(bs)
            sync = self.model.no_sync() if self.dist.enabled and micro < self.accum - 1 else nullcontext()
            with sync, self.autocast:
                logits, _ = self.model(x)
                sampled = categorical_sampled_loss(logits, generator=self._label_generator(micro))
            (sampled.loss / self.accum).backward()
            n_local += sampled.n
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)
        self.opt.update_hessian(bs=n_local * self.dist.world_size)
        self.opt.zero_grad(set_to_none=True)
        self.counters["hessian_passes"] += self.accum * self.dist.world_size * bs / cfg.batch_size

    def _hutchinson_refresh(self) -> None:
        """Sophia-H: a Hutchinson estimate on a fresh batch, averaged over ranks, handed to the optimizer."""
        cfg = self.cfg
        params = [p for g in self.opt.param_groups for p in g["params"]]
        x, y = self._batch(self._hessian_batch_size())

        def loss_fn(ps):  # the parameters are the module's own: plain autograd, no functional call needed
            with self.autocast:
                return self.raw_model(x, y)[1]

        with self.raw_model.use_attention("math"):
            est = hutchinson(loss_fn, params)
        self.dist.all_reduce_mean_(est)
        self.opt.update_hessian(estimates=est)
        # a forward and backward with graph, then the Hessian-vector product (about one more backward)
        self.counters["hessian_passes"] += 2 * self.dist.world_size * self._hessian_batch_size() / cfg.batch_size

    def train_step(self, i: int) -> tuple[float, float]:
        cfg = self.cfg
        lr = lr_at(i, cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        if cfg.optimizer == "sophiah" and self.opt.hessian_due():
            self._hutchinson_refresh()
        create_graph = needs_create_graph(cfg.optimizer, i, cfg.hessian_interval)
        attention = self.raw_model.use_attention("math") if create_graph else nullcontext()
        total = 0.0
        with attention:
            for micro in range(self.accum):
                x, y = self._batch(cfg.batch_size)
                sync = self.model.no_sync() if self.dist.enabled and micro < self.accum - 1 else nullcontext()
                with sync, self.autocast:
                    _, loss = self.model(x, y)
                (loss / self.accum).backward(create_graph=create_graph)
                total += loss.item()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.counters["train_passes"] += self.accum * self.dist.world_size
        if create_graph:
            # the Hessian-vector product's backward
            self.counters["hessian_passes"] += self.accum * self.dist.world_size
        if cfg.optimizer == "sophiag" and i % cfg.hessian_interval == cfg.hessian_interval - 1:
            self._gnb_refresh()
        self.counters["step"] = i + 1
        self.counters["tokens"] += cfg.batch_size * cfg.block_size * self.accum * self.dist.world_size
        loss = torch.tensor(total / self.accum, device=self.device)
        self.dist.all_reduce_mean_([loss])
        return loss.item(), lr

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

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from sophia.denormal import flush_denormals

        flush = self.cfg.flush_denormal and self.device.type == "cpu"
        try:
            with flush_denormals(True) if flush else nullcontext():
                self.setup()
                return self._loop()
        finally:
            self.dist.close()

    def _loop(self) -> dict[str, Any]:
        cfg = self.cfg
        if not self.resume:
            if self.dist.main:
                self.log(f"training {cfg.preset} ({self.raw_model.num_parameters() / 1e6:.2f}M parameters) with "
                         f"{cfg.optimizer} for {cfg.max_steps} steps on {self.device} ({self.amp_dtype}), "
                         f"{cfg.batch_size * cfg.block_size * self.accum * self.dist.world_size} tokens per step")
            self._event(event="start", config=cfg.to_dict(), parameters=self.raw_model.num_parameters(),
                        world_size=self.dist.world_size, device=str(self.device))
            self._event(event="eval", val_loss=self.evaluate(), lr=lr_at(0, cfg),
                        **self.attention_stats())  # evaluate is a collective
            if cfg.grad_accum < self.dist.world_size and self.dist.main:
                self.log(f"--grad-accum {cfg.grad_accum} < {self.dist.world_size} ranks: one micro-batch per rank")
            self._checkpoint()  # step 0: a run killed before its first periodic checkpoint can resume
        start_step = self.counters["step"]
        bar = None
        if self.dist.main and cfg.progress and start_step < cfg.max_steps:
            from tqdm import tqdm

            bar = tqdm(total=cfg.max_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr,
                       mininterval=1.0)
        last_val = None
        t_last = time.perf_counter()
        try:
            for i in range(start_step, cfg.max_steps):
                loss, lr = self.train_step(i)
                now = time.perf_counter()
                self.counters["elapsed"] += now - t_last
                t_last = now
                step = i + 1
                if not math.isfinite(loss):
                    self._event(event="diverged", train_loss=loss, lr=lr)
                    raise TrainError(f"training diverged at step {step} (loss {loss}); try a lower --lr"
                                     + (" or a larger --rho" if cfg.optimizer.startswith("sophia") else ""))
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    extra = self._diagnostics(full=step % cfg.eval_every == 0 or step == cfg.max_steps)
                    self._event(event="train", train_loss=loss, lr=lr, **extra)
                if step % cfg.eval_every == 0 or step == cfg.max_steps:
                    last_val = self.evaluate()
                    self._event(event="eval", val_loss=last_val, lr=lr, **self.attention_stats())
                if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                    self._checkpoint()
                t_last = time.perf_counter()  # evaluation and checkpoints are not training time
                if bar is not None:
                    tok_s = self.counters["tokens"] / max(self.counters["elapsed"], 1e-9)
                    bar.set_postfix(loss=f"{loss:.3f}", val=f"{last_val:.3f}" if last_val else "-",
                                    tok_s=f"{tok_s:,.0f}", refresh=False)
                    bar.update(1)
            if self.dist.enabled and start_step < cfg.max_steps:
                self._check_ranks_identical()
        finally:
            if bar is not None:
                bar.close()
        return self.summary()

    def _check_ranks_identical(self) -> None:
        """Every rank must hold the same weights; a cheap float64 fingerprint, gathered."""
        with torch.no_grad():
            fp = torch.stack([p.double().sum() for p in self.raw_model.parameters()]).to(self.device)
        gathered = [torch.empty_like(fp) for _ in range(self.dist.world_size)]
        dist.all_gather(gathered, fp)
        same = all(torch.equal(gathered[0], g) for g in gathered[1:])
        self._event(event="ranks", ranks_identical=same, world_size=self.dist.world_size)
        if not same:
            raise TrainError("the ranks ended with different weights")

    def summary(self) -> dict[str, Any]:
        from sophia.lm.checkpoint import read_metrics

        events = read_metrics(self.out_dir) if (self.out_dir / "metrics.jsonl").exists() else []
        evals = [e for e in events if e.get("event") == "eval"]
        c = self.counters
        return {"out_dir": str(self.out_dir), "optimizer": self.cfg.optimizer, "preset": self.cfg.preset,
                "steps": c["step"], "tokens": c["tokens"], "elapsed": c["elapsed"],
                "train_passes": c["train_passes"], "hessian_passes": c["hessian_passes"],
                "final_val_loss": evals[-1]["val_loss"] if evals else None,
                "best_val_loss": min((e["val_loss"] for e in evals), default=None),
                **{k: evals[-1][k] for k in ("attn_max_logit", "attn_entropy") if evals and k in evals[-1]},
                **self._diagnostics()}


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"run        {s['out_dir']}  ({s['preset']}, {s['optimizer']})",
             f"steps      {s['steps']}  tokens {s['tokens']:,}  time {s['elapsed']:.1f}s  "
             f"({s['tokens'] / max(s['elapsed'], 1e-9):,.0f} tokens/s)",
             f"passes     {s['train_passes']} training forward/backward + {s['hessian_passes']:g} for Hessian "
             "estimates",
             f"val loss   final {s['final_val_loss']:.4f}  best {s['best_val_loss']:.4f}"
             if s["final_val_loss"] is not None else "val loss   -"]
    if s.get("attn_max_logit"):
        lines.append(f"attention  max logit per layer {', '.join(f'{v:.0f}' for v in s['attn_max_logit'])}; "
                     f"entropy {', '.join(f'{v:.2f}' for v in s['attn_entropy'])} nats")
    if "win_rate" in s:
        lines.append(f"sophia     win rate {s['win_rate']:.3f}  hessian norm {s['hessian_norm']:.3g}  "
                     f"refreshes {s['hessian_updates']} (skipped {s['hessian_skipped']})")
    return "\n".join(lines)


def train(cfg: TrainConfig, *, resume: bool = False, log=None) -> dict[str, Any]:
    return Trainer(cfg, resume=resume, log=log).run()


__all__ = ["Trainer", "format_summary", "lr_at", "train"]
