"""Live monitoring a person can watch, and records a program can read.

- a rich progress bar (step, loss, tok/s, ETA) on a terminal, plain log lines otherwise;
- `metrics.jsonl`: one JSON object per logged event, appended and flushed as it happens;
- TensorBoard event files under `RUN_DIR/tb`;
- at the end, `training_curves.png`: loss and learning rate against step.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from truthgpt.io.atomic import write_file_atomically
from truthgpt.io.files import METRICS_LIMIT, named, not_regular_reason

MAX_ROW = 2**20  # bytes; a row is a few hundred


def keep_rows_up_to(path: Path, step: int) -> None:
    """Keep the rows of `metrics.jsonl` logged at or before `step`, the checkpoint a run
    resumes from: the rows a run logged after its last checkpoint are logged again when it
    resumes, so the file ends as an uninterrupted run's. A torn last line (a crash in the
    middle of a write) goes too. Read a line at a time (a line longer than any row is no
    row), up to METRICS_LIMIT bytes, rewritten atomically, and only when something changes."""
    reason = "is a symbolic link" if path.is_symlink() else not_regular_reason(path)
    if reason is not None:
        raise ValueError(f"{path}: {reason}; a run's metrics.jsonl is a file it wrote")
    kept, dropped = [], False
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size  # a million rows take ~300 MB: bound the read
        if size > METRICS_LIMIT:
            raise ValueError(
                f"{path}: {size:,} bytes, more than a run's metrics.jsonl may hold "
                f"({METRICS_LIMIT:,}); move it aside to resume"
            )
        while line := f.readline(MAX_ROW):
            row_step = _row_step(line)
            if row_step is not None and row_step <= step:
                kept.append(line)
            else:
                dropped = True
    if dropped:
        write_file_atomically(path, b"".join(kept))


def _row_step(line: bytes) -> float | None:
    """The step a metrics row was logged at; None for a line that is not a whole row."""
    if not line.endswith(b"\n"):
        return None
    try:
        row = json.loads(line)
    except ValueError:
        return None
    step = row.get("step") if isinstance(row, dict) else None
    return step if isinstance(step, int | float) and not isinstance(step, bool) else None


class Monitor:
    """Receives metrics from the training loop and shows/records them.

    `enabled=False` (non-zero ranks in distributed runs) turns every method into a no-op.
    """

    def __init__(
        self,
        run_dir: str | Path | None,
        total_steps: int,
        *,
        start_step: int = 0,
        enabled: bool = True,
        tensorboard: bool = True,
        stream: TextIO | None = None,
        log_interval: int = 10,
    ) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.log_interval = log_interval
        self.stream = stream if stream is not None else sys.stdout
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.train_rows: list[dict[str, float]] = []
        self.eval_rows: list[dict[str, float]] = []
        self._jsonl: TextIO | None = None
        self._tb: Any = None
        self._progress: Any = None
        self._task: Any = None
        self._start_time = time.perf_counter()
        self._start_step = start_step
        if not enabled:
            return
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            metrics = self.run_dir / "metrics.jsonl"
            if os.path.lexists(metrics):
                keep_rows_up_to(metrics, start_step)
            # The run's files are written atomically (io.atomic) but for its two logs:
            # metrics.jsonl is appended to, a row at a time, and a torn last row is dropped
            # when the run resumes (keep_rows_up_to, which rewrites it atomically); tb/ is
            # TensorBoard's own append-only event files.
            self._jsonl = open(metrics, "a", encoding="utf-8")  # noqa: SIM115
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                # Events past the checkpoint a resume starts from are dropped, as in
                # metrics.jsonl: they are logged again.
                self._tb = SummaryWriter(
                    log_dir=str(self.run_dir / "tb"), purge_step=start_step + 1
                )
        if self.stream.isatty():
            self._start_progress(start_step)

    # ------------------------------------------------------------------ display

    def _start_progress(self, start_step: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(file=self.stream),
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(
            "train", total=self.total_steps, completed=start_step, loss="-", tps="-"
        )

    def print(self, message: str) -> None:
        """A line of text that does not break the progress bar."""
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=self.stream, flush=True)

    # ------------------------------------------------------------------ events

    def log_train(self, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        step = int(metrics["step"])
        self.train_rows.append(metrics)
        self._write({"event": "train", **metrics})
        if self._tb is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_mb"):
                value = metrics.get(key)
                if value is not None and math.isfinite(value):
                    self._tb.add_scalar(f"train/{key}", value, step)
        if self._progress is not None:
            self._progress.update(
                self._task,
                completed=step,
                loss=f"{metrics['loss']:.4f}",
                tps=f"{metrics['tokens_per_s']:,.0f}",
            )
        elif step % self.log_interval == 0 or step == self.total_steps or metrics.get("skipped"):
            self.print(self._plain_line(metrics))

    def _plain_line(self, m: dict[str, float]) -> str:
        done = int(m["step"]) - self._start_step
        elapsed = time.perf_counter() - self._start_time
        remaining = (self.total_steps - int(m["step"])) * elapsed / max(1, done)
        skipped = "  SKIPPED (non-finite)" if m.get("skipped") else ""
        return (
            f"step {int(m['step']):>6}/{self.total_steps}  loss {m['loss']:.4f}  "
            f"lr {m['lr']:.2e}  {m['tokens_per_s']:,.0f} tok/s  mfu {m['mfu']:.1%}  "
            f"mem {m['memory_mb']:,.0f} MB  eta {_format_seconds(remaining)}{skipped}"
        )

    def log_eval(self, step: int, metrics: dict[str, float], split: str = "val") -> None:
        if not self.enabled:
            return
        row = {"step": float(step), **metrics}
        self.eval_rows.append(row)
        self._write({"event": f"eval_{split}", **row})
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    self._tb.add_scalar(f"{split}/{key}", value, step)
        extra = f"  {metrics['bits_per_char']:.3f} bits/char" if "bits_per_char" in metrics else ""
        self.print(f"eval  step {step:>6}  {split} loss {metrics['loss']:.4f}{extra}")

    def log_event(self, event: str, **fields: Any) -> None:
        """Anything else worth recording (checkpoints, skipped steps, config)."""
        if not self.enabled:
            return
        self._write({"event": event, **fields})

    def _write(self, row: dict[str, Any]) -> None:
        if self._jsonl is not None:
            try:
                self._jsonl.write(json.dumps(row, default=_json_default) + "\n")
                self._jsonl.flush()
            except OSError as err:  # a write() names no file
                raise named(err, self._jsonl.name)  # noqa: B904

    def close(self) -> None:
        """Stop the bar, flush files and draw the training curves."""
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self.run_dir is not None and self.train_rows:
            plot_training_curves(
                self.train_rows, self.eval_rows, self.run_dir / "training_curves.png"
            )

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plot_training_curves(
    train_rows: list[dict[str, float]], eval_rows: list[dict[str, float]], path: Path
) -> Path:
    """Loss (train and val) and learning rate against step, as a PNG."""
    from matplotlib.figure import Figure  # a Figure of its own: no pyplot, no global backend

    rows = [r for r in train_rows if math.isfinite(r["loss"])]
    fig = Figure(figsize=(8, 6))
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax_loss.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.8, label="train")
    if eval_rows:
        ax_loss.plot(
            [r["step"] for r in eval_rows], [r["loss"] for r in eval_rows], "o-", label="val"
        )
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot([r["step"] for r in train_rows], [r["lr"] for r in train_rows], color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    return write_file_atomically(path, image.getvalue())  # a kill leaves the previous plot


def _format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)
