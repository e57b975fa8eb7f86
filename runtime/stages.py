"""Per-stage timings shown as work goes on: `with stages("export unet"): ...` prints a spinner, then the time,
and the process's peak RSS whenever the stage raised it (so a user sees which stage sets the memory needed)."""

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
        self.peak_bytes: dict[str, int] = {}  # stages that raised the process's peak RSS -> the peak after them

    @contextlib.contextmanager
    def __call__(self, label: str) -> Iterator[None]:
        from .memory import format_bytes, peak_rss_bytes

        t0 = time.perf_counter()
        peak0 = peak_rss_bytes()
        if self.quiet:
            yield
        else:
            with self.console.status(f"{label} …"):
                yield
        dt = time.perf_counter() - t0
        self.seconds[label] = self.seconds.get(label, 0.0) + dt
        peak = peak_rss_bytes()
        raised = peak > peak0 + (64 << 20)  # ignore small growth
        if raised:
            self.peak_bytes[label] = peak
        if not self.quiet:
            mem = f", peak RSS {format_bytes(peak)}" if raised else ""
            self.console.print(f"[green]✓[/green] {label} [dim]{dt:.1f} s{mem}[/dim]")
