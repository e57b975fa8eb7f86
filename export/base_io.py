"""What loading and writing bases share, whatever the architecture (bases.py: SD 1.x, sdxl_base.py: SDXL):
offline mode, quiet loaders, the atomic base folder, safetensors headers checked before anything loads, key and
shape checks that name the tensor at fault, and the fp32 CPU finish of a loaded pipeline."""

from __future__ import annotations

import contextlib
import math
import os
import struct
from pathlib import Path
from typing import Any

from sdedge.runtime.errors import SdedgeError
from sdedge.runtime.files import check_replaceable, staged_dir
from sdedge.runtime.strict import ConfigError, parse_json
from sdedge.runtime.tensor_files import write_safetensors

from .markers import MARKER_FILE, PRUNED_MARKER


def force_offline() -> None:
    """Make huggingface_hub, transformers and diffusers refuse the network in this process.

    The environment variables cover libraries imported later; the constants cover those already imported
    (huggingface_hub reads HF_HUB_OFFLINE once, at import).
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["DISABLE_TELEMETRY"] = "1"
    import sys

    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
        constants.HF_HUB_DISABLE_TELEMETRY = True
    hub_utils = sys.modules.get("diffusers.utils.hub_utils")
    if hub_utils is not None:
        hub_utils.HF_HUB_OFFLINE = True
        hub_utils.HF_HUB_DISABLE_TELEMETRY = True


def check_base_out(out_dir: Path, overwrite: bool, inputs=()) -> None:
    """Refuse a non-empty `out_dir` unless `overwrite` and it is a base sdedge wrote (a marker) holding no input."""

    check_replaceable(out_dir, {MARKER_FILE: None, PRUNED_MARKER: None}, inputs, overwrite=overwrite)


@contextlib.contextmanager
def _atomic_dir(out_dir: Path, overwrite: bool, inputs=()):
    """Yield a temporary folder beside `out_dir`; on success it replaces `out_dir`, on failure it goes. A
    non-empty `out_dir` is replaced only with `overwrite`, when it is a base sdedge wrote and holds no input."""
    check_base_out(Path(out_dir), overwrite, inputs)
    with staged_dir(out_dir) as tmp:
        yield tmp


def hub_layout_text_encoder(folder: Path) -> int:
    """Give the text encoder's weights the Hub layout's `text_model.` key prefix; return the keys renamed.

    transformers 5 saves CLIPTextModel without the prefix, and transformers 4 (what optimum, A1111 and many
    diffusers installs still run) loads such a file without an error but with every weight left random
    (only a warning). SD1.5 on the Hub has the prefix, and both versions read it.
    """
    from safetensors.numpy import load_file, save_file

    path = folder / "model.safetensors"
    if not path.is_file():
        return 0
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        metadata = f.metadata() or {}
    tensors = load_file(str(path))
    missing = [k for k in tensors if not k.startswith("text_model.")]
    if not missing:
        return 0
    renamed = {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in tensors.items()}
    write_safetensors(path, renamed, metadata, save_file)
    return len(missing)


_ST_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a `.safetensors` file, checking that the header is whole and every tensor's
    bytes lie inside the file (a truncated download is caught here, not deep inside a loader)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SdedgeError(f"{path}: not a safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100_000_000):
                raise SdedgeError(f"{path}: corrupt or truncated safetensors file (header of {n} bytes in a {size}-byte file)")
            raw = f.read(n)
    except OSError as e:
        raise SdedgeError(f"cannot read {path}: {e}") from e
    try:
        header = parse_json(raw, f"{path}: safetensors header", max_bytes=n, max_depth=4)
        if not isinstance(header, dict):
            raise ConfigError(f"{path}: corrupt safetensors header: not a JSON object")
    except ConfigError as e:
        raise SdedgeError(str(e)) from None
    data_size = size - 8 - n
    shapes: dict[str, tuple[int, ...]] = {}
    end_max = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype, shape, (begin, end) = _safetensors_entry(path, key, info)
        width = _ST_DTYPE_BYTES.get(dtype)
        if width is not None and end - begin != math.prod(shape) * width:
            raise SdedgeError(f"{path}: tensor {key!r} has {end - begin} bytes for shape {shape} {dtype}")
        if not 0 <= begin <= end:
            raise SdedgeError(f"{path}: tensor {key!r} has bad offsets {begin}..{end}")
        end_max = max(end_max, end)
        shapes[key] = shape
    if end_max > data_size:
        raise SdedgeError(
            f"{path}: truncated safetensors file: tensors need {end_max} data bytes, the file holds {data_size}"
        )
    return shapes


def _safetensors_entry(path: Path, key: str, info: Any) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    """One header entry's dtype, shape and data offsets, every one of the right JSON type (integers, not strings
    or booleans, and none negative): a hostile header is an error naming the file and the tensor."""
    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(info.get("shape"), list)
          and all(count(d) for d in info["shape"]) and isinstance(info.get("data_offsets"), list)
          and len(info["data_offsets"]) == 2 and all(count(o) for o in info["data_offsets"]))
    if not ok:
        raise SdedgeError(f"{path}: corrupt safetensors entry for {key!r}: needs a dtype string, a shape and two "
                          "data_offsets, all non-negative integers")
    begin, end = info["data_offsets"]
    return info["dtype"], tuple(info["shape"]), (begin, end)


def _pickle_key_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except Exception as e:
        raise SdedgeError(
            f"cannot load {path} with torch.load(weights_only=True): {e}. "
            "Only plain tensor checkpoints are read; convert it to .safetensors."
        ) from e
    while isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise SdedgeError(f"{path}: not a state dict (a {type(state).__name__})")
    return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def _is_zip(path: Path) -> bool:
    import zipfile

    return zipfile.is_zipfile(path)


def _squeeze_trailing_ones(shape: tuple[int, ...]) -> tuple[int, ...]:
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _check_shapes(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], file: Path, against: str):
    """Name the first missing or mismatched tensor. Extra tensors (EMA copies, alphas_cumprod, ...) are fine.
    (C, C) and (C, C, 1, 1) are the same weight (LDM writes the VAE attention as 1x1 convolutions)."""
    missing = [k for k in expected if k not in found]
    wrong = [
        k
        for k in expected
        if k in found and _squeeze_trailing_ones(found[k]) != _squeeze_trailing_ones(expected[k])
    ]
    if wrong:
        k = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise SdedgeError(
            f"{file}: tensor {k!r} has shape {list(found[k])} but {against} expects {list(expected[k])}{more}: "
            "the checkpoint is not of this architecture"
        )
    if missing:
        k = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SdedgeError(
            f"{file}: tensor {k!r} (shape {list(expected[k])}) is missing{more}; {against} expects it: "
            "the checkpoint is not of this architecture or not in the original SD layout"
        )


def check_folder_weights(folder: Path, allow_pickle: bool, models: dict[str, Any],
                         skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check each component's weight files against its config before diffusers loads them (but those in `skip`).
    `models`: part -> meta-device model built from the folder's configs.

    Returns the keyword arguments for `from_pretrained`: `variant` when every component ships only
    variant weights (e.g. *.fp16.safetensors), and `use_safetensors=True` unless pickled .bin weights
    were allowed and are needed.
    """
    variants: set[str | None] = set()
    needs_bin = False
    for part, model in models.items():
        strip = "text_model." if part.startswith("text_encoder") else ""
        if part in skip:
            continue
        all_st = sorted((folder / part).glob("*.safetensors"))
        plain = [f for f in all_st if f.name.count(".") == 1]
        files = plain or all_st
        if not files:
            bins = sorted((folder / part).glob("*.bin"))
            if not bins:
                raise SdedgeError(f"{folder / part} has no weight file (.safetensors or .bin)")
            if not allow_pickle:
                raise SdedgeError(
                    f"{bins[0]} is a pickle (.bin) and {folder / part} has no .safetensors weights; pickles can run "
                    "arbitrary code when loaded, so sdedge does not open them by default. Convert the folder to "
                    "safetensors, or pass allow_pickle=True (--allow-pickle) if you trust where it came from."
                )
            needs_bin = True
            continue  # read by diffusers/transformers with torch.load(weights_only=True)
        if plain:
            variants.add(None)
        else:
            found_variants = {f.name.split(".")[1].split("-")[0] for f in files}
            if len(found_variants) > 1:
                raise SdedgeError(f"{folder / part} holds several weight variants {sorted(found_variants)}")
            variants |= found_variants
            files = [f for f in files if f.name.split(".")[1].split("-")[0] in found_variants]
        found: dict[str, tuple[int, ...]] = {}
        for f in files:
            found.update({k.removeprefix(strip): v for k, v in read_safetensors_header(f).items()})
        expected = {k.removeprefix(strip): tuple(t.shape) for k, t in model.state_dict().items()}
        _check_shapes(found, expected, files[0] if len(files) == 1 else folder / part, f"{part}/config.json")
    if len(variants) > 1:
        raise SdedgeError(
            f"{folder}: components ship different weight variants ({sorted(map(str, variants))}); "
            "give every component the same one"
        )
    kwargs: dict[str, Any] = {}
    variant = next(iter(variants)) if variants else None
    if variant is not None:
        kwargs["variant"] = variant
    if not needs_bin:
        kwargs["use_safetensors"] = True
    return kwargs


def _check_meta_free(pipe, source: Path, parts=("unet", "vae", "text_encoder")) -> None:
    for part in parts:
        model = getattr(pipe, part, None)
        if model is None:
            raise SdedgeError(f"{source}: no {part} was loaded")
        for name, p in model.named_parameters():
            if p.device.type == "meta":
                raise SdedgeError(f"{source}: {part} parameter {name!r} was not in the checkpoint")


def finish_loading(pipe, source: Path, parts: tuple[str, ...], check):
    """Upcast to fp32, move to the CPU, re-home every weight, eval mode; then `check(pipe, source)`."""
    import torch

    for part in parts:
        model = getattr(pipe, part, None)
        if model is None:
            continue
        # Upcast only what is not fp32 already (an fp16 checkpoint): Module.float() keeps integer buffers.
        if any(t.is_floating_point() and t.dtype != torch.float32 for t in model.state_dict().values()):
            model.float()
        if any(t.device.type not in ("cpu", "meta") for t in model.state_dict().values()):
            model.to("cpu")
        _rehome(model)
        model.eval()
        check_finite_weights(model, source, part)
    check(pipe, source)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_finite_weights(model, source: Path, part: str) -> None:
    """SdedgeError naming the first weight or buffer of `model` that holds a NaN or an infinity."""
    import torch

    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
                raise SdedgeError(f"{source}: {part} tensor {name!r} holds NaN or infinite values: the base's "
                                  "weights are damaged")


def _rehome(model) -> None:
    """Copy every weight out of the loader's buffers (often the memory-mapped file, at arbitrary offsets) into
    fresh, aligned memory of this process: the pipeline no longer depends on the file, and CPU kernels give
    the same bits whichever loader or file layout the weights came from (misaligned weights change the
    summation order of vectorised convolutions, ~1e-6)."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.device.type == "cpu":
                p.data = p.data.clone(memory_format=torch.contiguous_format)
        for name, buf in list(model.named_buffers()):
            if buf.device.type == "cpu":
                module_name, _, attr = name.rpartition(".")
                owner = model.get_submodule(module_name) if module_name else model
                owner._buffers[attr] = buf.clone()


@contextlib.contextmanager
def _quiet():
    """No progress bars from diffusers / transformers / huggingface_hub while loading or saving."""
    restore = []
    for module_name in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            mod = __import__(module_name, fromlist=["is_progress_bar_enabled"])
            if mod.is_progress_bar_enabled():
                mod.disable_progress_bar()
                restore.append(mod.enable_progress_bar)
        except Exception:  # pragma: no cover - a version without these helpers
            pass
    try:
        from huggingface_hub.utils import (
            are_progress_bars_disabled,
            disable_progress_bars,
            enable_progress_bars,
        )

        if not are_progress_bars_disabled():
            disable_progress_bars()
            restore.append(enable_progress_bars)
    except Exception:  # pragma: no cover
        pass
    try:
        yield
    finally:
        for undo in restore:
            undo()

