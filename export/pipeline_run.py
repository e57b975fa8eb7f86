"""The state one export carries from stage to stage (export/build.py lists the stages in order).

A stage is a function `stage(run: ExportRun) -> None`: it reads what earlier stages left on `run`, does one
thing, and leaves its result on `run` for the later ones. A stage that does not apply to this export (no LoRAs,
no --decoder, an fp32 bundle) returns at once. Stages never call one another, and the modules they call
(onnx_export, quantize, gates, calibration, reference, bundle_writer) never import the stages.
"""

from __future__ import annotations

import contextlib
import gc
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdedge.runtime.manifest import AdapterInfo, ComponentInfo, ComponentParity, Manifest, PruneReport, ShapeRange
from sdedge.runtime.stages import Stages

from .options import ExportOptions

Stage = Callable[["ExportRun"], None]


@dataclass
class ExportRun:
    """One export in progress. Fields are filled by the stages named in the comments, in list order."""

    base: str | Path  # as given: a diffusers folder, a single file, a built-in name's folder, or an fp32 bundle (derive)
    out: Path
    opts: ExportOptions  # defaults resolved by the stages (guidance, scheduler) replace it
    stages: Stages
    prompt_match: Callable[[Path], tuple[float, int, int]] | None = None
    inputs: tuple = ()  # what the export reads: never inside the folder it replaces
    exits: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # staging folder, scratch folders
    # -- the PyTorch base (pipeline_base.py) ---------------------------------------------------------------------
    pruned: dict | None = None  # a pruned base's note (sdedge_pruned.json)
    parent: str | None = None  # its unpruned parent
    optimise: bool = False  # a reduced precision, pruning or a pruned base: gated against an fp32 truth
    reference: Any = None  # gates.Reference: the fp32 truth the precision and pruning gates compare with
    pipe: Any = None  # the diffusers pipeline (released before quantising)
    dec_pipe: Any = None  # the same with the --decoder in place of the base VAE
    dec_cfg: dict | None = None
    base_desc: dict | None = None
    adapters: tuple[AdapterInfo, ...] = ()
    shapes: ShapeRange | None = None
    parity_size: int = 0  # pixels of the square parity (and calibration) image
    latent_size: int = 0
    prune_report: PruneReport | None = None
    tmp: Path | None = None  # the staging folder: renamed to `out` when every stage has passed
    components: dict[str, ComponentInfo] = field(default_factory=dict)
    component_parity: dict[str, ComponentParity] = field(default_factory=dict)
    manifest: Manifest | None = None
    match_fp32: tuple | None = None  # (rate, prompts, seed) of the fp32 bundle
    # -- the reduced precision (pipeline_precision.py) -------------------------------------------------------------
    prompts: tuple[str, ...] = ()
    prompts_source: str = ""
    fp32_manifest: Manifest | None = None
    work: Path | None = None  # scratch: calibration data and the fp32 UNet (the speed baseline)
    calibration: Any = None  # calibration.CalibrationSet
    speed: list = field(default_factory=list)  # SpeedReport per timed backend
    parities: dict[str, tuple[float, float, int]] = field(default_factory=dict)  # backend -> (raw, guided, calls)
    best: Any = None  # the preferred backend's SpeedReport
    kept_fp32: list[str] = field(default_factory=list)  # UNet groups the sensitivity sweep kept in fp32
    image_psnr_db: float | None = None
    # A stage that made and gated the reduced precision itself sets this: the generic transform and gate stages
    # after it then do nothing (pipeline_precision.generic).
    precision_done: bool = False

    def scratch(self, folder: Path) -> Path:
        """`folder`, removed however the export ends."""
        self.exits.callback(shutil.rmtree, folder, ignore_errors=True)
        return folder


def run_stages(run: ExportRun, stages: tuple[Stage, ...]) -> Manifest:
    """Run `stages` in order on `run`; the staging folder and scratch folders close however it ends."""
    with run.exits:
        for stage in stages:
            stage(run)
    run.pipe = run.dec_pipe = None
    gc.collect()
    return run.manifest
