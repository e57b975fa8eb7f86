"""Per-stage timings shown as work goes on: `with stages("export unet"): ...` prints a spinner, then the time."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from rich.console import Console


class Stages:
    def __init__(self, console: Console | None = None, quiet: bool = False):
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, label: str) -> Iterator[None]:
        t0 = time.perf_counter()
        if self.quiet:
            yield
        else:
            with self.console.status(f"{label} …"):
                yield
        dt = time.perf_counter() - t0
        self.seconds[label] = self.seconds.get(label, 0.0) + dt
        if not self.quiet:
            self.console.print(f"[green]✓[/green] {label} [dim]{dt:.1f} s[/dim]")
