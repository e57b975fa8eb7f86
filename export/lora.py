"""LoRA adapters fused into a loaded Stable Diffusion 1.x pipeline's weights, for export.

    fuse_loras(pipe, [("lora/adapter.safetensors", 0.8), ("style.safetensors", 0.5)]) -> FuseReport

Key formats read (safetensors only; a pickle LoRA is refused):
- diffusers / peft: `unet.<module>.lora_A.weight` + `lora_B.weight` (also `lora_A.<adapter>.weight`, the
  `base_model.model.` prefix of a raw peft state dict, `.base_layer` in module names, and un-prefixed keys),
  `text_encoder.<module>...`; alpha from the `lora_adapter_metadata` header (`lora_alpha`, `alpha_pattern`,
  `use_rslora`) or `.alpha` keys, else alpha = rank;
- older diffusers: `unet.<module>.lora.down.weight` / `lora.up.weight`, attention-processor keys
  (`attn1.processor.to_q_lora.down.weight`), text-encoder `q_proj.lora_linear_layer.down.weight`;
- kohya / A1111: `lora_unet_<module_with_underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`, with
  diffusers module names or the original LDM names (`lora_unet_input_blocks_1_1_...`), and `lora_te_...` for the
  text encoder; linear and convolution (LoCon) layers;
- trained token rows (textual inversion of a word the base already spells, `sdedge train --train-tokens`):
  `text_encoder.<...>token_embedding.trainable_tokens_delta` (k, d) with `...trainable_tokens_indices` (k,) int64,
  added to those rows of the text encoder's token embedding: E[i] = E_base[i] + Σ scale · delta.

Weights are always computed from the base: W = W_base + Σ scale_i · (alpha_i / rank_i) · up_i @ down_i. The base
weights of every touched module are kept on the model, so fusing again (another set of LoRAs or scales)
starts from them, never from an earlier fused result (A → B → A gives A exactly), and `unfuse_loras` restores
them. Everything is checked before any weight changes: every key of every file is matched to a module of the
UNet or the text encoder, or the error names it (`strict=False` lists unmatched keys in the report instead);
a LoRA for another base (shape mismatch, an SDXL LoRA on SD1.5) is an error naming the first mismatched key and
both shapes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdedge.runtime.bundle import sha256_file
from sdedge.runtime.errors import SdedgeError
from sdedge.runtime.strict import ConfigError, parse_json

__all__ = ["LoraError", "LoraLayer", "LoraFile", "TokenRows", "FusedLora", "FuseReport", "read_lora", "fuse_loras",
           "unfuse_loras", "parse_lora_arg"]

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # text_encoder_2: SDXL's second (OpenCLIP bigG)
_KOHYA_COMPONENTS = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                     "lora_te2": "text_encoder_2"}  # lora_te1_/lora_te2_: kohya's SDXL text encoders
_BASE_ATTR = "_sdedge_lora_base"  # {module path: base weight} kept on each model that has been fused into
_PICKLES = (".bin", ".pt", ".pth", ".ckpt")
_SDXL_HINT = ("lora_te1_", "lora_te2_", "text_encoder_2.", "conditioner.")
_UNSUPPORTED = (
    ("hada_", "LoHa (LyCORIS)"), ("lokr_", "LoKr (LyCORIS)"), (".lora_mid.", "LoCon with a Tucker mid weight"),
    ("dora_scale", "DoRA"), ("lora_magnitude_vector", "DoRA"), (".lora_B.bias", "a LoRA bias (lora_bias)"),
    ("emb_params", "a textual-inversion embedding"), ("bundle_emb", "a textual-inversion embedding"),
)


_TOKENS = re.compile(r"^(.*)\.trainable_tokens_(delta|indices)$")


class LoraError(SdedgeError):
    """A LoRA file that cannot be fused into this pipeline; the message names the file and key."""


@dataclass
class LoraLayer:
    component: str | None  # "unet", "text_encoder", or None (un-prefixed key: resolved against both)
    module: str  # module path as written in the file (dots), or a kohya underscore name
    kohya: bool
    down: Any = None
    up: Any = None
    alpha: float | None = None
    keys: list[str] = field(default_factory=list)


@dataclass
class TokenRows:
    """Trained rows of a token embedding: `delta` (k, d) added to the rows `indices` (k,)."""

    component: str | None
    module: str  # the embedding's path as written in the file
    delta: Any = None
    indices: Any = None
    keys: list[str] = field(default_factory=list)


@dataclass
class LoraFile:
    path: Path
    sha256: str
    format: str  # "peft", "diffusers-old", "kohya"
    layers: dict[tuple[str | None, str], LoraLayer]
    metadata: dict[str, str]
    key_count: int
    unmatched: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) seen while parsing
    tokens: dict[tuple[str | None, str], TokenRows] = field(default_factory=dict)


@dataclass
class FusedLora:
    path: str
    sha256: str
    scale: float
    format: str
    keys: int
    matched_keys: int
    layers: dict[str, int]  # component -> modules changed
    unmatched: list[tuple[str, str]] = field(default_factory=list)
    tokens: int = 0  # token-embedding rows changed


@dataclass
class FuseReport:
    loras: list[FusedLora]
    modules: dict[str, int]  # component -> modules whose weights now differ from the base

    @property
    def complete(self) -> bool:
        return all(not lora.unmatched for lora in self.loras)

    def to_dict(self) -> dict:
        return {
            "loras": [dict(path=a.path, sha256=a.sha256, scale=a.scale, format=a.format, keys=a.keys,
                           matched_keys=a.matched_keys, layers=dict(a.layers), tokens=a.tokens,
                           unmatched=[{"key": k, "reason": r} for k, r in a.unmatched]) for a in self.loras],
            "modules": dict(self.modules),
        }


def parse_lora_arg(text: str) -> tuple[str, float]:
    """'path.safetensors:0.8' -> (path, 0.8); 'path.safetensors' -> (path, 1.0)."""
    path, sep, scale = text.rpartition(":")
    if sep and path and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", scale):
        return path, float(scale)
    return text, 1.0


# --- reading ------------------------------------------------------------------------------------------------------

def _unsupported(key: str) -> str | None:
    for marker, what in _UNSUPPORTED:
        if marker in key:
            return f"{what} is not supported (plain LoRA only)"
    if key.endswith((".diff", ".diff_b")):
        return "a full weight difference is not supported (plain LoRA only)"
    return None


_OLD_PROC = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_PEFT = re.compile(r"^(.*)\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
_OLD = re.compile(r"^(.*)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$")
_KOHYA = re.compile(r"^(lora_unet|lora_te[12]?)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")


def _split_component(key: str) -> tuple[str | None, str]:
    for prefix in ("base_model.model.",):
        if key.startswith(prefix):
            key = key[len(prefix):]
    for comp in COMPONENTS:
        if key.startswith(comp + "."):
            return comp, key[len(comp) + 1:]
    return None, key


def read_lora(path: str | Path) -> LoraFile:
    """Parse a LoRA file's keys into layers (no model needed). Keys of unsupported kinds are recorded in
    `unmatched` with the reason; a file that is not a readable safetensors LoRA is a `LoraError`."""
    path = Path(path)
    header, tensors = _read_tensors(path)
    layers: dict[tuple[str | None, str], LoraLayer] = {}
    unmatched: list[tuple[str, str]] = []
    formats: set[str] = set()
    tokens, tensors = _token_rows(tensors, path), dict(tensors)
    for rows in tokens.values():
        for k in rows.keys:
            del tensors[k]

    def layer(comp, module, kohya=False) -> LoraLayer:
        return layers.setdefault((comp, module), LoraLayer(comp, module, kohya))

    for key in sorted(tensors):
        reason = _unsupported(key) or _parse_key(key, tensors[key], layer, formats)
        if reason:
            unmatched.append((key, reason))
    _drop_incomplete(layers, unmatched)
    _check_ranks(layers, path)
    _apply_metadata_alphas(layers, header, path)
    fmt = "+".join(sorted(formats)) or "unknown"
    return LoraFile(path=path, sha256=sha256_file(path), format=fmt, layers=layers, metadata=header,
                    key_count=len(tensors) + sum(len(r.keys) for r in tokens.values()), unmatched=unmatched,
                    tokens=tokens)


def _read_tensors(path: Path) -> tuple[dict, dict]:
    """(header metadata, every tensor) of a safetensors LoRA, refusing what is missing, a pickle, unreadable, empty
    or not finite."""
    if not path.is_file():
        raise LoraError(f"LoRA not found: {path}")
    if path.suffix.lower() in _PICKLES:
        raise LoraError(f"{path}: a pickle file; sdedge reads LoRAs as .safetensors only (convert it first)")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise LoraError(f"{path}: not a readable safetensors file: {e}") from e
    if not tensors:
        raise LoraError(f"{path}: holds no tensors")
    _check_finite(tensors, path)
    return header, tensors


def _parse_key(key: str, t, layer, formats: set[str]) -> str | None:
    """File one tensor under its layer (`layer(comp, module, kohya)` gets or makes it) and note its format; the
    reason it was not used, or None."""
    m = _KOHYA.match(key)
    if m:
        formats.add("kohya")
        lay = layer(_KOHYA_COMPONENTS[m[1]], m[2], kohya=True)
        lay.keys.append(key)
        if m[3] == "alpha":
            lay.alpha = float(t.float().reshape(-1)[0])
        elif m[3] == "lora_down.weight":
            lay.down = t
        else:
            lay.up = t
        return None
    comp, rest = _split_component(key)
    if rest.startswith(("text_encoder_2.", "transformer.")):
        return f"targets {rest.split('.')[0]}, which an SD1.x pipeline does not have"
    if m := _OLD_PROC.match(rest):
        formats.add("diffusers-old")
        lay = layer(comp, f"{m[1]}.{'to_out.0' if m[2] == 'to_out' else m[2]}")
        lay.keys.append(key)
        setattr(lay, m[3], t)
    elif m := _PEFT.match(rest):
        formats.add("peft")
        lay = layer(comp, m[1].replace(".base_layer", ""))
        lay.keys.append(key)
        if m[2] == "A":
            lay.down = t
        else:
            lay.up = t
    elif m := _OLD.match(rest):
        formats.add("diffusers-old")
        lay = layer(comp, m[1])
        lay.keys.append(key)
        setattr(lay, m[2], t)
    elif rest.endswith(".alpha"):
        lay = layer(comp, rest[: -len(".alpha")])
        lay.keys.append(key)
        lay.alpha = float(t.float().reshape(-1)[0])
    else:
        return "not a LoRA key of a known format (diffusers/peft, kohya/A1111)"
    return None


def _drop_incomplete(layers: dict, unmatched: list[tuple[str, str]]) -> None:
    """Move layers that lack their down or up weight to `unmatched`, each key with the reason."""
    for (comp, module), lay in list(layers.items()):
        if lay.down is None or lay.up is None:
            missing = "down (lora_A)" if lay.down is None else "up (lora_B)"
            for k in lay.keys:
                unmatched.append((k, f"its {missing} weight is missing"))
            del layers[(comp, module)]


def _token_rows(tensors: dict, path: Path) -> dict[tuple[str | None, str], TokenRows]:
    """The trained token rows of a file (`trainable_tokens_delta` + `trainable_tokens_indices` per embedding),
    each pair checked: integer indices, one delta row per index, no index twice."""
    rows: dict[tuple[str | None, str], TokenRows] = {}
    for key in sorted(tensors):
        comp, rest = _split_component(key)
        m = _TOKENS.match(rest)
        if m:
            r = rows.setdefault((comp, m[1]), TokenRows(comp, m[1]))
            r.keys.append(key)
            setattr(r, m[2] if m[2] == "delta" else "indices", tensors[key])
    for r in rows.values():
        first = r.keys[0]
        if r.delta is None or r.indices is None:
            missing = "trainable_tokens_indices" if r.indices is None else "trainable_tokens_delta"
            raise LoraError(f"{path}: key {first!r}: trained token rows without their {missing} tensor")
        if r.indices.is_floating_point() or r.indices.dim() != 1 or r.delta.dim() != 2 or \
                r.delta.shape[0] != r.indices.shape[0]:
            raise LoraError(f"{path}: key {first!r}: token indices {list(r.indices.shape)} ({r.indices.dtype}) and "
                            f"delta {list(r.delta.shape)}: needs integer indices (k,) and a delta (k, d)")
        if len(set(r.indices.tolist())) != r.indices.shape[0]:
            raise LoraError(f"{path}: key {first!r}: a token index appears twice")
    return rows


def _check_finite(tensors: dict, path: Path) -> None:
    import torch

    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise LoraError(f"{path}: tensor {key!r} holds NaN or infinite values")


def _check_ranks(layers: dict, path: Path) -> None:
    for lay in layers.values():
        rank = lay.down.shape[0] if lay.down.dim() >= 2 else 0
        if rank < 1 or lay.up.dim() < 2 or lay.up.shape[1] != rank:
            raise LoraError(f"{path}: {lay.keys[0]}: rank {rank} (down {tuple(lay.down.shape)}, up "
                            f"{tuple(lay.up.shape)}): a LoRA layer needs a rank of at least 1 shared by both")
        if lay.alpha is not None and not math.isfinite(lay.alpha):
            raise LoraError(f"{path}: {lay.keys[0]}: alpha {lay.alpha} is not a finite number")


# alpha_pattern keys are module names or dotted suffixes of them, matched as text: a key is never run as a
# regular expression, so a hostile one (catastrophic backtracking, invalid syntax) cannot hang or crash a load.
_PATTERN_KEY = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
MAX_PATTERN_KEY = 512


def _check_pattern_key(pattern: object, path: Path) -> str:
    if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN_KEY or not _PATTERN_KEY.fullmatch(pattern):
        shown = repr(pattern)[:80] + ("..." if len(repr(pattern)) > 80 else "")
        raise LoraError(f"{path}: alpha_pattern key {shown}: sdedge reads alpha_pattern keys as module names or "
                        f"dotted suffixes of them (letters, digits, _ and -, separated by dots; at most "
                        f"{MAX_PATTERN_KEY} characters), not as regular expressions")
    return pattern


def _pattern_match(pattern: str, module: str) -> bool:
    return module == pattern or module.endswith("." + pattern)


def _apply_metadata_alphas(layers: dict, header: dict[str, str], path: Path) -> None:
    raw = header.get("lora_adapter_metadata")
    if not raw:
        return
    try:
        meta = parse_json(raw.encode("utf-8"), f"{path}: lora_adapter_metadata header")
    except ConfigError as e:  # not JSON, NaN, nested thousands deep: named, never a traceback
        raise LoraError(f"corrupt {e}") from None
    if not isinstance(meta, dict):
        return
    for (comp, module), lay in layers.items():
        if lay.kohya or lay.alpha is not None:
            continue
        prefix = f"{comp}." if comp else ""
        def get(k, prefix=prefix):
            return meta.get(prefix + k, meta.get(k))

        if get("use_dora"):
            raise LoraError(f"{path}: a DoRA adapter ({prefix}use_dora): plain LoRA only")
        alpha = get("lora_alpha")
        patterns = get("alpha_pattern") or {}
        if not isinstance(patterns, dict):
            raise LoraError(f"{path}: {prefix}alpha_pattern is not an object of module name -> alpha")
        for pattern, value in patterns.items():
            if _pattern_match(_check_pattern_key(pattern, path), module):
                alpha = value
        if alpha is not None:
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
                raise LoraError(f"{path}: {module}: alpha {alpha!r} in lora_adapter_metadata is not a finite number")
            rank = lay.down.shape[0]
            lay.alpha = float(alpha) * (math.sqrt(rank) if get("use_rslora") else 1.0)  # rsLoRA: alpha / sqrt(r)


# --- matching against the pipeline ------------------------------------------------------------------------------


def _targets(model) -> dict[str, Any]:
    import torch

    out = {}
    for name, mod in model.named_modules():
        base = getattr(mod, "base_layer", None)
        if isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
            out[name] = base
        elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and ".base_layer" not in name and \
                not re.search(r"\.lora_[AB]\.", name + "."):
            out[name] = mod
    return out


def _aliases(component: str, model, targets: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """(dotted aliases, kohya underscore aliases) -> module path in the model."""
    dotted: dict[str, str] = {}
    kohya: dict[str, str] = {}
    ambiguous: set[str] = set()

    def add_kohya(name: str, path: str):
        u = name.replace(".", "_")
        if u in kohya and kohya[u] != path:
            ambiguous.add(u)
        kohya[u] = path

    has_text_model = hasattr(model, "text_model")
    for path in targets:
        dotted[path] = path
        add_kohya(path, path)
        if component.startswith("text_encoder"):
            alt = path[len("text_model."):] if path.startswith("text_model.") else "text_model." + path
            if not has_text_model or path.startswith("text_model."):
                dotted[alt] = path
                add_kohya(alt, path)
        if component == "unet":
            try:
                from .single_file import unet_key_to_ldm

                ldm = unet_key_to_ldm(path + ".weight", model.config).removesuffix(".weight")
                dotted.setdefault(ldm, path)
                add_kohya(ldm, path)
            except Exception:  # noqa: BLE001 - modules with no LDM name (or another architecture)
                pass
    for u in ambiguous:
        kohya.pop(u, None)
    return dotted, kohya


def _shape_fit(weight_shape, down, up) -> tuple[bool, tuple]:
    """Whether up @ down fits a weight of `weight_shape` (linear (out, in) or convolution (out, in, kh, kw));
    returns (fits, the down shape that would fit). Linear LoRAs stored as 1x1 convolutions fit linear weights."""
    out_f, in_f, kernel = weight_shape[0], weight_shape[1], tuple(weight_shape[2:])
    r = down.shape[0]
    expected = (r, in_f, *kernel)
    if down.dim() < 2 or up.dim() < 2:
        return False, expected
    d_kernel = tuple(down.shape[2:])
    kernel_ok = d_kernel == kernel or (all(k == 1 for k in d_kernel) and all(k == 1 for k in kernel))
    up_ok = up.shape[0] == out_f and up.shape[1] == r and all(k == 1 for k in up.shape[2:])
    return down.shape[1] == in_f and kernel_ok and up_ok, expected


def _delta(weight, down, up):
    import torch

    d = down.float().reshape(down.shape[0], -1)
    u = up.float().reshape(up.shape[0], -1)
    return (u @ d).reshape(weight.shape).to(torch.float32)


def _resolve(lora: LoraFile, tables) -> tuple[list[tuple[str, str, LoraLayer]], list[tuple[str, str]]]:
    """[(component, module path, layer)] and [(key, reason)] of keys that match no module."""
    resolved, unmatched = [], []
    sdxl_pipe = bool(tables["text_encoder_2"][0])
    for (comp, name), lay in sorted(lora.layers.items(), key=lambda kv: (kv[0][0] or "", kv[0][1])):
        comps = [comp] if comp else list(COMPONENTS)
        hit = None
        if not sdxl_pipe and lay.keys[0].startswith(("lora_te1_", "lora_te2_")):
            unmatched.extend((k, "an SDXL text-encoder key (lora_te1_/lora_te2_): this LoRA is for SDXL, the "
                                 "pipeline is SD 1.x") for k in lay.keys)
            continue
        for c in comps:
            dotted, kohya = tables[c]
            path = kohya.get(name) if lay.kohya else dotted.get(name)
            if path is not None:
                hit = (c, path)
                break
        if hit is None:
            where = comp or "unet or text_encoder"
            sdxl = any(lay.keys[0].startswith(h) or f".{h}" in lay.keys[0] for h in _SDXL_HINT)
            hint = " (an SDXL LoRA?)" if (sdxl or _looks_sdxl(lora)) and not sdxl_pipe else \
                " (an SD 1.x LoRA on an SDXL base?)" if sdxl_pipe and not _looks_sdxl(lora) else ""
            for k in lay.keys:
                unmatched.append((k, f"no module {name!r} in the {where}{hint}"))
            continue
        resolved.append((hit[0], hit[1], lay))
    return resolved, unmatched


def _looks_sdxl(lora: LoraFile) -> bool:
    version = lora.metadata.get("ss_base_model_version", "")
    keys = [k for lay in lora.layers.values() for k in lay.keys] + [k for k, _ in lora.unmatched]
    return "xl" in version.lower() or any(k.startswith(_SDXL_HINT) for k in keys)


def _check_shapes(lora: LoraFile, resolved, targets_by_comp) -> None:
    for comp, path, lay in resolved:
        weight = targets_by_comp[comp][path].weight
        ok, expected = _shape_fit(tuple(weight.shape), lay.down, lay.up)
        if not ok:
            down_key = next((k for k in lay.keys if "down" in k or "lora_A" in k), lay.keys[0])
            if targets_by_comp.get("text_encoder_2"):  # an SDXL pipeline
                hint = "" if _looks_sdxl(lora) else " (an SD 1.x LoRA on an SDXL base?)"
            else:
                hint = " (an SDXL LoRA on an SD1.x base?)" if _looks_sdxl(lora) or lay.down.shape[-1] in (1280, 2048) \
                    else ""
            raise LoraError(
                f"{lora.path}: key {down_key!r} does not fit {comp} module {path!r}{hint}: the LoRA has down "
                f"{list(lay.down.shape)} and up {list(lay.up.shape)}, the module's weight is {list(weight.shape)} "
                f"(a down of [rank, {', '.join(map(str, expected[1:]))}] would fit): a LoRA made for another base"
            )


# --- fusing -------------------------------------------------------------------------------------------------------


def _embeddings(model) -> dict[str, Any]:
    """{module path: embedding} of a model's token embeddings (the rows `trainable_tokens_delta` changes)."""
    import torch

    return {name: mod for name, mod in model.named_modules() if isinstance(mod, torch.nn.Embedding)
            and name.endswith("token_embedding")}


def _resolve_tokens(lora: LoraFile, models: dict) -> tuple[list[tuple[str, str, TokenRows]], list[tuple[str, str]]]:
    """[(component, embedding path, rows)] and [(key, reason)] of token rows that match no embedding; rows that do
    not fit their embedding (another width, an index past its vocabulary) are a LoraError naming the key."""
    resolved, unmatched = [], []
    for (comp, module), rows in sorted(lora.tokens.items(), key=lambda kv: (kv[0][0] or "", kv[0][1])):
        hit = None
        for c in [comp] if comp else ["text_encoder", "text_encoder_2"]:
            embeds = _embeddings(models[c]) if models.get(c) is not None else {}
            names = {module, module.removeprefix("text_model."), "text_model." + module}
            hit = next(((c, p, e) for p, e in embeds.items() if p in names), None)
            if hit:
                break
        if hit is None:
            unmatched.extend((k, f"no token embedding {module!r} in the {comp or 'text encoders'}") for k in rows.keys)
            continue
        c, p, emb = hit
        vocab, width = emb.weight.shape
        bad = [i for i in rows.indices.tolist() if not 0 <= i < vocab]
        if rows.delta.shape[1] != width or bad:
            raise LoraError(f"{lora.path}: key {rows.keys[0]!r} does not fit {c} module {p!r} ({vocab} tokens of width "
                            f"{width}): delta {list(rows.delta.shape)}" + (f", token index {bad[0]}" if bad else "")
                            + ": trained token rows made for another base")
        resolved.append((c, p, rows))
    return resolved, unmatched


def _deltas(plan, modules_by_comp) -> dict[tuple[str, str], Any]:
    """{(component, module path): the sum of every planned LoRA's scaled change to that weight}."""
    import torch

    deltas: dict[tuple[str, str], Any] = {}

    def add(key, d):
        deltas[key] = d if key not in deltas else deltas[key] + d

    for _, scale, resolved, _, tokens in plan:
        for comp, path, lay in resolved:
            weight = modules_by_comp[comp][path].weight
            rank = lay.down.shape[0]
            alpha = lay.alpha if lay.alpha is not None else float(rank)
            add((comp, path), _delta(weight, lay.down, lay.up) * (scale * alpha / rank))
        for comp, path, rows in tokens:  # E[i] = E_base[i] + scale · delta
            d = torch.zeros(modules_by_comp[comp][path].weight.shape, dtype=torch.float32)
            add((comp, path), d.index_add_(0, rows.indices.long(), rows.delta.float() * scale))
    return deltas


def _restore(model) -> None:
    import torch

    store = model.__dict__.get(_BASE_ATTR)
    if not store:
        return
    targets = {**_targets(model), **_embeddings(model)}
    with torch.no_grad():
        for path, w in store.items():
            targets[path].weight.copy_(w)


def unfuse_loras(pipe) -> None:
    """Put back the base weights of every module an earlier `fuse_loras` changed."""
    for comp in COMPONENTS:
        model = getattr(pipe, comp, None)
        if model is not None:
            _restore(model)
            model.__dict__.pop(_BASE_ATTR, None)


def fuse_loras(pipe, loras, *, strict: bool = True) -> FuseReport:
    """Fuse `loras` ([(path, scale), ...] or ["path:scale", ...]) into `pipe.unet` / `pipe.text_encoder`.

    Weights are recomputed from the base (an earlier fuse is undone first). With `strict` (the default) a key
    that matches no module is a `LoraError` naming it; otherwise it is listed in the report. A shape mismatch is
    always an error. Nothing changes unless everything checks."""
    import torch

    items = [parse_lora_arg(x) if isinstance(x, str) else (str(x[0]), float(x[1])) for x in loras]
    models = {c: getattr(pipe, c, None) for c in COMPONENTS}
    if models["unet"] is None:
        raise LoraError("the pipeline has no UNet to fuse LoRAs into")
    targets_by_comp = {c: _targets(m) if m is not None else {} for c, m in models.items()}
    tables = {c: _aliases(c, m, targets_by_comp[c]) if m is not None else ({}, {}) for c, m in models.items()}
    modules_by_comp = {c: {**targets_by_comp[c], **(_embeddings(m) if m is not None else {})} for c, m in models.items()}

    plan: list[tuple[LoraFile, float, list, list, list]] = []
    for path, scale in items:
        if not math.isfinite(scale):
            raise LoraError(f"{path}: scale {scale} is not a finite number")
        lora = read_lora(path)
        resolved, unmatched = _resolve(lora, tables)
        tokens, token_unmatched = _resolve_tokens(lora, models)
        unmatched = lora.unmatched + unmatched + token_unmatched
        if unmatched and strict:
            key, reason = sorted(unmatched)[0]
            more = f" ({len(unmatched) - 1} more unmatched key(s))" if len(unmatched) > 1 else ""
            matched = sum(len(lay.keys) for _, _, lay in resolved) + sum(len(r.keys) for _, _, r in tokens)
            raise LoraError(f"{lora.path}: key {key!r}: {reason}{more}; {matched} of {lora.key_count} keys "
                            "matched a module. Nothing was fused")
        _check_shapes(lora, resolved, targets_by_comp)
        plan.append((lora, scale, resolved, unmatched, tokens))

    # Everything checks: undo an earlier fuse, then W = W_base + sum of deltas.
    deltas = _deltas(plan, modules_by_comp)
    with torch.no_grad():
        for comp, model in models.items():
            if model is None:
                continue
            _restore(model)
            store = model.__dict__.setdefault(_BASE_ATTR, {})
            for (c, path), d in deltas.items():
                if c != comp:
                    continue
                weight = modules_by_comp[comp][path].weight
                if path not in store:
                    store[path] = weight.detach().clone()
                base = store[path]
                weight.copy_((base.float() + d).to(weight.dtype))

    present = [c for c in COMPONENTS if models.get(c) is not None]  # an SD1.5 pipeline has no text_encoder_2
    fused = []
    for lora, scale, resolved, unmatched, tokens in plan:
        per_comp = {c: sum(1 for comp, _, _ in resolved if comp == c) for c in present}
        matched_keys = sum(len(lay.keys) for _, _, lay in resolved) + sum(len(r.keys) for _, _, r in tokens)
        fused.append(FusedLora(path=str(lora.path), sha256=lora.sha256, scale=scale, format=lora.format,
                               keys=lora.key_count, matched_keys=matched_keys, layers=per_comp, unmatched=unmatched,
                               tokens=sum(int(r.indices.numel()) for _, _, r in tokens)))
    modules = {c: sum(1 for (comp, _) in deltas if comp == c) for c in present}
    return FuseReport(loras=fused, modules=modules)
