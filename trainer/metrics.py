"""What a training run reports as it goes: `metrics.jsonl`, TensorBoard logs, and a progress bar.

`MetricsLog` appends one JSON line per logged optimizer step to OUT/metrics.jsonl (and scalars to OUT/logs when
tensorboard is installed). On resume it first drops the lines after the checkpoint's step, so the file holds
exactly one curve. `Progress` is a rich progress bar with the loss, steps per second and the time left.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from sdedge.runtime.files import atomic_write_text

__all__ = ["MetricsLog", "Progress", "read_metrics"]

log = logging.getLogger("sdedge.trainer")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            break
    return rows


class MetricsLog:
    def __init__(self, out: Path, start_step: int, tensorboard: bool, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(out) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step] if start_step else []
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(out) / "logs"), purge_step=start_step + 1 if start_step else None)
            except ImportError:
                log.info("tensorboard is not installed: no TensorBoard logs (metrics.jsonl is written)")

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(f"train/{k}", v, step)

    def image(self, tag: str, image, step: int) -> None:
        if self.enabled and self.writer is not None:
            import numpy as np

            self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.writer is not None:
            self.writer.close()


class Progress:
    """A rich progress bar (steps, loss, it/s, ETA) on the main process; nothing elsewhere."""

    def __init__(self, total: int, start: int, enabled: bool, console=None):
        self.enabled = enabled
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            ProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress
        from rich.text import Text

        class Speed(ProgressColumn):
            def render(self, task):
                return Text(f"{task.speed:.2f} it/s" if task.speed else "– it/s")

        self._progress = RichProgress(
            TextColumn("[bold]train[/bold]"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), Speed(), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), console=console or Console(stderr=True), transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=total, completed=start, loss="–")

    def update(self, step: int, loss: float) -> None:
        if self.enabled:
            self._progress.update(self._task, completed=step, loss=f"{loss:.4f}")

    def close(self) -> None:
        if self.enabled:
            self._progress.stop()
