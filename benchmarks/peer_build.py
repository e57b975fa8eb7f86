"""Make an optimum peer's input that no hub download provides here: a copy of a base with LoRAs fused into its UNet
by diffusers' own loader (peft: `load_lora_weights`, `fuse_lora`, `unload_lora_weights`), the way a user of
optimum-intel would before `optimum-cli export openvino` (optimum-intel loads no LoRA into an exported IR).

    python -m sdedge.benchmarks.peer_build fuse-lora --base DIR --lora FILE[:SCALE] ... --out DIR

Runs in sdedge's venv (diffusers and peft; the optimum venvs have no peft). Only the UNet is written again: the
other components are hard links to the base's files (copies across file systems), so the copy costs one UNet.
benchmarks/peer-envs/make-lcm-ov.sh chains it with optimum-intel's export for `optimum-ov-lcm` of
benchmarks/cpu-sd15-512-fast.yaml.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

MARKER = "sdedge_peer_fused.json"  # what was fused, by which loader (written last)


def _link_tree(src: Path, dst: Path, skip: tuple[str, ...]) -> None:
    """Hard-link (else copy) every file of `src` under `dst`, but not the top-level entries in `skip`."""
    for root, _dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        if rel.parts and rel.parts[0] in skip:
            continue
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            if not rel.parts and name in skip:
                continue
            try:
                os.link(Path(root) / name, dst / rel / name)
            except OSError:
                shutil.copy2(Path(root) / name, dst / rel / name)


def fuse_lora_copy(base: str | os.PathLike, loras: list[tuple[str, float]], out: str | os.PathLike) -> Path:
    """Write `out`: `base` (a diffusers SD folder) with `loras` ((file, scale), in order) fused into its UNet by
    diffusers' loader; written in a staged folder that replaces `out` only when whole."""
    import diffusers
    import torch
    from diffusers import StableDiffusionPipeline

    from sdedge.runtime.files import staged_dir

    base, out = Path(base), Path(out)
    pipe = StableDiffusionPipeline.from_pretrained(str(base), local_files_only=True, dtype=torch.float32,
                                                   safety_checker=None, requires_safety_checker=False)
    for i, (path, scale) in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"lora{i}")
        pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=float(scale), adapter_names=[f"lora{i}"])
        pipe.unload_lora_weights()  # the fused weights stay; the LoRA layers go
    with staged_dir(out) as tmp:
        _link_tree(base, tmp, skip=("unet", "sdedge_base.json"))  # a fused copy is no longer that built-in base
        pipe.unet.save_pretrained(str(tmp / "unet"), safe_serialization=True)
        text_encoder_changed = any(n.startswith("lora_te") or n.startswith("text_encoder")
                                   for n in _keys(loras))
        if text_encoder_changed:
            shutil.rmtree(tmp / "text_encoder")
            pipe.text_encoder.save_pretrained(str(tmp / "text_encoder"), safe_serialization=True)
        (tmp / MARKER).write_text(json.dumps({
            "base": str(base), "loras": [[str(p), float(s)] for p, s in loras],
            "loader": f"diffusers {diffusers.__version__} load_lora_weights + fuse_lora + unload_lora_weights",
            "text_encoder_fused": text_encoder_changed}, indent=2) + "\n", encoding="utf-8")
    return out


def _keys(loras) -> list[str]:
    from safetensors import safe_open

    keys = []
    for path, _ in loras:
        with safe_open(str(path), framework="np") as f:
            keys += list(f.keys())
    return keys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdedge.benchmarks.peer_build")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fuse-lora", help="a copy of a base with LoRAs fused by diffusers' own loader")
    f.add_argument("--base", required=True)
    f.add_argument("--lora", action="append", required=True, help="FILE[:SCALE], in fusing order")
    f.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from sdedge.export.lora import parse_lora_arg

    base = Path(args.base)
    loras = [parse_lora_arg(x) for x in args.lora]
    missing = [str(x) for x in [base / "model_index.json", *(Path(q) for q, _ in loras)] if not x.is_file()]
    if missing:
        p.exit(2, f"peer_build: not found: {', '.join(missing)}\n")
    if Path(args.out).resolve() == base.resolve():
        p.exit(2, f"peer_build: --out {args.out} is the base itself\n")
    print(fuse_lora_copy(base, loras, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
