"""The bench's report, assembled from the engines' runs: per-engine summaries and stage medians, time ratios and
image parity against the reference, CLIP and shape scores, the sample images (report.py writes the files)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from sdedge.runtime.errors import SdedgeError

from .engines import EngineProcess, GpuPoller
from .machine import load_average
from .metrics import clip_scores, psnr, ssim, summarize
from .report import STAGES
from .suite import Settings, Suite


def build_report(suite: Suite, engines: list[EngineProcess], s: Settings, size: int, machine: dict, created: str,
                  notes: list[str], poller: GpuPoller | None) -> dict:
    from . import report as report_mod

    ref = next((e for e in engines if e.role == "reference"), None)
    rows = [_engine_row(e, engines, ref, s, poller) for e in engines]
    machine = {**machine, "load_average_after": load_average()}
    load, cores = machine.get("load_average"), machine.get("logical_cores") or 1
    if load and load[0] > 0.75 * cores:
        notes = [*notes, (f"the machine was busy when the bench started (1-minute load average {load[0]:g} on "
                          f"{cores} logical cores): other work competes for the CPU, so times are inflated and noisy")]
    return {
        "format": report_mod.REPORT.format,
        "version": report_mod.REPORT.version,
        "created": created,
        "suite": {"name": suite.name, "file": suite.file, "description": suite.description},
        "machine": machine,
        "settings": {
            "runs": s.runs, "warmup": s.warmup, "steps": s.steps, "width": size, "height": size,
            "guidance": s.guidance, "scheduler": s.scheduler, "prompts": list(s.prompts), "negative": s.negative,
            "seed": s.seed, "batch": s.batch, "device": s.device, "interleave": s.interleave,
            "isolation": s.isolation,
        },
        "reference": ref.name if ref is not None else None,
        "target": _target(rows, s),
        "engines": rows,
        "clip": None,
        "notes": list(notes),
        "files": {},
    }


def _engine_row(e: EngineProcess, engines: list[EngineProcess], ref: EngineProcess | None, s: Settings,
                poller: GpuPoller | None) -> dict:
    """One engine's entry of the report: what it is, its runs, times, memory, and how it compares."""
    per_image = [r["seconds"] / s.batch for r in e.runs]
    seconds = summarize(per_image)
    stage_median = {k: float(np.median([r["stages"][k] for r in e.runs])) for k in STAGES}
    steps = [x for r in e.runs for x in r["step_seconds"]]
    gpu_bytes, gpu_method = (poller.peak_for(e.pid) if poller is not None else (None, None))
    if e.final.get("peak_gpu_allocated_bytes") is not None:
        gpu_bytes, gpu_method = e.final["peak_gpu_allocated_bytes"], "torch.cuda.max_memory_allocated"
    first = (e.warmups or e.runs)[0]["seconds"]
    entry = {
        "name": e.name,
        "role": e.role,
        "kind": {"reference": "diffusers", "peer": e.spec.get("kind")}.get(e.role, "sdedge"),
        "path": e.spec.get("base") or e.spec.get("bundle") or e.spec.get("model"),
        "backend": e.info.get("backend"),
        "backend_reason": e.info.get("backend_reason") or "",
        "precision": e.info.get("precision"),
        "device": e.spec.get("device"),
        "threads": e.spec.get("threads"),
        "memory_mode": e.spec.get("memory"),
        "signed": bool(e.info.get("signed")),
        "provenance": e.info.get("provenance"),
        "load": {
            "cold_start_seconds": e.cold_start_seconds,
            "import_seconds": e.info.get("import_seconds"),
            "load_seconds": e.info.get("load_seconds"),
            "components": e.info.get("component_load_seconds") or {},
            "first_image_seconds": first,
        },
        "warmup_seconds": [w["seconds"] for w in e.warmups],
        "runs": [{"index": i, "prompt_index": i % len(s.prompts), "seed": s.seed + i, "seconds": r["seconds"],
                  "stages": r["stages"], "step_seconds": r["step_seconds"]} for i, r in enumerate(e.runs)],
        "seconds_per_image": seconds,
        "images_per_minute": 60.0 / seconds["median"] if seconds["median"] > 0 else None,
        "stages_median_seconds": stage_median,
        "unet_step_seconds": summarize(steps),
        "memory": {
            "peak_rss_bytes": int(e.final.get("peak_rss_bytes") or max(r["peak_rss_bytes"] for r in e.runs)),
            "rss_scope": "own process" if e.proc is not None else "shared process (inline)",
            "peak_gpu_bytes": gpu_bytes,
            "gpu_method": gpu_method,
        },
        "speedup_vs_reference": None,
        "parity": None,
        "clip_score": None,
    }
    if e.spec.get("run"):  # its own steps / scheduler / guidance
        entry["run"] = dict(e.spec["run"])
    _compare(entry, e, engines, ref)
    return entry


def _compare(entry: dict, e: EngineProcess, engines: list[EngineProcess], ref: EngineProcess | None) -> None:
    """An engine's speed-up over the reference (run by run) and its image parity (PSNR, SSIM) against its truth."""
    # parity against a peer run with the same settings (a few-step bundle's), else the reference
    truth = next((x for x in engines if x.name == e.spec.get("parity_against")), ref)
    if ref is not None and e is not ref:
        pairs = [{"run": i, "reference_seconds": a["seconds"], "engine_seconds": b["seconds"],
                  "ratio": a["seconds"] / b["seconds"]} for i, (a, b) in enumerate(zip(ref.runs, e.runs))]
        entry["speedup_vs_reference"] = {"pairs": pairs, "median": float(np.median([p["ratio"] for p in pairs]))}
    if truth is not None and e is not truth:
        images = []
        for i, (a, b) in enumerate(zip(truth.images, e.images)):
            for j in range(a.shape[0]):
                images.append({"run": i, "image": j, "psnr_db": psnr(b[j], a[j]), "ssim": ssim(b[j], a[j])})
        entry["parity"] = {"against": truth.name, "images": images,
                           "psnr_db": summarize(x["psnr_db"] for x in images),
                           "ssim": summarize(x["ssim"] for x in images)}


def _target(rows: list[dict], s: Settings) -> dict | None:
    """The --target verdict: every sdedge engine's per-image statistic against the target seconds."""
    if s.target_seconds is None:
        return None
    per, verdict_ok = {}, True
    for row in rows:
        if row["role"] != "engine":  # the reference and the peers are what sdedge is held against
            continue
        value = row["seconds_per_image"][s.target_statistic]
        ok = value <= s.target_seconds
        verdict_ok &= ok
        per[row["name"]] = {"seconds": value, "pass": ok}
    lines = [f"{name}: {s.target_statistic} {v['seconds']:.3f} s per image "
             f"{'≤' if v['pass'] else '>'} target {s.target_seconds:g} s" for name, v in per.items()]
    verdict = "pass" if verdict_ok else "fail"
    return {"seconds": s.target_seconds, "statistic": s.target_statistic, "verdict": verdict,
            "engines": per, "statement": f"{verdict.upper()}: " + "; ".join(lines)}


def add_clip(report: dict, engines: list[EngineProcess], s: Settings, model: str, console) -> None:
    path = Path(model)
    if not (path / "config.json").is_file():
        msg = f"CLIP score skipped: no local CLIP model at {path}"
        console.print(msg, style="yellow", markup=False)
        report["clip"] = {"model": str(path), "skipped": msg}
        report["notes"].append(msg)
        return
    try:
        scores = clip_scores(path, {e.name: e.images for e in engines}, [s.prompts[i % len(s.prompts)]
                                                                         for i in range(s.runs)])
    except SdedgeError as exc:
        msg = f"CLIP score skipped: {exc}"
        console.print(msg, style="yellow", markup=False)
        report["clip"] = {"model": str(path), "skipped": msg}
        report["notes"].append(msg)
        return
    report["clip"] = {"model": str(path), "skipped": None}
    for row in report["engines"]:
        per = scores[row["name"]]
        row["clip_score"] = {"per_image": per, "mean": float(np.mean(per))}


def add_shape_scores(report: dict, engines: list[EngineProcess], s: Settings) -> None:
    """Prompt-match rate and KID from the shapes classifier, when every prompt is a shapes-world caption (the
    trained tiny base's domain); otherwise recorded as skipped."""
    prompts = [s.prompts[i % len(s.prompts)] for i in range(s.runs)]
    from sdedge.tinyworld.shapes import parse_caption

    # checked here, not only in score_engines: shape_score imports torch, which a bench of bundles alone needs not
    if any(parse_caption(p) is None for p in prompts):
        report["shapes"] = {"skipped": "the prompts are not all shapes-world captions ('a red circle on a blue "
                                       "background'), so the tiny base's classifier does not apply",
                            "real_images_per_image": 0}
        return
    from sdedge.tinyworld.classifier import score_engines

    scores = score_engines({e.name: e.images for e in engines}, prompts)
    report["shapes"] = {"skipped": None, "real_images_per_image": scores["real_images_per_image"]}
    for row in report["engines"]:
        row.update(scores["engines"][row["name"]])


def save_samples(report: dict, engines: list[EngineProcess], out: Path) -> dict[str, list[np.ndarray]]:
    """PNG of every timed image under out/samples/<engine>/; returns uint8 images per engine for the grid."""
    from PIL import Image

    grid: dict[str, list[np.ndarray]] = {}
    for e, row in zip(engines, report["engines"]):
        folder = out / "samples" / re.sub(r"[^A-Za-z0-9_.-]+", "_", e.name)
        folder.mkdir(parents=True, exist_ok=True)
        files, first = [], []
        for r, batch in enumerate(e.images):
            u8 = (np.clip(batch, 0, 1) * 255).round().astype(np.uint8)
            for j, img in enumerate(u8):
                name = f"run{r}.png" if u8.shape[0] == 1 else f"run{r}-{j}.png"
                Image.fromarray(img).save(folder / name)
                files.append(str((folder / name).relative_to(out)))
            first.append(u8[0])
        row["samples"] = files
        grid[e.name] = first
    return grid
