"""The bench report: report.json (`BenchReport`, format "sdedge-bench" version 2), report.md (tables), report.png
(stacked bars of seconds per image by stage, one bar per engine) and samples.png (the images, reference beside
engine).

The report is assembled as a dict (benchmarks/assemble.py); `validate(report)` checks it against the frozen
dataclasses below (runtime/documents.py: every key known, every type, enum and minimum right, the file and key
named), `load_report` reads a report.json of any version this sdedge reads (version 1: `schema_version` 1 and
`kind`), and `python -m sdedge.benchmarks.report --validate report.json` checks one. docs/bench.md describes
every field.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sdedge.runtime.documents import DocumentType, Legacy
from sdedge.runtime.errors import SdedgeError
from sdedge.runtime.files import atomic_write_text
from sdedge.runtime.grid import write_grid
from sdedge.runtime.strict import NonNegative

from .suite import PEER_KINDS

__all__ = [
    "REPORT",
    "SCHEMA_VERSION",
    "BenchReport",
    "ReportError",
    "chart_size",
    "grid_cell",
    "grid_size",
    "load_report",
    "markdown",
    "render_chart",
    "render_samples",
    "validate",
    "write_report",
]

SCHEMA_VERSION = 2  # version 1: the same fields under "schema_version": 1 and "kind": "sdedge-bench"
STAGES = ("tokenize", "text_encoder", "unet", "vae_decoder", "other")
STAGE_COLOURS = {"tokenize": (141, 160, 203), "text_encoder": (102, 194, 165), "unet": (252, 141, 98),
                 "vae_decoder": (231, 138, 195), "other": (190, 190, 190)}


class ReportError(SdedgeError):
    """A report that does not match the schema."""


# -- the document -------------------------------------------------------------------------------------------
Role = Literal["reference", "engine", "peer"]
Kind = Literal[("diffusers", "sdedge", *PEER_KINDS)]


@dataclass(frozen=True)
class Stats:
    n: NonNegative
    min: float
    median: float
    p95: float
    max: float
    mean: float


@dataclass(frozen=True)
class StageTimes:
    tokenize: float
    text_encoder: float
    unet: float
    vae_decoder: float
    other: float


@dataclass(frozen=True)
class LoadTimes:
    cold_start_seconds: float
    import_seconds: float
    load_seconds: float
    components: dict[str, float]
    first_image_seconds: float


@dataclass(frozen=True)
class Run:
    index: NonNegative
    prompt_index: NonNegative
    seed: NonNegative
    seconds: float
    stages: StageTimes
    step_seconds: tuple[float, ...]


@dataclass(frozen=True)
class Memory:
    peak_rss_bytes: NonNegative
    rss_scope: str
    peak_gpu_bytes: NonNegative | None
    gpu_method: str | None


@dataclass(frozen=True)
class Pair:
    run: NonNegative
    reference_seconds: float
    engine_seconds: float
    ratio: float


@dataclass(frozen=True)
class Speedup:
    pairs: tuple[Pair, ...]
    median: float


@dataclass(frozen=True)
class ImagePair:
    run: NonNegative
    image: NonNegative
    psnr_db: float
    ssim: float


@dataclass(frozen=True)
class EngineParity:
    against: str
    images: tuple[ImagePair, ...]
    psnr_db: Stats | None
    ssim: Stats | None


@dataclass(frozen=True)
class ClipScore:
    per_image: tuple[float, ...]
    mean: float


@dataclass(frozen=True)
class PromptMatchScore:
    rate: float
    per_image: tuple[float, ...]


@dataclass(frozen=True)
class Engine:
    name: str
    role: Role
    kind: Kind
    path: str
    backend: str
    backend_reason: str
    precision: str
    device: str
    threads: NonNegative
    memory_mode: str | None
    signed: bool
    provenance: dict[str, Any] | None
    load: LoadTimes
    warmup_seconds: tuple[float, ...]
    runs: tuple[Run, ...]
    seconds_per_image: Stats
    images_per_minute: float | None
    stages_median_seconds: StageTimes
    unet_step_seconds: Stats | None
    memory: Memory
    speedup_vs_reference: Speedup | None
    parity: EngineParity | None
    clip_score: ClipScore | None
    samples: tuple[str, ...]
    # optional (added within schema 1): the shapes classifier's figures, on the trained tiny base's prompts
    prompt_match: PromptMatchScore | None = None
    kid: float | None = None
    # optional: the steps / scheduler / guidance an engine ran instead of the settings' (a few-step bundle's)
    run: dict[str, Any] | None = None


@dataclass(frozen=True)
class Suite:
    name: str
    file: str | None
    description: str


@dataclass(frozen=True)
class Gpu:
    name: str
    driver: str
    memory_bytes: NonNegative


@dataclass(frozen=True)
class GitInfo:
    commit: str
    dirty: bool


@dataclass(frozen=True)
class Machine:
    cpu: str
    cpu_flags: tuple[str, ...]
    logical_cores: NonNegative | None
    physical_cores: NonNegative | None
    memory_bytes: NonNegative | None
    gpus: tuple[Gpu, ...]
    load_average: tuple[float, ...] | None
    load_average_after: tuple[float, ...] | None
    os: str
    python: str
    versions: dict[str, str]
    git: GitInfo | None


@dataclass(frozen=True)
class BenchSettings:
    runs: NonNegative
    warmup: NonNegative
    steps: NonNegative
    width: NonNegative
    height: NonNegative
    guidance: float
    scheduler: str
    prompts: tuple[str, ...]
    negative: str
    seed: NonNegative
    batch: NonNegative
    device: str
    interleave: bool
    isolation: Literal["process", "inline"]


@dataclass(frozen=True)
class EngineTarget:
    seconds: float
    passed: bool = field(metadata={"key": "pass"})


@dataclass(frozen=True)
class Target:
    seconds: float
    statistic: Literal["min", "median", "p95", "max"]
    verdict: Literal["pass", "fail"]
    engines: dict[str, EngineTarget]
    statement: str


@dataclass(frozen=True)
class ClipInfo:
    model: str | None
    skipped: str | None


@dataclass(frozen=True)
class ShapesInfo:
    skipped: str | None
    real_images_per_image: NonNegative


@dataclass(frozen=True)
class ReportFiles:
    report_json: str
    report_md: str
    report_png: str
    samples_png: str


@dataclass(frozen=True)
class BenchReport:
    """report.json: docs/bench.md describes every field. Times in seconds, memory in bytes, null where n/a."""

    created: str
    suite: Suite
    machine: Machine
    settings: BenchSettings
    reference: str | None
    target: Target | None
    engines: tuple[Engine, ...]
    clip: ClipInfo | None
    notes: tuple[str, ...]
    files: ReportFiles
    shapes: ShapesInfo | None = None  # optional (added within schema 1)


REPORT = DocumentType(BenchReport, "sdedge-bench", SCHEMA_VERSION, "report.json", ReportError,
                      legacy=Legacy("schema_version", {"kind": "sdedge-bench"}))


def validate(report: Any) -> None:
    """Raise ReportError naming the first key where `report` (a dict) departs from `BenchReport`."""
    REPORT.parse(report, "report")


def load_report(path: str | os.PathLike) -> dict:
    """Read and validate a report.json (any version this sdedge reads); the dict as written."""
    return REPORT.read_dict(path)


# -- markdown ------------------------------------------------------------------------------------------------
def _bytes(n: int | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def _s(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.3f}" if x < 10 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


def _load(values) -> str:
    return ", ".join(f"{v:g}" for v in values) if values else "unknown"


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(report: dict) -> str:
    lines = (_md_header(report) + _md_speed(report) + _md_stages_and_memory(report) + _md_parity(report)
             + _md_quality_and_notes(report))
    lines += ["", "![stages](report.png)", "", "![samples](samples.png)", ""]
    return "\n".join(lines)


def _md_header(report: dict) -> list[str]:
    """The title, the machine and method, and the target's verdict."""
    st, m = report["settings"], report["machine"]
    git = m.get("git") or {}
    gpus = ", ".join(g["name"] for g in m.get("gpus", [])) or "none"
    commit = (git.get("commit") or "unknown")[:12] + (" (uncommitted changes)" if git.get("dirty") else "")
    versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items())
    lines = [
        (f"# Benchmark `{report['suite']['name']}`: {st['width']}×{st['height']}, {st['steps']} steps {st['scheduler']}, "
         f"guidance {st['guidance']:g}"),
        "",
    ]
    if report["suite"].get("description"):
        lines += [report["suite"]["description"], ""]
    lines += [
        f"- date: {report['created']}",
        (f"- machine: {m['cpu']}, {m.get('logical_cores')} logical / {m.get('physical_cores')} physical cores, "
         f"{_bytes(m.get('memory_bytes'))} RAM; GPU: {gpus}; {m['os']}"),
        f"- CPU flags: {', '.join(m.get('cpu_flags') or []) or '—'}",
        f"- commit: {commit}",
        f"- load average (1, 5, 15 min) at start: {_load(m.get('load_average'))}; after: {_load(m.get('load_average_after'))}",
        f"- versions: {versions}, Python {m['python']}",
        f"- method: {st['warmup']} warm-up + {st['runs']} timed image(s) per engine, batch {st['batch']}; "
        + ("engines alternated run by run (ABBA), " if st["interleave"] else "engines one after the other, ")
        + ("each in its own process; " if st["isolation"] == "process" else "all in one process (peak RSS shared); ")
        + f"same prompts, seeds (from {st['seed']}) and initial latents for every engine",
        "",
    ]
    t = report.get("target")
    if t:
        lines += [f"**{'PASS' if t['verdict'] == 'pass' else 'FAIL'}** against the target of {t['seconds']:g} s per "
                  f"image ({t['statistic']}): " + "; ".join(
                      f"{name} {v['seconds']:.3f} s {'≤' if v['pass'] else '>'} {t['seconds']:g} s"
                      for name, v in t["engines"].items()), ""]
    else:
        lines += ["No target given (`--target-seconds`): no pass/fail verdict.", ""]
    return lines


def _md_speed(report: dict) -> list[str]:
    """## Speed: seconds per image and the speed-up over the reference, engine by engine."""
    ref = report.get("reference")
    lines = ["## Speed", "",
             ("| engine | backend | precision | median s/image | min | p95 | max | images/min | speed-up vs "
              f"{ref or 'reference'} (median; per run) |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for e in report["engines"]:
        sp = e["seconds_per_image"]
        su = e.get("speedup_vs_reference")
        if e["role"] == "reference":
            ratio = "reference"
        elif not su:
            ratio = "—"
        else:
            per_run = ", ".join(f"{p['ratio']:.2f}" for p in su["pairs"])
            ratio = f"{su['median']:.2f}× ({per_run})"
        ipm = f"{e['images_per_minute']:.1f}" if e.get("images_per_minute") else "—"
        label = e["name"] + (" (peer)" if e["role"] == "peer" else "")
        lines.append(f"| {_md_escape(label)} | {_md_escape(e['backend'])} | {e['precision']} | {_s(sp['median'])} | "
                     f"{_s(sp['min'])} | {_s(sp['p95'])} | {_s(sp['max'])} | {ipm} | {ratio} |")
    return lines


def _md_stages_and_memory(report: dict) -> list[str]:
    """## Stages (median seconds per call, cold start) and ## Memory."""
    lines = ["", "## Stages (median seconds per call) and cold start", "",
             ("| engine | tokenize | text encoder | UNet loop | per UNet step (median) | VAE decode | other | "
              "cold start | of which load | first image |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in report["engines"]:
        sm, ld = e["stages_median_seconds"], e["load"]
        step = e.get("unet_step_seconds") or {}
        lines.append(f"| {_md_escape(e['name'])} | {_s(sm['tokenize'])} | {_s(sm['text_encoder'])} | {_s(sm['unet'])} | "
                     f"{_s(step.get('median'))} | {_s(sm['vae_decoder'])} | {_s(sm['other'])} | "
                     f"{_s(ld['cold_start_seconds'])} | {_s(ld['load_seconds'])} | {_s(ld['first_image_seconds'])} |")
    lines += ["", "## Memory", "", "| engine | peak RSS | scope | peak GPU memory | how measured |", "|---|---|---|---|---|"]
    for e in report["engines"]:
        mem = e["memory"]
        lines.append(f"| {_md_escape(e['name'])} | {_bytes(mem['peak_rss_bytes'])} | {mem['rss_scope']} | "
                     f"{_bytes(mem['peak_gpu_bytes'])} | {mem['gpu_method'] or '—'} |")
    return lines


def _md_parity(report: dict) -> list[str]:
    """## Image parity against the reference: per engine, then per image."""
    st, ref = report["settings"], report.get("reference")
    lines = []
    if ref:
        lines += ["", f"## Image parity against {ref}, or the peer an engine names (same latents)", "",
                  "| engine | against | PSNR min (dB) | PSNR median | SSIM min | SSIM median | CLIP score (mean) |",
                  "|---|---|---|---|---|---|---|"]
        for e in report["engines"]:
            clip = f"{e['clip_score']['mean']:.2f}" if e.get("clip_score") else "—"
            p = e.get("parity")
            if p is None:
                lines.append(f"| {_md_escape(e['name'])} | reference | | | | | {clip} |")
                continue
            ps, ss = p["psnr_db"], p["ssim"]
            lines.append(f"| {_md_escape(e['name'])} | {_md_escape(p.get('against') or ref)} | {ps['min']:.1f} | "
                         f"{ps['median']:.1f} | {ss['min']:.4f} | "
                         f"{ss['median']:.4f} | {clip} |")
        lines += ["", "PSNR 999 means identical images. Per image:", "",
                  "| engine | run | image | prompt | seed | PSNR (dB) | SSIM |", "|---|---|---|---|---|---|---|"]
        for e in report["engines"]:
            for im in (e.get("parity") or {}).get("images", []):
                prompt = st["prompts"][im["run"] % len(st["prompts"])]
                lines.append(f"| {_md_escape(e['name'])} | {im['run']} | {im['image']} | {_md_escape(prompt)} | "
                             f"{st['seed'] + im['run']} | {im['psnr_db']:.1f} | {im['ssim']:.4f} |")
    return lines


def _md_quality_and_notes(report: dict) -> list[str]:
    """## Prompt match and KID (the tiny base's shapes classifier), CLIP's skip, ## Notes."""
    lines = []
    shapes = report.get("shapes")
    if shapes and not shapes.get("skipped"):
        lines += ["", "## Prompt match and KID (shapes classifier of the trained tiny base)", "",
                  "| engine | prompt-match rate | images | KID vs rendered scenes |", "|---|---|---|---|"]
        for e in report["engines"]:
            pm = e.get("prompt_match") or {}
            kid = "—" if e.get("kid") is None else f"{e['kid']:.4f}"
            lines.append(f"| {_md_escape(e['name'])} | {pm.get('rate', 0):.2f} | {len(pm.get('per_image', []))} | "
                         f"{kid} |")
        lines += ["", f"KID: unbiased MMD² (cubic kernel) on the classifier's 128 features against "
                      f"{shapes['real_images_per_image']} rendered scenes per image; lower is closer."]
    clip = report.get("clip")
    if clip and clip.get("skipped"):
        lines += ["", f"CLIP score: skipped ({clip['skipped']})."]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {_md_escape(n)}" for n in report["notes"]]
    return lines


# -- pictures ------------------------------------------------------------------------------------------------
CHART_W, CHART_LEFT, CHART_RIGHT, CHART_TOP, BAR_H, BAR_GAP, AXIS_H, LEGEND_H = 960, 210, 110, 64, 30, 16, 40, 40
GRID_LABEL_W, GRID_MAX_ROWS = 230, 8


def chart_size(n_engines: int) -> tuple[int, int]:
    """(width, height) of report.png for n engines."""
    return CHART_W, CHART_TOP + n_engines * (BAR_H + BAR_GAP) + AXIS_H + LEGEND_H


def grid_cell(image_size: int) -> int:
    """Side of one image cell in samples.png: the image's own size, kept between 128 and 256 px."""
    return max(128, min(256, image_size))


def _grid_layout(cell: int):
    from sdedge.runtime.grid import GridLayout

    return GridLayout(cell=cell, label_w=GRID_LABEL_W, header_lines=2, caption_lines=1, font_size=12, pad=8)


def grid_size(rows: int, cols: int, cell: int) -> tuple[int, int]:
    """(width, height) of samples.png for rows (runs, at most GRID_MAX_ROWS) × cols (engines)."""
    from sdedge.runtime.grid import grid_size as size

    return size(min(rows, GRID_MAX_ROWS), cols, _grid_layout(cell))


def _font(size: int):
    from sdedge.runtime.grid import font

    return font(size)


def _nice_step(span: float) -> float:
    raw = span / 6 if span > 0 else 1.0
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


def median_run(engine: dict, batch: int = 1) -> dict:
    """The timed run whose time per image is nearest the engine's median. report.png draws its stages, so that
    a bar's length is a real run's time and its parts add up to it."""
    med = engine["seconds_per_image"]["median"]
    return min(engine["runs"], key=lambda r: abs(r["seconds"] / batch - med))


def render_chart(report: dict):
    """Stacked horizontal bars: median seconds per image by stage, one bar per engine, target line if any."""
    from PIL import Image, ImageDraw

    engines = report["engines"]
    batch = report["settings"]["batch"]
    w, h = chart_size(len(engines))
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    f, fb = _font(13), _font(16)
    st = report["settings"]
    d.text((12, 10), f"{report['suite']['name']}: seconds per image by stage (the median run), {st['width']}x{st['height']}, "
                     f"{st['steps']} steps {st['scheduler']}", fill="black", font=fb)
    d.text((12, 34), f"{report['machine']['cpu']} · {report['created'][:10]}", fill=(90, 90, 90), font=f)
    stacks = [[run["stages"][k] / batch for k in STAGES] for run in (median_run(e, batch) for e in engines)]
    totals = [sum(stack) for stack in stacks]
    span = max([*totals, 1e-9])
    target = report.get("target")
    target_on_scale = bool(target) and target["seconds"] <= 3 * span
    if target_on_scale:
        span = max(span, target["seconds"])
    step = _nice_step(span)
    span = math.ceil(span / step) * step
    plot_w = w - CHART_LEFT - CHART_RIGHT
    def x_of(v: float) -> int:
        return CHART_LEFT + round(plot_w * v / span)

    axis_y = CHART_TOP + len(engines) * (BAR_H + BAR_GAP)
    tick = 0.0
    while tick <= span + 1e-12:
        x = x_of(tick)
        d.line([(x, CHART_TOP - 4), (x, axis_y)], fill=(228, 228, 228))
        d.text((x - 10, axis_y + 6), f"{tick:g}", fill="black", font=f)
        tick += step
    d.text((CHART_LEFT + plot_w // 2 - 30, axis_y + 22), "seconds", fill="black", font=f)
    for i, (e, stack, total) in enumerate(zip(engines, stacks, totals)):
        y = CHART_TOP + i * (BAR_H + BAR_GAP)
        label = e["name"] + (" (reference)" if e["role"] == "reference" else "")
        d.text((12, y + 2), label[:30], fill="black", font=f)
        d.text((12, y + 16), f"{e['backend']} {e['precision']}"[:32], fill=(100, 100, 100), font=_font(11))
        x = CHART_LEFT
        acc = 0.0
        for k, v in zip(STAGES, stack):
            acc += v
            x2 = x_of(acc)
            if x2 > x:
                d.rectangle([x, y, x2, y + BAR_H], fill=STAGE_COLOURS[k])
            x = x2
        d.text((x + 6, y + 8), f"{total:.3g} s", fill="black", font=f)
    d.line([(CHART_LEFT, CHART_TOP - 4), (CHART_LEFT, axis_y)], fill="black")
    d.line([(CHART_LEFT, axis_y), (w - CHART_RIGHT, axis_y)], fill="black")
    if target:
        colour = (0, 140, 0) if target["verdict"] == "pass" else (200, 0, 0)
        if target_on_scale:
            x = x_of(target["seconds"])
            for y0 in range(CHART_TOP - 8, axis_y, 8):
                d.line([(x, y0), (x, y0 + 4)], fill=colour, width=2)
            label = f"target {target['seconds']:g} s: {target['verdict'].upper()} (engines)"
            lw = int(d.textlength(label, font=f))
            d.text((x + 4 if x + 4 + lw < w - 4 else x - 4 - lw, CHART_TOP - 22), label, fill=colour, font=f)
        else:
            d.text((w - 330, 34), f"target {target['seconds']:g} s (off scale): {target['verdict'].upper()}",
                   fill=colour, font=f)
    lx, ly = CHART_LEFT, axis_y + AXIS_H + 6
    for k in STAGES:
        d.rectangle([lx, ly, lx + 14, ly + 14], fill=STAGE_COLOURS[k])
        d.text((lx + 20, ly), k, fill="black", font=f)
        lx += 20 + int(d.textlength(k, font=f)) + 24
    return img


def render_samples(report: dict, samples: dict):
    """The first image of each run (rows, at most GRID_MAX_ROWS, labelled with run, seed and prompt) for each
    engine (columns, reference first), with PSNR/SSIM against the reference under each engine image."""
    from sdedge.runtime.grid import labelled_grid

    engines = report["engines"]
    st = report["settings"]
    rows = min(st["runs"], GRID_MAX_ROWS)
    cols = [e["name"] + (" (reference)" if e["role"] == "reference" else "") for e in engines]
    cells, captions = [], []
    for r in range(rows):
        cells.append([samples.get(e["name"], [])[r] if r < len(samples.get(e["name"], [])) else None for e in engines])
        row_caps = []
        for e in engines:
            p = {im["run"]: im for im in (e.get("parity") or {}).get("images", []) if im["image"] == 0}.get(r)
            row_caps.append("reference" if e["role"] == "reference" else
                            f"{p['psnr_db']:.1f} dB · SSIM {p['ssim']:.3f}" if p else "")
        captions.append(row_caps)
    labels = [f"run {r} · seed {st['seed'] + r}\n{st['prompts'][r % len(st['prompts'])]}" for r in range(rows)]
    return labelled_grid(cells, labels, cols, _grid_layout(grid_cell(st["width"])), captions)


# -- writing -------------------------------------------------------------------------------------------------
def write_report(report: dict, out_dir: str | os.PathLike, samples: dict) -> dict:
    """Write report.json, report.md, report.png and samples.png into out_dir (report.json last, validated)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report["files"] = {"report_json": "report.json", "report_md": "report.md", "report_png": "report.png",
                       "samples_png": "samples.png"}
    validate(report)  # before anything is written
    write_grid(render_chart(report), out / "report.png")  # the one atomic PNG writer, as every file here
    write_grid(render_samples(report, samples), out / "samples.png")
    atomic_write_text(out / "report.md", markdown(report))
    REPORT.write(out / "report.json", report)
    return report


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--validate":
        load_report(sys.argv[2])
        print(f"{sys.argv[2]}: valid (an sdedge-bench report this sdedge reads)")
    else:
        print("usage: python -m sdedge.benchmarks.report --validate report.json", file=sys.stderr)
        raise SystemExit(2)
