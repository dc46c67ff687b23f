"""What a run reports: its events (``metrics.jsonl``, and any other sink beside it), its training time and
speed, the progress bar, and the summary at the end.

Every event carries the run's counters (step, tokens, elapsed training seconds, training and Hessian passes).
Training time is kept by a :class:`Clock` that the loop pauses over evaluation and checkpoints; speed is
measured over windows of it (tokens per second and MFU between logged steps, and a steady window that leaves
out compilation and the first steps after a (re)start). A sink is any object with ``write(event)`` (and
optionally ``close()``); ``metrics.jsonl`` is always the first and the source of truth. The others (TensorBoard,
W&B: :mod:`sophia.lm.sinks`) join through :meth:`Metrics.add_sink`, which guards them: one that fails to open,
write or close (a full disk, the network) is reported once, in one line, and left out from then on; training goes
on, and metrics.jsonl has every event.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from sophia.fileio import atomic_write_bytes

METRICS = "metrics.jsonl"
Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class MetricsLog:
    """DIR/metrics.jsonl: one JSON object per event, appended and flushed line by line."""

    def __init__(self, out_dir: Path, enabled: bool = True) -> None:
        self.path = out_dir / METRICS
        self.enabled = enabled

    def truncate_after(self, step: int, log: Log | None = _stderr) -> None:
        """Drop events of steps after ``step`` (those a resumed run will redo). Lines that are not readable
        events are dropped too, once the file as it was is kept beside it (``metrics.jsonl.TIME.damaged``)
        and ``log`` has said so; a last line cut by a kill is dropped quietly."""
        if not (self.enabled and self.path.exists()):
            return
        raw = self.path.read_bytes()
        lines, bad = _scan_metrics(raw)
        if bad:
            aside = self.path.with_name(f"{METRICS}.{time.strftime('%Y%m%d-%H%M%S')}.damaged")
            atomic_write_bytes(aside, lambda f: f.write(raw))
            if log is not None:
                log(f"warning: {_skipped_lines(self.path, bad)}; the file as it was is kept as {aside.name}")
        text = b"".join(line + b"\n" for line, event in lines if event is not None and event["step"] <= step)
        atomic_write_bytes(self.path, lambda f: f.write(text))

    def write(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")
            f.flush()


def _event_of(line: bytes) -> dict[str, Any] | str:
    """The event a line of metrics.jsonl holds, or why it holds none: an event is a JSON object with an integer
    ``step`` and a string ``event`` (and a number ``val_loss`` or ``train_loss`` for eval and train events)."""
    try:
        event = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return "not UTF-8 text"
    except ValueError:
        return "not JSON"
    if not isinstance(event, dict):
        return f"a JSON {type(event).__name__}, not an object"
    step, kind = event.get("step"), event.get("event")
    if type(step) is not int or step < 0:
        return f"step is {step!r}"
    if not isinstance(kind, str):
        return f"event is {kind!r}"
    loss = {"eval": "val_loss", "train": "train_loss"}.get(kind)
    if loss is not None and (isinstance(event.get(loss), bool) or not isinstance(event.get(loss), (int, float))):
        return f"{loss} is {event.get(loss)!r}"
    return event


def _scan_metrics(raw: bytes) -> tuple[list[tuple[bytes, dict[str, Any] | None]], list[tuple[int, str]]]:
    """Each non-blank line with its event (None when it holds none), and the (line number, reason) of those
    that hold none, except a last line without its newline: one a kill cut short (or being written now)."""
    parts = raw.split(b"\n")
    lines: list[tuple[bytes, dict[str, Any] | None]] = []
    bad: list[tuple[int, str]] = []
    for number, line in enumerate(parts, 1):
        if not line.strip():
            continue
        event = _event_of(line)
        if isinstance(event, str):
            if number < len(parts):  # a whole line, not the unterminated tail
                bad.append((number, event))
            lines.append((line, None))
        else:
            lines.append((line, event))
    return lines, bad


def _skipped_lines(path: Path, bad: list[tuple[int, str]]) -> str:
    number, why = bad[0]
    return (f"{path}: skipped {len(bad)} line(s) that are not readable events (the first, line {number}: {why}; "
            "damaged, or written by something else)")


def read_metrics(out_dir: Path, log: Log | None = _stderr) -> list[dict[str, Any]]:
    """The events of ``out_dir/metrics.jsonl`` in order; lines that hold none (see :func:`_event_of`) are skipped,
    and ``log`` says once how many."""
    path = Path(out_dir) / METRICS
    lines, bad = _scan_metrics(path.read_bytes())
    if bad and log is not None:
        log(f"warning: {_skipped_lines(path, bad)}")
    return [event for _, event in lines if event is not None]


class Sink(Protocol):
    def write(self, event: dict[str, Any]) -> None: ...


class GuardedSink:
    """A sink that may fail (TensorBoard, W&B) without stopping the run: the first exception of ``open``, ``write``
    or ``close`` is reported through ``log`` in one line, and the sink is left out from then on.

    >>> lines = []
    >>> class Full:
    ...     def write(self, event):
    ...         raise OSError(28, "No space left on device")
    >>> sink = GuardedSink("tensorboard", Full, lines.append)
    >>> sink.write({"step": 3}); sink.write({"step": 4}); sink.close()
    >>> len(lines), lines[0][:81]
    (1, 'warning: --log-to tensorboard failed at step 3 (OSError: [Errno 28] No space left')
    """

    def __init__(self, name: str, open: Callable[[], Sink], log: Log | None) -> None:
        self.name = name
        self.log = log or _stderr
        self.sink: Sink | None = None
        self.sink = self._call("opening", open)

    def _call(self, where: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 (whatever a sink raises, training goes on)
            self.sink = None
            why = " ".join(f"{type(e).__name__}: {e}".split())  # one line
            self.log(f"warning: --log-to {self.name} failed {where} ({why}); it is off for the rest of this run "
                     "(metrics.jsonl has every event)")
            return None

    def write(self, event: dict[str, Any]) -> None:
        if self.sink is not None:
            self._call(f"at step {event.get('step')}", self.sink.write, event)

    def close(self) -> None:
        sink, self.sink = self.sink, None
        close = getattr(sink, "close", None)
        if close is not None:
            self._call("closing", close)


class Clock:
    """Training seconds, added to ``counters["elapsed"]``: :meth:`lap` counts the time since the last lap,
    :meth:`restart` drops it (time spent on evaluation, checkpoints and logging is not training time)."""

    def __init__(self, counters: dict[str, Any]) -> None:
        self.counters = counters
        self._last = time.perf_counter()

    def lap(self) -> None:
        now = time.perf_counter()
        self.counters["elapsed"] += now - self._last
        self._last = now

    def restart(self) -> None:
        self._last = time.perf_counter()


class Metrics:
    """The run's events and speed. ``counters`` is the run's own dict (read at every event); rank 0 writes."""

    def __init__(self, out_dir: Path, counters: dict[str, Any], *, main: bool, flops_per_token: float,
                 peak_tflops: float | None, log: Callable[[str], None] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.counters = counters
        self.main = main
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops
        self.log = log
        self.jsonl = MetricsLog(self.out_dir, enabled=main)
        self.sinks: list[Sink] = [self.jsonl]
        self.clock = Clock(counters)
        self._window = self._steady = (0, 0.0)
        self._warm_step: int | None = None
        self._steady_marked = False

    # -- events ---------------------------------------------------------------------------------
    def event(self, **fields: Any) -> dict[str, Any]:
        """Write one event (with the counters) to every sink; the event."""
        c = self.counters
        event = {"step": c["step"], **fields, "tokens": c["tokens"], "elapsed": round(c["elapsed"], 3),
                 "train_passes": c["train_passes"], "hessian_passes": c["hessian_passes"]}
        for sink in self.sinks:
            sink.write(event)
        return event

    def add_sink(self, name: str, open: Callable[[], Sink]) -> None:
        """One more sink, ``open()``-ed now and guarded (:class:`GuardedSink`): its failures never stop the run."""
        self.sinks.append(GuardedSink(name, open, self.log))

    def truncate_after(self, step: int) -> None:
        """A resumed run's log drops the events after its checkpoint's step."""
        self.jsonl.truncate_after(step, log=self.log)

    # -- speed ----------------------------------------------------------------------------------
    def speed(self, tokens: float, seconds: float) -> dict[str, float]:
        """Tokens per second and (when the device's peak is known) MFU."""
        if seconds <= 0 or tokens <= 0:
            return {}
        out = {"tokens_per_s": round(tokens / seconds, 1)}
        if self.peak_tflops:
            out["mfu"] = round(tokens / seconds * self.flops_per_token / (self.peak_tflops * 1e12), 4)
        return out

    def start_windows(self, start_step: int, max_steps: int, warm_up: int) -> None:
        """Speed windows from here; the steady one opens ``warm_up`` steps on (at most half the run left)."""
        self._warm_step = start_step + min(warm_up, max(1, (max_steps - start_step) // 2))
        self._window = (self.counters["tokens"], self.counters["elapsed"])
        self._steady_marked = False

    def step_done(self, step: int) -> None:
        if step == self._warm_step:
            self._steady = (self.counters["tokens"], self.counters["elapsed"])
            self._steady_marked = True

    def window_speed(self) -> dict[str, float]:
        """The speed since the last call (or the windows' start), and a new window from here."""
        tokens, elapsed = self.counters["tokens"], self.counters["elapsed"]
        out = self.speed(tokens - self._window[0], elapsed - self._window[1])
        self._window = (tokens, elapsed)
        return out

    def steady_speed(self) -> dict[str, float]:
        if not self._steady_marked:
            return {}
        return self.speed(self.counters["tokens"] - self._steady[0], self.counters["elapsed"] - self._steady[1])

    # -- the end --------------------------------------------------------------------------------
    def summary(self, base: dict[str, Any], *, record: bool = True) -> dict[str, Any]:
        """``base`` (the run's identity and diagnostics) with the counters, the final and best validation loss,
        the last attention statistics and the steady speed; recorded as a ``summary`` event if ``record``."""
        events = read_metrics(self.out_dir, log=self.log if self.main else None) \
            if (self.out_dir / METRICS).exists() else []
        evals = [e for e in events if e.get("event") == "eval"]
        c = self.counters
        out = {**{k: base[k] for k in ("out_dir", "optimizer", "preset")},
               "steps": c["step"], "tokens": c["tokens"], "elapsed": c["elapsed"],
               "train_passes": c["train_passes"], "hessian_passes": c["hessian_passes"],
               "skipped_steps": c.get("skipped_steps", 0),
               "final_val_loss": evals[-1]["val_loss"] if evals else None,
               "best_val_loss": min((e["val_loss"] for e in evals), default=None),
               **{k: evals[-1][k] for k in ("attn_max_logit", "attn_entropy") if evals and k in evals[-1]},
               **{k: v for k, v in base.items() if k not in ("out_dir", "optimizer", "preset")}}
        out.update({f"steady_{k}": v for k, v in self.steady_speed().items()})
        if record and self.main and events:
            summary = {"step": c["step"], "event": "summary", **{k: v for k, v in out.items() if k != "out_dir"}}
            for sink in self.sinks:
                sink.write(summary)
        return out

    def close(self) -> None:
        """Close every sink (the run is over, or stopped)."""
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                close()


class Progress:
    """The progress bar on stderr (rank 0, ``--progress``): steps, time left, and the latest training loss, lr,
    validation loss and tokens per second."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.bar = None
        self.val: float | None = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                            mininterval=1.0)

    def show(self, train_loss: float, lr: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {train_loss:.3f}, lr {lr:.2e}, val "
                                     f"{f'{self.val:.3f}' if self.val is not None else '-'}, "
                                     f"{tokens_per_s:,.0f} tok/s", refresh=False)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


__all__ = ["METRICS", "Clock", "GuardedSink", "Metrics", "MetricsLog", "Progress", "Sink", "read_metrics"]
