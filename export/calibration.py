"""Calibration data for static int8: the UNet's real inputs, collected from prompts across timesteps.

`collect(bundle_dir, prompts, out_dir)` runs the fp32 bundle with the sdedge runtime (ONNX Runtime, no
PyTorch in memory) and records every UNet call's inputs (sample, timestep, encoder_hidden_states: the guided
batch of 2, exactly what the engine sees at inference) as one `.npz` file per call in `out_dir`. Nothing is
held in memory beyond the call in flight: for the SD1.5 UNet at 256×256 one call is 0.5 MB on disk.

`CalibrationSet` reads them back lazily, one file at a time, in an order that mixes prompts and timesteps,
so quantisers that take the first N samples still see the whole range of timesteps.

A NaN or an infinity in an activation (recorded or read back) is an error naming the file and the input: a
quantiser would otherwise turn it into a scale of NaN and a silently broken bundle.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdedge.runtime.errors import BadInput, SdedgeError

log = logging.getLogger("sdedge.export")

# The built-in calibration prompts: varied subjects, styles and lengths, as users write them.
DEFAULT_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a red circle on a blue background",
    "a bowl of fruit on a wooden table, oil painting",
    "portrait of an old man with a beard, studio lighting, 85mm",
    "a futuristic city at night with neon lights, digital art",
    "a small cabin in a snowy forest, watercolor",
    "a green triangle and a yellow square",
    "close-up of a cat's face, highly detailed fur",
    "an aerial view of a river delta, satellite image",
    "a cup of coffee with latte art, shallow depth of field",
    "a medieval castle on a hill under a stormy sky",
    "a simple line drawing of a bicycle",
    "a bustling street market in the afternoon sun",
    "abstract geometric shapes in pastel colors",
    "a sailing boat on a calm lake at sunrise",
    "a robot reading a book in a library, cinematic",
)


def read_prompts(path: str | Path | None) -> tuple[tuple[str, ...], str]:
    """Prompts from a text file (one per line, blank lines and #-comments skipped), or the built-in set.

    Returns the prompts and a description for the manifest's provenance.
    """
    if path is None:
        return DEFAULT_PROMPTS, f"built-in ({len(DEFAULT_PROMPTS)} prompts)"
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"--calibration {path}: no such file (a text file with one prompt per line)")
    prompts = tuple(line.strip() for line in p.read_text(encoding="utf-8").splitlines()
                    if line.strip() and not line.strip().startswith("#"))
    if not prompts:
        raise BadInput(f"--calibration {path}: no prompts in the file (one per line)")
    return prompts, f"{p.name} ({len(prompts)} prompts)"


def check_finite(feeds: dict[str, np.ndarray], where: str) -> None:
    """SdedgeError naming the first floating-point input of `feeds` that holds a NaN or an infinity."""
    for name, value in feeds.items():
        a = np.asarray(value)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise SdedgeError(f"{where}: calibration activation {name!r} holds NaN or infinite values "
                              f"({int(np.size(a) - np.isfinite(a).sum())} of {a.size}); the fp32 bundle produced "
                              "them, so its weights or this prompt's inputs are broken")


class _Enough(Exception):
    """Raised by the recorder after the last call it needs: the rest of the run (and the VAE decode) is skipped."""


class _Recorder:
    """An engine wrapper that writes every call's feeds to disk, then runs the real engine."""

    def __init__(self, engine, out_dir: Path, prefix: str, keep_steps: set[int] | None):
        self.engine, self.out_dir, self.prefix, self.keep = engine, out_dir, prefix, keep_steps
        self.calls = 0
        self.last = -1  # the last call to record; after it, stop the run
        self.files: list[Path] = []

    @property
    def loaded(self) -> bool:
        return self.engine.loaded

    def load(self) -> None:
        self.engine.load()

    def unload(self) -> None:
        self.engine.unload()

    def infer(self, feeds):
        if self.keep is None or self.calls in self.keep:
            path = self.out_dir / f"{self.prefix}-{self.calls:03d}.npz"
            check_finite(feeds, f"UNet call {self.calls} of {self.prefix}")
            np.savez(path, **{k: np.asarray(v) for k, v in feeds.items()})
            self.files.append(path)
        if self.calls == self.last:
            raise _Enough  # the inputs are recorded; the output of this call is not needed
        self.calls += 1
        return self.engine.infer(feeds)


@dataclass
class CalibrationSet:
    files: list[Path]
    source: str = ""

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for path in self.files:
            with np.load(path, allow_pickle=False) as data:
                feeds = {k: data[k] for k in data.files}
            check_finite(feeds, str(path))
            yield feeds

    def subset(self, n: int) -> CalibrationSet:
        """n samples spread evenly over the set (which interleaves prompts and timesteps)."""
        if n >= len(self.files):
            return self
        idx = np.linspace(0, len(self.files) - 1, n).round().astype(int)
        return CalibrationSet([self.files[i] for i in idx], self.source)


def collect(bundle_dir: str | Path, prompts: tuple[str, ...], out_dir: str | Path, *, steps: int = 10,
            timesteps_per_prompt: int | None = None, guidance: float | None = None, size: int | None = None,
            scheduler: str = "ddim", seed: int = 1234, source: str = "") -> CalibrationSet:
    """Run the fp32 bundle on each prompt and record the UNet's inputs at (up to) `timesteps_per_prompt`
    steps spread over the schedule; returns the set, ordered step-major so any prefix covers all timesteps."""
    from sdedge.runtime.backends.select import choose_backend, engine_factory
    from sdedge.runtime.bundle import Bundle
    from sdedge.runtime.pipeline import Pipeline

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bundle = Bundle.open(bundle_dir)
    choice = choose_backend(bundle.manifest, "onnxruntime", "cpu")
    inner = engine_factory(choice, bundle.manifest, cache_dir=None)  # a scratch bundle: nothing to cache
    keep = None
    if timesteps_per_prompt is not None and timesteps_per_prompt < steps:
        keep = set(np.linspace(0, steps - 1, timesteps_per_prompt).round().astype(int).tolist())
    recorders: list[_Recorder] = []

    def factory(b, name, info):
        engine = inner(b, name, info)
        if name != "unet":
            return engine
        rec = _Recorder(engine, out, "unet", keep)
        recorders.append(rec)
        return rec

    pipe = Pipeline(bundle, device="cpu", engine_factory=factory)
    rec = recorders[0]
    by_prompt: list[list[Path]] = []
    for i, prompt in enumerate(prompts):
        rec.calls, rec.files, rec.prefix = 0, [], f"unet-p{i:03d}"
        rec.last = max(keep) if keep is not None else steps - 1
        try:
            pipe.generate(prompt, "", steps=steps, guidance=guidance, width=size, height=size, scheduler=scheduler,
                          seed=seed + i)
        except _Enough:
            pass
        by_prompt.append(list(rec.files))
    pipe.close()
    files = [f for step in range(max(map(len, by_prompt), default=0)) for fs in by_prompt if step < len(fs)
             for f in [fs[step]]]
    log.info("calibration: %d UNet inputs from %d prompts in %s", len(files), len(prompts), out)
    return CalibrationSet(files, source)
