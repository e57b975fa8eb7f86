"""Benchmark suites: YAML files that name what to measure, with what settings, against which reference.

    name: cpu-tiny
    description: the built-in tiny model, seconds; CI's smoke test
    prepare:                                  # run by `sdedge bench --suite ... --build` for missing outputs
      - builtin: tiny                         # write a built-in base (sdedge base tiny)
        out: "{work}/tiny-base"
      - export: "{work}/tiny-base"            # export a base to a bundle (sdedge export)
        out: "{work}/bundle-fp32"
        options: {parity_steps: 4}            # sdedge.export.build.ExportOptions fields
    settings: {runs: 3, warmup: 1, steps: 10, size: 64, target_seconds: 5}
    reference: {name: diffusers, base: "{work}/tiny-base"}
    engines:
      - {name: sdedge-fp32, bundle: "{work}/bundle-fp32"}
    peers:                                    # other tools' pipelines, each in its own virtual environment
      - {name: optimum-ort, kind: optimum-onnxruntime, model: "{work}/optimum-onnx", python: "{work}/venv/bin/python"}

Every key is checked (`sdedge.runtime.strict.from_dict` on frozen dataclasses): a typo is an error naming the
file and the key, never a silently ignored setting. Paths: `{work}` is the work folder (`--work DIR`,
default `$XDG_CACHE_HOME/sdedge/bench/<suite name>`), `{suite}` the suite file's folder; other relative paths
are resolved against the suite file's folder; `--path NAME=PATH` replaces the path of the engine (or
reference) called NAME. A bundle or base that is missing when the bench starts is an error naming the suite
entry, the path, and how to build it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdedge.runtime.errors import SdedgeError
from sdedge.runtime.strict import ConfigError, from_dict

from .fast_inputs import RANDOM_KINDS

__all__ = [
    "BenchError",
    "DEFAULT_PROMPTS",
    "EngineSpec",
    "PEER_KINDS",
    "PeerSpec",
    "PrepareStep",
    "ReferenceSpec",
    "Settings",
    "Suite",
    "SuiteError",
    "check_inputs",
    "default_work_dir",
    "load_suite",
    "resolve_suite",
    "run_prepare",
    "validate_suite",
]

DEFAULT_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a red circle on a blue background",
    "a watercolour painting of a lighthouse at dawn",
)
DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("fp32", "fp16", "bf16")
MEMORY_MODES = ("normal", "low")
STATISTICS = ("min", "median", "p95", "max")
ISOLATIONS = ("process", "inline")
VERIFY = ("required", "if-signed", "off")
# Peers: the pipelines users would pick instead of sdedge, run by benchmarks/peers.py in their own venvs ("diffusers":
# diffusers' eager pipeline in sdedge's own, e.g. with an LCM-LoRA and a light decoder at few steps).
PEER_KINDS = ("optimum-onnxruntime", "optimum-openvino", "diffusers")
RUN_KEYS = ("steps", "scheduler", "guidance", "warmup")  # what an engine, peer or the reference may set for itself


class BenchError(SdedgeError):
    """A benchmark that cannot run or whose worker failed; the message names the engine and the cause."""


class SuiteError(SdedgeError):
    """A suite file that cannot be used: unknown key, bad value, missing bundle or base."""


@dataclass(frozen=True)
class Settings:
    """What every engine runs: the same prompts, seeds, initial latents, steps and size."""

    runs: int = 3  # timed images per engine
    warmup: int = 1  # untimed images per engine first
    steps: int = 20
    size: int | None = None  # square, in pixels; default: the (first) bundle's default size
    guidance: float = 7.5
    scheduler: str = "dpm++2m"
    prompts: tuple[str, ...] = DEFAULT_PROMPTS  # run r uses prompts[r % len(prompts)] and seed + r
    negative: str = ""
    seed: int = 0
    batch: int = 1  # images per call
    threads: int | None = None  # default: os.cpu_count(), for every engine alike
    device: str = "cpu"
    target_seconds: float | None = None  # per image
    target_statistic: str = "median"  # the statistic held against the target
    interleave: bool = True  # all workers alive, runs alternated; False: one engine after the other
    isolation: str = "process"  # "process": a child process per engine (its own peak RSS); "inline": this one


@dataclass(frozen=True)
class ReferenceSpec:
    """diffusers' eager StableDiffusionPipeline on a base (the truth for parity, the baseline for speed)."""

    base: str  # a local diffusers folder
    name: str = "diffusers"
    dtype: str = "fp32"
    device: str | None = None  # default: settings.device
    threads: int | None = None  # default: settings.threads
    loras: tuple[tuple[str, float], ...] = ()  # (adapter .safetensors, scale): fused into the UNet at load
    decoder: str | None = None  # a diffusers AutoencoderTiny folder in place of the base VAE's decoder
    steps: int | None = None  # default: settings.steps (likewise scheduler, guidance, warmup)
    scheduler: str | None = None
    guidance: float | None = None
    warmup: int | None = None


@dataclass(frozen=True)
class EngineSpec:
    """An sdedge bundle run by the PyTorch-free runtime."""

    name: str
    bundle: str
    backend: str = "auto"  # auto | onnxruntime | openvino (sdedge.runtime.backends.select)
    memory: str = "normal"  # normal | low
    device: str | None = None  # default: settings.device
    threads: int | None = None  # default: settings.threads
    verify: str = "if-signed"  # a public_key or identity given makes it "required" (runtime/signing.py)
    public_key: str | None = None  # PEM public key the bundle must be signed with
    identity: str | None = None  # or a Sigstore identity and its OIDC issuer
    issuer: str | None = None
    build_hint: str | None = None  # how to make the bundle when it is missing (shown in the error)
    steps: int | None = None  # default: settings.steps (likewise scheduler, guidance): a few-step bundle's own
    scheduler: str | None = None
    guidance: float | None = None
    warmup: int | None = None  # default: settings.warmup (an engine that compiles at first use: 1)
    parity_against: str | None = None  # a peer run with this engine's settings; default: the reference


@dataclass(frozen=True)
class PeerSpec:
    """Another tool's pipeline on the same weights (optimum's ONNX Runtime or OpenVINO Stable Diffusion
    pipeline), run by `python -m sdedge.benchmarks.worker_process` under that tool's own interpreter: its pins
    conflict with sdedge's, so it lives in a virtual environment of its own (benchmarks/peer-envs/README.md)."""

    name: str
    kind: str  # one of PEER_KINDS
    model: str  # the peer's own exported folder (optimum-cli export onnx|openvino --model BASE ...); diffusers: a base
    python: str | None = None  # the peer venv's interpreter (sdedge installed there with --no-deps); None: this one
    threads: int | None = None  # default: settings.threads
    static_shapes: bool = True  # openvino: reshape to the bench's size and batch before compiling (its docs' advice)
    build_hint: str | None = None  # how to make the model or the venv when missing (shown in the error)
    loras: tuple[tuple[str, float], ...] = ()  # diffusers: fused into the UNet at load
    decoder: str | None = None  # diffusers: an AutoencoderTiny folder in place of the base VAE's decoder
    steps: int | None = None  # default: settings.steps (likewise scheduler, guidance, warmup)
    scheduler: str | None = None
    guidance: float | None = None
    warmup: int | None = None
    parity_against: str | None = None  # another peer run with this peer's settings (a few-step one's); default: the reference


@dataclass(frozen=True)
class PrepareStep:
    """One step that makes an input of the suite: a built-in base, or a bundle exported from a base."""

    out: str
    builtin: str | None = None  # "tiny" | "sd15-arch": sdedge base NAME --out OUT
    export: str | None = None  # a base path: sdedge export --base EXPORT --out OUT
    random: str | None = None  # "lcm-lora" (of the base `base`) | "tiny-decoder": benchmarks/fast_inputs.py
    base: str | None = None  # for random: the base the LoRA adapts (needed) / the decoder decodes (default SD1.5's)
    seed: int = 0  # for builtin and random
    options: dict[str, Any] = field(default_factory=dict)  # ExportOptions fields, for export


@dataclass(frozen=True)
class Suite:
    name: str
    description: str = ""
    settings: Settings = field(default_factory=Settings)
    reference: ReferenceSpec | None = None
    engines: tuple[EngineSpec, ...] = ()
    peers: tuple[PeerSpec, ...] = ()
    prepare: tuple[PrepareStep, ...] = ()
    clip_model: str | None = None  # a local CLIP model folder; skipped with a note when absent
    file: str | None = field(default=None, compare=False)  # where it was read from (not a YAML key)


# -- reading -------------------------------------------------------------------------------------------------
def load_suite(path: str | os.PathLike) -> Suite:
    """Parse and validate a suite file (paths not resolved yet: see `resolve_suite`)."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"suite file not found: {path}")
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml is in the export extra
        from sdedge.runtime.errors import MissingDependency

        raise MissingDependency("reading a suite needs pyyaml: pip install 'sdedge[export]'") from None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SuiteError(f"{path}: not a readable YAML file ({exc})") from None
    if not isinstance(data, dict):
        raise SuiteError(f"{path}: a suite is a YAML mapping with name, settings, reference, engines")
    if "file" in data:
        raise SuiteError(f"{path}: unknown key 'file'")
    try:
        suite = from_dict(Suite, data, str(path))
    except ConfigError as exc:
        raise SuiteError(str(exc)) from None
    suite = dataclasses.replace(suite, file=str(path))
    validate_suite(suite)
    return suite


def validate_suite(suite: Suite) -> None:
    """Values that types alone do not catch, each error naming the suite entry."""
    where = suite.file or suite.name
    s = suite.settings
    checks = [
        (s.runs >= 1, "settings.runs must be at least 1"),
        (s.warmup >= 0, "settings.warmup must be 0 or more"),
        (1 <= s.steps <= 1000, "settings.steps must be from 1 to 1000"),
        (s.size is None or s.size >= 8, "settings.size must be a pixel size (8 or more)"),
        (s.batch >= 1, "settings.batch must be at least 1"),
        (s.threads is None or s.threads >= 1, "settings.threads must be at least 1"),
        (bool(s.prompts), "settings.prompts must name at least one prompt"),
        (s.device in DEVICES, f"settings.device {s.device!r}: choose one of {', '.join(DEVICES)}"),
        (s.target_seconds is None or s.target_seconds > 0, "settings.target_seconds must be positive"),
        (s.target_statistic in STATISTICS,
         f"settings.target_statistic {s.target_statistic!r}: choose one of {', '.join(STATISTICS)}"),
        (s.isolation in ISOLATIONS, f"settings.isolation {s.isolation!r}: choose one of {', '.join(ISOLATIONS)}"),
        (bool(suite.engines), "engines: name at least one bundle to measure"),
    ]
    if suite.reference is not None:
        r = suite.reference
        checks += [
            (r.dtype in DTYPES, f"reference.dtype {r.dtype!r}: choose one of {', '.join(DTYPES)}"),
            (r.device is None or r.device in DEVICES, f"reference.device {r.device!r}: choose one of {', '.join(DEVICES)}"),
        ]
    names = ([e.name for e in suite.engines] + [p.name for p in suite.peers]
             + ([suite.reference.name] if suite.reference else []))
    for i, e in enumerate(suite.engines):
        entry = f"engines[{i}] {e.name!r}"
        checks += [
            (bool(e.name.strip()), f"engines[{i}]: name must not be empty"),
            (e.memory in MEMORY_MODES, f"{entry}: memory {e.memory!r}: choose one of {', '.join(MEMORY_MODES)}"),
            (e.device is None or e.device in DEVICES, f"{entry}: device {e.device!r}: choose one of {', '.join(DEVICES)}"),
            (e.verify in VERIFY, f"{entry}: verify {e.verify!r}: choose one of {', '.join(VERIFY)}"),
            (names.count(e.name) == 1, f"{entry}: the name is used twice (engine and reference names must differ)"),
        ]
    for entry, spec in run_overrides(suite):
        checks += [(spec.steps is None or 1 <= spec.steps <= 1000, f"{entry}: steps must be from 1 to 1000"),
                    (spec.guidance is None or spec.guidance >= 0, f"{entry}: guidance must be 0 or more"),
                    (spec.warmup is None or spec.warmup >= 0, f"{entry}: warmup must be 0 or more")]
    peers = {p.name for p in suite.peers}
    for entry, spec in [(f"engines[{i}] {e.name!r}", e) for i, e in enumerate(suite.engines)] + \
            [(f"peers[{i}] {p.name!r}", p) for i, p in enumerate(suite.peers)]:
        checks.append((spec.parity_against is None or spec.parity_against in peers - {spec.name},
                       f"{entry}: parity_against {spec.parity_against!r} is not another peer of the suite"))
    for i, p in enumerate(suite.peers):
        entry = f"peers[{i}] {p.name!r}"
        checks += [
            (p.python is not None or p.kind == "diffusers",
             f"{entry}: python: the interpreter of the peer's own venv (benchmarks/peer-envs/README.md)"),
            (not (p.loras or p.decoder) or p.kind == "diffusers",
             f"{entry}: loras and decoder apply to a diffusers peer (an optimum peer takes them at its own export)"),
            (bool(p.name.strip()), f"peers[{i}]: name must not be empty"),
            (p.kind in PEER_KINDS, f"{entry}: kind {p.kind!r}: choose one of {', '.join(PEER_KINDS)}"),
            (p.threads is None or p.threads >= 1, f"{entry}: threads must be at least 1"),
            (names.count(p.name) == 1, f"{entry}: the name is used twice (engine, peer and reference names must differ)"),
            (s.isolation == "process" and s.device == "cpu",
             f"{entry}: peers run on the CPU in a process of their own venv (settings.isolation: process, device: cpu)"),
        ]
    for i, p in enumerate(suite.prepare):
        checks.append((sum(x is not None for x in (p.builtin, p.export, p.random)) == 1,
                       f"prepare[{i}]: give exactly one of 'builtin' (a built-in base), 'export' (a base to export) or "
                       "'random' (an input of benchmarks/fast_inputs.py)"))
        checks.append((p.random is None or p.random in RANDOM_KINDS,
                       f"prepare[{i}]: random {p.random!r}: choose one of {', '.join(RANDOM_KINDS)}"))
        checks.append((p.random != "lcm-lora" or p.base is not None, f"prepare[{i}]: random lcm-lora needs 'base'"))
    for ok, message in checks:
        if not ok:
            raise SuiteError(f"{where}: {message}")


def run_overrides(suite: Suite) -> list[tuple[str, Any]]:
    """(entry name, spec) of everything that may override RUN_KEYS: the reference, engines and peers."""
    out = [("reference", suite.reference)] if suite.reference is not None else []
    out += [(f"engines[{i}] {e.name!r}", e) for i, e in enumerate(suite.engines)]
    return out + [(f"peers[{i}] {p.name!r}", p) for i, p in enumerate(suite.peers)]


def run_settings(spec) -> dict:
    """The RUN_KEYS a spec sets (the worker's settings are the suite's with these replaced)."""
    return {k: getattr(spec, k) for k in RUN_KEYS if getattr(spec, k, None) is not None}


# -- paths ---------------------------------------------------------------------------------------------------
def default_work_dir(suite_name: str) -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "sdedge" / "bench" / suite_name


def _resolve(value: str | None, suite_dir: Path, work: Path) -> str | None:
    if value is None:
        return None
    text = value.replace("{work}", str(work)).replace("{suite}", str(suite_dir))
    p = Path(os.path.expanduser(text))
    # normalised, symlinks kept as named (a venv's python is a symlink: only its own path finds the venv)
    return os.path.abspath(p if p.is_absolute() else suite_dir / p)


def _resolve_options(options: dict, suite_dir: Path, work: Path) -> dict:
    """An export step's paths (its LoRAs, decoder, calibration prompts) resolved like every other path."""
    out = dict(options)
    if isinstance(out.get("loras"), (list, tuple)):
        out["loras"] = [[_resolve(str(x[0]), suite_dir, work), *x[1:]] if isinstance(x, (list, tuple)) and x else x
                        for x in out["loras"]]
    for key in ("decoder", "calibration"):
        if isinstance(out.get(key), str):
            out[key] = _resolve(out[key], suite_dir, work)
    return out


def resolve_suite(suite: Suite, work: str | os.PathLike | None = None,
                  overrides: dict[str, str] | None = None) -> Suite:
    """Absolute paths everywhere; `overrides` maps an engine or reference name to a path (`--path NAME=PATH`)."""
    suite_dir = Path(os.path.abspath(suite.file)).parent if suite.file else Path.cwd()
    work_dir = Path(os.path.abspath(work)) if work else default_work_dir(suite.name)
    overrides = dict(overrides or {})
    known = {e.name for e in suite.engines} | {p.name for p in suite.peers}
    known |= {suite.reference.name, "reference"} if suite.reference else set()
    for name in overrides:
        if name not in known:
            raise SuiteError(f"{suite.file or suite.name}: --path {name}=…: no engine or reference called {name!r} "
                             f"(have: {', '.join(sorted(known))})")
    def path_of(name, value):
        if name in overrides:
            return os.path.abspath(Path(overrides[name]).expanduser())
        return _resolve(value, suite_dir, work_dir)

    def hint(text):
        return None if text is None else text.replace("{work}", str(work_dir)).replace("{suite}", str(suite_dir))

    def adapters(spec):  # the loras and decoder of a diffusers reference or peer
        return {"loras": tuple((_resolve(f, suite_dir, work_dir), scale) for f, scale in spec.loras),
                "decoder": _resolve(spec.decoder, suite_dir, work_dir)}

    engines = tuple(dataclasses.replace(e, bundle=path_of(e.name, e.bundle), build_hint=hint(e.build_hint))
                    for e in suite.engines)
    peers = tuple(dataclasses.replace(p, model=path_of(p.name, p.model), python=_resolve(p.python, suite_dir, work_dir),
                                      build_hint=hint(p.build_hint), **adapters(p)) for p in suite.peers)
    reference = suite.reference
    if reference is not None:
        base = overrides.get("reference") or overrides.get(reference.name)
        reference = dataclasses.replace(
            reference, base=os.path.abspath(Path(base).expanduser()) if base else _resolve(reference.base, suite_dir, work_dir),
            **adapters(reference))
    prepare = tuple(dataclasses.replace(p, out=_resolve(p.out, suite_dir, work_dir),
                                        export=_resolve(p.export, suite_dir, work_dir),
                                        base=_resolve(p.base, suite_dir, work_dir),
                                        options=_resolve_options(p.options, suite_dir, work_dir)) for p in suite.prepare)
    clip = _resolve(suite.clip_model, suite_dir, work_dir)
    return dataclasses.replace(suite, engines=engines, peers=peers, reference=reference, prepare=prepare,
                               clip_model=clip)


def check_inputs(suite: Suite, positions: dict[str, int] | None = None) -> None:
    """Every bundle and the reference base exist (call on a resolved suite). The error names the entry as
    `engines[i] 'name'`, i its place in the file (`positions`, when engines were left out with --only)."""
    where = suite.file or suite.name
    made_by = {Path(p.out): i for i, p in enumerate(suite.prepare)}
    positions = positions or {}
    for k, e in enumerate(suite.engines):
        i = positions.get(e.name, k)
        path = Path(e.bundle)
        if not (path / "sdedge.json").is_file():
            what = "no such folder" if not path.exists() else "no sdedge.json in it (not an sdedge bundle)"
            hint = ""
            if path in made_by:
                hint = f"; build it with --build (prepare[{made_by[path]}])"
            elif e.build_hint:
                hint = f"; to make it: {e.build_hint}"
            raise SuiteError(f"{where}: engines[{i}] {e.name!r}: bundle {path}: {what}{hint}. "
                             f"Pass --path {e.name}=DIR to use another folder, or --only to leave it out.")
    for k, p in enumerate(suite.peers):
        i = positions.get(p.name, k)
        hint = f"; to make it: {p.build_hint}" if p.build_hint else ""
        _check_adapters(where, f"peers[{i}] {p.name!r}", p, made_by)
        if p.python is not None and (not os.access(p.python, os.X_OK) or Path(p.python).is_dir()):
            raise SuiteError(f"{where}: peers[{i}] {p.name!r}: python {p.python}: no such program (the peer's "
                             f"virtual environment is missing){hint}. Pass --only to leave it out.")
        model = Path(p.model)
        if not (model / "model_index.json").is_file():
            what = "no such folder" if not model.exists() else "no model_index.json (not an exported pipeline folder)"
            raise SuiteError(f"{where}: peers[{i}] {p.name!r}: model {model}: {what}{hint}. "
                             f"Pass --path {p.name}=DIR to use another folder, or --only to leave it out.")
    if suite.reference is not None:
        path = Path(suite.reference.base)
        _check_adapters(where, f"reference {suite.reference.name!r}", suite.reference, made_by)
        if not (path / "model_index.json").is_file():
            hint = f"; build it with --build (prepare[{made_by[path]}])" if path in made_by else ""
            what = "no such folder" if not path.exists() else "no model_index.json (not a diffusers folder)"
            raise SuiteError(f"{where}: reference {suite.reference.name!r}: base {path}: {what}{hint}")


def _check_adapters(where: str, entry: str, spec, made_by: dict[Path, int]) -> None:
    """A diffusers reference's or peer's LoRA files and decoder folder exist."""
    paths = [(Path(f), "LoRA", Path(f).is_file()) for f, _ in spec.loras]
    if spec.decoder:
        paths.append((Path(spec.decoder), "decoder", (Path(spec.decoder) / "config.json").is_file()))
    for path, what, ok in paths:
        if not ok:
            hint = f"; build it with --build (prepare[{made_by[path]}])" if path in made_by else ""
            raise SuiteError(f"{where}: {entry}: {what} {path}: not found{hint}")


def select_engines(suite: Suite, only: list[str] | None) -> Suite:
    """Keep only the engines and peers named (`--only a,b`); the reference stays. At least one sdedge engine
    must remain: its bundle gives the size, latents and scheduler every pipeline shares."""
    if not only:
        return suite
    names = [e.name for e in suite.engines] + [p.name for p in suite.peers]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise SuiteError(f"{suite.file or suite.name}: --only {unknown[0]!r}: no such engine or peer "
                         f"(have: {', '.join(names)})")
    engines = tuple(e for e in suite.engines if e.name in only)
    if not engines:
        raise SuiteError(f"{suite.file or suite.name}: --only must keep at least one sdedge engine (have: "
                         f"{', '.join(e.name for e in suite.engines)}): its bundle sets the size, latents and scheduler")
    peers = tuple(p for p in suite.peers if p.name in only)
    for x in engines + peers:
        if x.parity_against is not None and x.parity_against not in only:
            raise SuiteError(f"{suite.file or suite.name}: --only keeps {x.name!r} but leaves out "
                             f"{x.parity_against!r}, its parity_against (the images its parity is measured on): "
                             f"add {x.parity_against} to --only")
    kept = dataclasses.replace(suite, engines=engines, peers=peers)
    return dataclasses.replace(kept, prepare=_needed_steps(kept))


def _needed_steps(suite: Suite) -> tuple[PrepareStep, ...]:
    """The prepare steps whose output the suite's entries use, directly or through a later step's inputs (the
    steps --only leaves: a left-out engine's bundle is not built)."""
    def inputs(spec) -> list:
        if isinstance(spec, PrepareStep):
            o = spec.options
            return [spec.export, spec.base, o.get("decoder"), o.get("calibration"),
                    *[x[0] for x in o.get("loras") or () if isinstance(x, (list, tuple)) and x]]
        return [getattr(spec, k, None) for k in ("bundle", "base", "model", "decoder")] + \
            [f for f, _ in getattr(spec, "loras", ())]
    needed = {Path(str(p)) for x in (*suite.engines, *suite.peers, *([suite.reference] if suite.reference else []))
              for p in inputs(x) if p}
    kept = []
    for step in reversed(suite.prepare):
        if Path(step.out) in needed:
            kept.append(step)
            needed |= {Path(str(p)) for p in inputs(step) if p}
    return tuple(reversed(kept))


# -- preparing -----------------------------------------------------------------------------------------------
def run_prepare(suite: Suite, console=None, rebuild: bool = False) -> list[str]:
    """Run the suite's prepare steps whose output is missing (all of them with `rebuild`); returns what was done."""
    from sdedge.runtime.stages import Stages

    stages = Stages(console, quiet=console is None)
    done = []
    for i, step in enumerate(suite.prepare):
        out = Path(step.out)
        marker = {"lcm-lora": None, "tiny-decoder": "config.json"}.get(step.random, "sdedge.json" if step.export
                                                                         else "model_index.json")
        if (out / marker if marker else out).is_file() and not rebuild:
            done.append(f"prepare[{i}]: {out} exists, kept")
            continue
        if step.random:
            from .fast_inputs import write_random

            with stages(f"prepare[{i}]: write a random-weight {step.random} to {out}"):
                write_random(step.random, out, base=step.base, seed=step.seed)
            done.append(f"prepare[{i}]: wrote a random {step.random} to {out}")
        elif step.builtin:
            from sdedge.export.bases import write_builtin_base

            with stages(f"prepare[{i}]: write the built-in {step.builtin} base to {out}"):
                write_builtin_base(step.builtin, out, seed=step.seed, overwrite=True)
            done.append(f"prepare[{i}]: wrote base {step.builtin} to {out}")
        else:
            from sdedge.export.build import ExportOptions, export_bundle

            try:
                opts = from_dict(ExportOptions, {**step.options, "overwrite": True},
                                 f"{suite.file or suite.name}: prepare[{i}].options")
            except ConfigError as exc:
                raise SuiteError(str(exc)) from None
            if not any(Path(step.export, m).is_file() for m in ("model_index.json", "sdedge.json")) \
                    and not Path(step.export).is_file():  # a base, a single file, or an fp32 bundle to derive from
                raise SuiteError(f"{suite.file or suite.name}: prepare[{i}]: base {step.export} not found "
                                 "(an earlier prepare step should write it)")
            with stages(f"prepare[{i}]: export {step.export} to {out}"):
                export_bundle(step.export, out, opts)
            done.append(f"prepare[{i}]: exported {step.export} to {out}")
    return done
