"""How much memory one device needs for a run of ``sophia train``, worked out from the real terms.

All sizes in bytes, per device (per rank), for a GPT of ``L`` layers, width ``d``, ``n`` parameters,
padded vocabulary ``V``, micro-batch ``B`` sequences of ``T`` tokens (``s = B*T`` tokens):

* **parameters, gradients, optimizer state**: fp32 weights ``4n`` and gradients ``4n``; state per
  optimizer (:data:`STATE_BYTES`, e.g. 8n for AdamW, SophiaG and SophiaH, 4n for Lion); under
  autocast the cached bf16 copy of every weight, ``2n``; under DDP one fp32 bucket copy of the
  gradients, ``4n``.
* **activations kept for the backward, per layer**, as ``c * s * d`` bytes, summing what each op
  saves (ln = LayerNorm, which autocast runs in fp32):

  =====================================  ================  ============
  saved tensor                            bf16 autocast     fp32
  =====================================  ================  ============
  ln_1 input (residual stream, fp32)      4                 4
  qkv input (ln_1 output)                 2                 4
  attention q, k, v and output            8                 16
  proj input                              2                 4
  ln_2 input (fp32)                       4                 4
  fc input (ln_2 output)                  2                 4
  GELU input (4d wide)                    8                 16
  fc2 input (GELU output, 4d wide)        8                 16
  total ``c``                             38                68
  =====================================  ================  ============

  Fused attention (SDPA: flash / memory-efficient on GPUs, the flash kernel on CPUs) keeps no
  T x T matrix; the explicit ``math`` path (used by Hutchinson's double backward) keeps the
  softmax output, ``2 * heads * B * T^2 * bytes`` more per layer.
* **logits and loss**: the logits (``s*V`` in the compute dtype), the fp32 log-softmax the loss
  keeps (``4sV``) and, in the backward, its fp32 gradient and the gradient of the logits
  (``8sV``): ``(2 or 4 + 12) * s * V``.
* **the Hessian refresh**: Sophia-G's sampled-label forward/backward runs after ``zero_grad``
  on at most one micro-batch, so it needs no more than a training micro-batch; Sophia-H's
  Hutchinson estimate keeps a second-order graph with the math attention path: counted as twice
  the activations (math path) of its micro-batch, plus the logits.

Under ``--parallel fsdp`` (FSDP2 over ``W`` ranks) the weights, gradients and optimizer state are
sharded: ``(8 + state) * n / W``; on top come the gathered weights in compute (the root's:
embeddings, final norm, for the whole step, and two blocks' in flight) in the compute dtype (bf16
under the CUDA mixed-precision policy, else fp32), the unsharded gradients that accumulate across
micro-batches without a reduce (``2n`` bf16 or ``4n`` fp32 when a rank runs more than one), or else
two blocks' reduce-scatter buffers; no DDP buckets. Sophia-H's Hutchinson refresh gathers the full
fp32 weights and builds the full estimate (``8n`` more, for the refresh only). With
``--activation-checkpointing`` a layer keeps only its fp32 input (``4 * s * d``) and one layer's
activations are recomputed at a time.

The peak is the static part plus the larger of the training micro-batch and the refresh. An
allocator's fragmentation and workspace come on top: :func:`plan` adds :data:`OVERHEAD_BYTES`
(CUDA context and library workspaces, measured at about 0.5-1 GiB) on CUDA only.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from sophia.lm.optimizers import REGISTRY

# Optimizer state bytes per parameter (fp32 parameters): exp_avg + hessian, moment buffers, ...
STATE_BYTES = {name: entry.state_bytes for name, entry in REGISTRY.items()}
OVERHEAD_BYTES = 1 << 30
GiB = 2**30
# Peak dense bf16 tensor-core TFLOPS (no sparsity), for MFU. A name matches when it is contained in the
# device name reported by torch.cuda.get_device_name (checked in order).
PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("GH200", 989.0), ("A100", 312.0), ("A10G", 70.0),
               ("A10", 125.0), ("L40S", 362.0), ("L4", 121.0), ("4090", 165.0), ("3090", 71.0), ("V100", 125.0),
               ("MI300X", 1307.0), ("MI250", 362.0))


def padded_vocab(vocab: int, multiple: int) -> int:
    return vocab if multiple <= 1 else ((vocab + multiple - 1) // multiple) * multiple


def gpt_parameters(n_layer: int, n_embd: int, vocab: int, block_size: int, bias: bool,
                   qk_norm: bool = False, n_head: int = 1) -> int:
    """The parameter count of :class:`sophia.lm.model.GPT` (tied embeddings), by formula."""
    d = n_embd
    per_layer = 12 * d * d + (2 * d) * 2  # attention 4d^2, MLP 8d^2; two LayerNorm weights + biases
    if bias:
        per_layer += 3 * d + d + 4 * d + d  # qkv, proj, fc, fc2 biases
    else:
        per_layer -= 2 * d  # LayerNorms without bias
    if qk_norm:
        per_layer += 2 * (d // n_head)
    final_ln = 2 * d if bias else d
    return vocab * d + block_size * d + n_layer * per_layer + final_ln


def flops_per_token(n_params_non_embedding: int, n_layer: int, n_embd: int, block_size: int) -> float:
    """Training FLOPs per token: 6N for the matrix multiplies of the forward and backward (N without the
    position embedding, with the tied output head), plus attention's 6 * 2 * L * T * d (the QK^T and AV
    products over the causal window counted in full, as nanoGPT and the PaLM paper do)."""
    return 6.0 * n_params_non_embedding + 12.0 * n_layer * block_size * n_embd


def peak_tflops(device: torch.device | str) -> float | None:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS:
        if key in name:
            return value
    return None


@dataclass
class MemoryEstimate:
    parameters: int
    static: int                 # weights, gradients, optimizer state, weight casts, DDP buckets
    activations: int            # all layers, one training micro-batch
    logits: int                 # logits and loss, one training micro-batch
    refresh: int                # the Hessian refresh's own activations (0: none beyond training)
    overhead: int

    @property
    def total(self) -> int:
        return self.static + max(self.activations + self.logits, self.refresh) + self.overhead

    def as_dict(self) -> dict[str, float]:
        return {k: round(v / GiB, 3) for k, v in (("static", self.static), ("activations", self.activations),
                                                  ("logits", self.logits), ("refresh", self.refresh),
                                                  ("overhead", self.overhead), ("total", self.total))}


def _block_parameters(n_embd: int, bias: bool) -> int:
    return 12 * n_embd * n_embd + (13 * n_embd if bias else 2 * n_embd)


def activation_bytes_per_layer(tokens: int, n_embd: int, n_head: int, block_size: int, micro_batch: int,
                               bf16: bool, math_attention: bool) -> int:
    c = 38 if bf16 else 68
    out = c * tokens * n_embd
    if math_attention:
        out += 2 * n_head * micro_batch * block_size * block_size * (2 if bf16 else 4)
    return out


def estimate(*, n_layer: int, n_head: int, n_embd: int, block_size: int, vocab: int, batch_size: int,
             optimizer: str, bf16: bool, world_size: int = 1, bias: bool = False, qk_norm: bool = False,
             hessian_batch_fraction: float = 1.0, cuda: bool = False, parallel: str = "ddp",
             activation_checkpointing: bool = False, micro_batches: int = 1) -> MemoryEstimate:
    """Peak memory of one device, by the terms in this module's docstring (``micro_batches``: per rank and
    step, which decides whether FSDP keeps unsharded gradients between them)."""
    n = gpt_parameters(n_layer, n_embd, vocab, block_size, bias, qk_norm, n_head)
    state = STATE_BYTES.get(optimizer, 8)
    if parallel == "fsdp":
        compute_bytes = 2 if bf16 and cuda else 4  # the mixed-precision policy gathers bf16 weights on CUDA
        root = n - n_layer * _block_parameters(n_embd, bias)
        block = _block_parameters(n_embd, bias)
        static = -(-(8 + state) * n // world_size) + compute_bytes * (root + min(2, n_layer) * block)
        if bf16 and not cuda:
            static += 2 * n  # autocast's cached bf16 casts of the gathered weights
        static += compute_bytes * n if micro_batches > 1 else 4 * 2 * block
    else:
        static = 4 * n + 4 * n + state * n
        if bf16:
            static += 2 * n
        if world_size > 1:
            static += 4 * n
    tokens = batch_size * block_size
    per_layer = activation_bytes_per_layer(tokens, n_embd, n_head, block_size, batch_size, bf16, False)
    if activation_checkpointing:
        acts = n_layer * 4 * tokens * n_embd + per_layer
    else:
        acts = n_layer * per_layer
    acts += 4 * tokens * n_embd * 2  # embeddings' sum and ln_f's fp32 input
    logits = (2 if bf16 else 4) * tokens * vocab + 12 * tokens * vocab
    refresh = 0
    entry = REGISTRY.get(optimizer)
    hutchinson = entry is not None and entry.refresh == "hutchinson"
    if hutchinson or (entry is not None and entry.second_order_graph):  # a Hessian-vector product's graph
        hb = max(1, round(batch_size * hessian_batch_fraction)) if hutchinson else batch_size
        ht = hb * block_size
        refresh = 2 * n_layer * activation_bytes_per_layer(ht, n_embd, n_head, block_size, hb, bf16, True)
        refresh += (2 if bf16 else 4) * ht * vocab + 12 * ht * vocab + 8 * n  # and the HVP's vectors
        if parallel == "fsdp" and hutchinson:
            refresh += 8 * n  # the gathered full weights and the full estimate
    return MemoryEstimate(parameters=n, static=static, activations=acts, logits=logits, refresh=refresh,
                          overhead=OVERHEAD_BYTES if cuda else 0)


def estimate_run(cfg: Any, vocab: int, *, world_size: int, device_type: str, bf16: bool,
                 batch_size: int | None = None) -> MemoryEstimate:
    """:func:`estimate` for a run's settings (a TrainConfig), at its micro-batch or at ``batch_size``."""
    return estimate(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                    vocab=padded_vocab(vocab, cfg.vocab_pad_multiple), batch_size=batch_size or cfg.batch_size,
                    optimizer=cfg.optimizer, bf16=bf16, world_size=world_size, bias=cfg.bias, qk_norm=cfg.qk_norm,
                    hessian_batch_fraction=cfg.hessian_batch_fraction, cuda=device_type == "cuda",
                    parallel=getattr(cfg, "parallel", "ddp"),
                    activation_checkpointing=getattr(cfg, "activation_checkpointing", False),
                    micro_batches=max(1, cfg.grad_accum // world_size))


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def fit_advice(est_fn, batch_size: int, grad_accum: int, world_size: int, budget: int) -> str:
    """The largest --batch-size (halving) that fits, with the --grad-accum that keeps the global batch; first a
    smaller --hessian-batch-fraction when the Hessian refresh is what does not fit."""
    e = est_fn(batch_size)
    if e.refresh > e.activations + e.logits and e.static + e.activations + e.logits + e.overhead <= budget:
        return ("a smaller --hessian-batch-fraction (the Hessian refresh's double backward is what does not fit; "
                f"it needs {e.refresh / GiB:.1f} GiB)")
    global_seqs = batch_size * max(grad_accum, world_size)
    b = batch_size
    while b > 1:
        b //= 2
        if est_fn(b).total <= budget:
            accum = math.ceil(global_seqs / b)
            accum = world_size * math.ceil(accum / world_size)
            return (f"--batch-size {b} --grad-accum {accum} (the same {global_seqs} sequences per step, "
                    f"{b * accum} with rounding)" if b * accum != global_seqs else
                    f"--batch-size {b} --grad-accum {accum} (the same {global_seqs} sequences per step)")
    return "a smaller model or more devices (--parallel fsdp where available): even --batch-size 1 does not fit"


def plan_summary(cfg: Any, *, world_size: int, device_type: str, device_bytes: int | None, bf16: bool,
                 vocab: int) -> dict[str, Any]:
    """What ``--dry-run`` prints: the run's shape and its estimated peak memory per device."""
    from sophia.lm.model import GPT, GPTConfig

    V = padded_vocab(vocab, cfg.vocab_pad_multiple)

    def est(batch_size: int) -> MemoryEstimate:
        return estimate_run(cfg, vocab, world_size=world_size, device_type=device_type, bf16=bf16,
                            batch_size=batch_size)

    e = est(cfg.batch_size)
    with torch.device("meta"):
        model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=vocab, n_layer=cfg.n_layer, n_head=cfg.n_head,
                              n_embd=cfg.n_embd, bias=cfg.bias, qk_norm=cfg.qk_norm,
                              vocab_pad_multiple=cfg.vocab_pad_multiple))
        n_params = model.num_parameters(non_embedding=False)
        n_flops = model.num_parameters(non_embedding=True)
    accum = max(1, cfg.grad_accum // world_size)
    out: dict[str, Any] = {
        "preset": cfg.preset, "optimizer": cfg.optimizer, "parameters": n_params, "vocab_size": vocab,
        "padded_vocab_size": V, "world_size": world_size, "micro_batches_per_rank": accum,
        "micro_batch": [cfg.batch_size, cfg.block_size],
        "tokens_per_step": cfg.batch_size * cfg.block_size * accum * world_size,
        "device": device_type, "dtype": "bfloat16" if bf16 else "float32",
        "flops_per_token": flops_per_token(n_flops, cfg.n_layer, cfg.n_embd, cfg.block_size),
        "memory_gib": round(e.total / GiB, 2), "memory_breakdown_gib": e.as_dict(),
        "device_memory_gib": round(device_bytes / GiB, 2) if device_bytes else None,
    }
    parallel = getattr(cfg, "parallel", "ddp")
    out["parallel"] = parallel
    out["activation_checkpointing"] = bool(getattr(cfg, "activation_checkpointing", False))
    if parallel == "ddp":  # what sharding would need, so a user sees when it is worth it
        import dataclasses

        sharded = dataclasses.replace(cfg, parallel="fsdp") if dataclasses.is_dataclass(cfg) else None
        if sharded is not None:
            out["memory_fsdp_gib"] = round(estimate_run(sharded, vocab, world_size=world_size, device_type=device_type,
                                                        bf16=bf16).total / GiB, 2)
    out["fits"] = None if not device_bytes else bool(e.total <= 0.9 * device_bytes)
    if out["fits"] is False:
        out["advice"] = fit_advice(est, cfg.batch_size, cfg.grad_accum, world_size, int(0.9 * device_bytes))
        if parallel == "ddp" and out.get("memory_fsdp_gib") is not None \
                and out["memory_fsdp_gib"] * GiB <= 0.9 * device_bytes:
            out["advice"] = (f"--parallel fsdp (about {out['memory_fsdp_gib']:.1f} GiB per device: weights, "
                             f"gradients and optimizer state sharded over {world_size} rank(s)), or {out['advice']}")
    return out


def format_plan(p: dict[str, Any]) -> str:
    b = p["memory_breakdown_gib"]
    how = "FSDP2" if p.get("parallel") == "fsdp" else "DDP" if p["world_size"] > 1 else "one process"
    if p.get("activation_checkpointing"):
        how += ", activation checkpointing"
    lines = [f"plan       {p['preset']} with {p['optimizer']} on {p['world_size']} x {p['device']} ({p['dtype']}; "
             f"{how})",
             f"model      {p['parameters']:,} parameters (vocabulary {p['vocab_size']:,}, padded to "
             f"{p['padded_vocab_size']:,}); {p['flops_per_token'] / 1e9:.2f} GFLOPs per token",
             f"batch      {p['tokens_per_step']:,} tokens per step: {p['micro_batches_per_rank']} micro-batch(es) "
             f"of {p['micro_batch'][0]} x {p['micro_batch'][1]} per rank",
             f"memory     about {p['memory_gib']:.1f} GiB per device (static {b['static']:.1f}: weights, grads, "
             f"optimizer state; activations {b['activations']:.1f}; logits {b['logits']:.1f}; Hessian refresh "
             f"{b['refresh']:.1f}; overhead {b['overhead']:.1f})"
             + (f"; under --parallel fsdp about {p['memory_fsdp_gib']:.1f} GiB" if "memory_fsdp_gib" in p else "")]
    if p["device_memory_gib"] is None:
        lines.append("fits       unknown (give --device-memory-gib)")
    else:
        verdict = "yes" if p["fits"] else "NO"
        lines.append(f"fits       {verdict}: the device has {p['device_memory_gib']:.1f} GiB (90% usable)"
                     + (f"; try {p['advice']}" if not p["fits"] else ""))
    return "\n".join(lines)


def measure_peak_bytes(*, n_layer: int, n_head: int, n_embd: int, block_size: int, vocab: int, batch_size: int,
                       optimizer: str, device: str = "cpu", bf16: bool = False, steps: int = 2,
                       vocab_pad_multiple: int = 64) -> int:
    """The measured peak memory of training steps (forward, backward, clip, optimizer step, and Sophia-G's
    refresh) of the model :func:`estimate` describes, above what the process held before the model existed.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the peak resident set size (VmHWM, reset before the model
    is built), ideally with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors leave the heap."""
    from sophia.lm.model import GPT, GPTConfig
    from sophia.lm.optimizers import OptimizerSettings, build_optimizer

    dev = torch.device(device)
    tokens = torch.randint(0, vocab, (steps + 1, batch_size, block_size + 1))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        _reset_peak_rss()  # earlier peaks (imports) must not count
        with open("/proc/self/statm") as f:
            base = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    cfg = GPTConfig(block_size=block_size, vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                    bias=False, vocab_pad_multiple=vocab_pad_multiple)
    model = GPT(cfg).to(dev)
    opt = build_optimizer(optimizer, model.param_groups(0.1),
                          OptimizerSettings(lr=1e-4, weight_decay=0.1, beta1=0.9, beta2=0.95))
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else torch.autocast(dev.type, enabled=False)
    for step in range(steps):
        x, y = tokens[step, :, :-1].to(dev), tokens[step, :, 1:].to(dev)
        with amp:
            loss = model(x, y)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if REGISTRY[optimizer].refresh == "gnb":
            x = tokens[steps, :, :-1].to(dev)
            with amp:  # as `sophia train` refreshes: labels sampled inside the forward
                sampled_loss = model(x, sample_uniform=torch.rand(x.shape, device=dev))[1]
            sampled_loss.backward()
            opt.update_hessian(bs=x.numel())
            opt.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - base
    return _peak_rss() - base


def _reset_peak_rss() -> None:
    try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss() -> int:
    """VmHWM (the peak since the last reset) where /proc has it, else ru_maxrss (the lifetime peak)."""
    import resource

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
