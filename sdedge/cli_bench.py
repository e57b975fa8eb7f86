"""`sdedge bench`: `register(subparsers)` adds the command to sdedge's parser (sdedge/cli.py); heavy imports
happen when the command runs. What a user sees in `sdedge bench --help` is USAGE."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from sdedge.cli_options import add_engine_options, add_trust_options

console = Console(stderr=True, soft_wrap=True)

USAGE = """Time a bundle against diffusers' eager pipeline on the same weights, prompts, seeds and initial latents,
and write report.json, report.md, report.png and samples.png (docs/bench.md).

    sdedge bench bundle/ --reference tiny-base/ --runs 5 --warmup 1 --steps 20 --size 512 --target-seconds 5 --out report/
    sdedge bench --suite benchmarks/cpu-tiny.yaml --build --out /tmp/cpu-tiny
"""


def _name_path(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=PATH")
    return name, path


def _suite_from_args(args):
    """The resolved suite to run, and whether it came from a file."""
    from sdedge.benchmarks.suite import (
        BenchError,
        check_inputs,
        load_suite,
        resolve_suite,
        run_prepare,
        select_engines,
        validate_suite,
    )

    overrides = {k: getattr(args, k) for k in ("runs", "warmup", "steps", "size", "target_seconds", "guidance",
                                               "scheduler", "seed", "negative", "batch", "threads", "device",
                                               "target_statistic") if getattr(args, k) is not None}
    if args.prompt:
        overrides["prompts"] = tuple(args.prompt)
    if args.sequential:
        overrides["interleave"] = False
    if args.inline:
        overrides["isolation"] = "inline"
    if args.suite:
        if args.bundle or args.reference:
            raise BenchError("give either a suite (--suite FILE) or a bundle (BUNDLE [--reference BASE]), not both; "
                             "use --path NAME=PATH to point a suite entry elsewhere")
        if args.public_key or args.identity or args.issuer:
            raise BenchError("--public-key/--identity/--issuer apply to a single bundle; in a suite give each engine "
                             "its public_key (or identity and issuer)")
        suite = load_suite(args.suite)
        suite = dataclasses.replace(suite, settings=dataclasses.replace(suite.settings, **overrides))
        validate_suite(suite)
        suite = resolve_suite(suite, work=args.work, overrides=dict(args.path or []))
        positions = {e.name: i for i, e in enumerate(suite.engines)}
        suite = select_engines(suite, [n.strip() for n in args.only.split(",")] if args.only else None)
        if args.build or args.rebuild:
            for line in run_prepare(suite, console, rebuild=args.rebuild):
                console.print(f"[dim]{escape(line)}[/dim]")
        check_inputs(suite, positions)
        return suite
    if not args.bundle:
        raise BenchError("name a bundle (sdedge bench BUNDLE [--reference BASE]) or a suite (--suite FILE)")
    for flag in ("work", "path", "only", "build", "rebuild"):
        if getattr(args, flag):
            raise BenchError(f"--{flag} applies to suites (--suite FILE) only")
    suite = bench_from_args(args.bundle, args.reference, **{k: overrides.pop(k) for k in
                                                          ("runs", "warmup", "steps", "size", "target_seconds")
                                                          if k in overrides}, **overrides)
    engine = suite.engines[0]
    engine = dataclasses.replace(engine, memory=args.memory or engine.memory, backend=args.backend or engine.backend,
                                 verify=args.verify or engine.verify, public_key=args.public_key or engine.public_key,
                                 identity=args.identity or engine.identity, issuer=args.issuer or engine.issuer)
    suite = dataclasses.replace(suite, engines=(engine,))
    validate_suite(suite)
    return suite


def cmd_bench(args) -> int:
    from rich.table import Table

    from sdedge.benchmarks.bench import default_results_dir, run_bench

    suite = _suite_from_args(args)
    out = Path(args.out) if args.out else default_results_dir(suite) if args.suite else Path("bench-report")
    report = run_bench(suite, out, console=console, progress=not args.no_progress, clip_model=args.clip_model)

    table = Table("engine", "backend", "median s/image", "p95", "images/min", "speed-up", "PSNR min", "SSIM min",
                  "peak RSS", title=f"sdedge bench · {report['suite']['name']}")
    for e in report["engines"]:
        sp, su, par = e["seconds_per_image"], e.get("speedup_vs_reference"), e.get("parity")
        table.add_row(escape(e["name"]) + (" (ref)" if e["role"] == "reference" else ""),
                      escape(f"{e['backend']} {e['precision']}"),
                      f"{sp['median']:.3f}", f"{sp['p95']:.3f}", f"{e['images_per_minute']:.1f}",
                      f"{su['median']:.2f}×" if su else "—",
                      f"{par['psnr_db']['min']:.1f} dB" if par else "—", f"{par['ssim']['min']:.4f}" if par else "—",
                      f"{e['memory']['peak_rss_bytes'] / 1e9:.2f} GB")
    console.print(table)
    for note in report["notes"]:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    target = report.get("target")
    if target:
        colour = "green" if target["verdict"] == "pass" else "red"
        console.print(f"[bold {colour}]{escape(target['statement'])}[/bold {colour}]")
    else:
        console.print("no target given (--target-seconds S): no pass/fail verdict")
    console.print(escape(f"report: {out / 'report.md'} · {out / 'report.json'} · {out / 'report.png'} · "
                         f"{out / 'samples.png'}"))
    if target and target["verdict"] == "fail" and args.fail_on_miss:
        return 1
    return 0


def register(subparsers) -> None:
    """Add `bench` to an argparse subparsers action."""
    b = subparsers.add_parser("bench", help="time a bundle against diffusers; report.json/.md/.png, pass/fail vs a target",
                              description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("bundle", nargs="?", help="an sdedge bundle folder (or use --suite)")
    b.add_argument("--reference", metavar="BASE", help="diffusers folder of the same architecture: run diffusers' eager "
                   "pipeline on it too, for speed-up and PSNR/SSIM per image")
    b.add_argument("--suite", metavar="FILE", help="a YAML suite (benchmarks/*.yaml); the flags below override its settings")
    b.add_argument("--out", metavar="DIR", help="where the report goes (default: bench-report/, or with --suite "
                   "benchmarks/results/<suite>/<date>_<machine>_<commit>/)")
    g = b.add_argument_group("settings (default: a suite's, else runs 3, warmup 1, steps 20, the bundle's size)")
    g.add_argument("--runs", type=int, help="timed images per engine")
    g.add_argument("--warmup", type=int, help="untimed images per engine first")
    g.add_argument("--steps", type=int)
    g.add_argument("--size", type=int, help="square image size in pixels")
    g.add_argument("--guidance", type=float)
    g.add_argument("--scheduler")
    g.add_argument("--seed", type=int, help="run r uses seed + r")
    g.add_argument("--prompt", action="append", help="a prompt (repeat for several; runs cycle through them)")
    g.add_argument("--negative", help="negative prompt")
    g.add_argument("--batch", type=int, help="images per call")
    add_engine_options(g, defaults=False, scope=" (for every sdedge engine of the run)")
    add_trust_options(g, verify=None, scope=" (for every sdedge engine of the run)")
    g.add_argument("--target-seconds", type=float, metavar="S", help="pass when every engine's median s/image ≤ S")
    g.add_argument("--target-statistic", choices=["min", "median", "p95", "max"])
    g.add_argument("--fail-on-miss", action="store_true", help="exit 1 when the target is missed")
    g.add_argument("--clip-model", metavar="PATH", help="local CLIP model folder for a CLIP score (skipped if absent)")
    g.add_argument("--sequential", action="store_true", help="one engine after the other instead of alternating "
                   "(only one engine's process alive at a time: lower memory)")
    g.add_argument("--inline", action="store_true", help="run engines in this process (fast start; peak RSS shared)")
    g.add_argument("--no-progress", action="store_true")
    s = b.add_argument_group("suites")
    s.add_argument("--work", metavar="DIR", help="the suite's {work} folder (default ~/.cache/sdedge/bench/<suite>)")
    s.add_argument("--build", action="store_true", help="run the suite's prepare steps for missing bundles/bases")
    s.add_argument("--rebuild", action="store_true", help="run every prepare step again")
    s.add_argument("--path", type=_name_path, action="append", metavar="NAME=PATH",
                   help="use PATH for the engine (or reference) called NAME")
    s.add_argument("--only", metavar="A,B", help="measure only these engines of the suite (the reference stays)")
    b.set_defaults(func=cmd_bench)


def bench_from_args(bundle: str, reference: str | None, *, runs: int = 3, warmup: int = 1, steps: int = 20,
                    size: int | None = None, target_seconds: float | None = None, **settings_kw):
    """The suite a plain `sdedge bench BUNDLE [--reference BASE] ...` runs."""
    from sdedge.benchmarks.suite import BenchError, EngineSpec, ReferenceSpec, Settings, Suite, SuiteError

    if not Path(bundle).exists():
        raise BenchError(f"bundle not found: {bundle}")
    if not (Path(bundle) / "sdedge.json").is_file():
        raise BenchError(f"{bundle}: no sdedge.json; is it an sdedge bundle (made by `sdedge export`)?")
    if reference is not None and not Path(reference).exists():
        raise BenchError(f"reference base not found: {reference}")
    try:
        settings = Settings(runs=runs, warmup=warmup, steps=steps, size=size, target_seconds=target_seconds,
                            **{k: v for k, v in settings_kw.items() if v is not None})
    except TypeError as exc:
        raise SuiteError(str(exc)) from None
    return Suite(name="bench", settings=settings,
                 reference=ReferenceSpec(base=str(Path(reference).resolve())) if reference else None,
                 engines=(EngineSpec(name="sdedge", bundle=str(Path(bundle).resolve())),))
