"""Captions of an image folder: same-name `.txt` files, or a `metadata.jsonl` / `metadata.csv` with the columns
`file_name` and `text` (the layout of Hugging Face's imagefolder; `caption` is read as an alias of `text`).

`read_captions(folder)` returns {relative image path: caption} from the metadata file (paths relative to the
folder holding it) and a list of (source, reason) problems found on the way, such as a bad line.
Same-name `.txt` captions are looked up per image with `txt_caption(path)`; a metadata entry wins over a `.txt`.
A caption file that is not UTF-8, is over its size cap (`MAX_TXT_BYTES`, `MAX_METADATA_BYTES`) or is a symbolic
link leaving the folder is not read: it becomes a (source, reason) problem, never the end of the run.

Images with no caption at all can be captioned by a local BLIP or BLIP-2 model (`sdedge prepare --caption-model
DIR`, a transformers folder with safetensors weights, loaded with local_files_only: never the network):
`Captioner(DIR, prefix)` writes "<prefix> <generated caption>" (greedy decoding, so the same model gives the same
captions), and `Captioner.info` is what metadata.json records: the folder, its model type and the SHA-256 of its
weight files.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from sdedge.runtime.errors import SdedgeError

from .hashing import combined_sha256, sha256_file

__all__ = ["METADATA_FILES", "read_captions", "txt_caption", "Captioner", "CAPTION_MODEL_TYPES"]

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
MAX_TXT_BYTES = 64 * 1024  # a caption is a sentence or two; CLIP reads 77 tokens of it
MAX_METADATA_BYTES = 64 * 1024 * 1024
_TEXT_KEYS = ("text", "caption")


def _norm(rel: str) -> str:
    rel = rel.strip().replace("\\", "/")
    while rel.startswith("./"):
        rel = rel[2:]
    return rel


def _pick_text(row: dict) -> str | None:
    for key in _TEXT_KEYS:
        if isinstance(row.get(key), str):
            return row[key]
    return None


def read_captions(folder: Path) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Captions from metadata files anywhere under `folder`, keyed by path relative to `folder`."""
    captions: dict[str, str] = {}
    problems: list[tuple[str, str]] = []
    for meta in sorted(p for p in folder.rglob("metadata.*") if p.name in METADATA_FILES):
        here = meta.parent
        rel_meta = meta.relative_to(folder).as_posix()
        try:
            text = read_text_capped(meta, MAX_METADATA_BYTES, folder)
        except ValueError as e:
            problems.append((rel_meta, f"{e}: its captions are not used"))
            continue
        rows: list[tuple[int, dict]] = []
        if meta.suffix == ".jsonl":
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    problems.append((f"{rel_meta}:{n}", f"bad JSON line: {e.msg}"))
                    continue
                if not isinstance(row, dict):
                    problems.append((f"{rel_meta}:{n}", "line is not a JSON object"))
                    continue
                rows.append((n, row))
        else:
            reader = csv.DictReader(text.splitlines())
            if not reader.fieldnames or "file_name" not in reader.fieldnames:
                raise SdedgeError(f"{meta}: needs a header row with the columns file_name and text")
            rows = [(n, row) for n, row in enumerate(reader, 2)]
        for n, row in rows:
            name, caption = row.get("file_name"), _pick_text(row)
            if not isinstance(name, str) or not name.strip():
                problems.append((f"{rel_meta}:{n}", "no file_name"))
                continue
            if caption is None:
                problems.append((f"{rel_meta}:{n}", f"no text for {name}"))
                continue
            rel = (here.relative_to(folder) / _norm(name)).as_posix() if here != folder else _norm(name)
            if rel in captions and captions[rel] != caption:
                problems.append((f"{rel_meta}:{n}", f"second caption for {rel} ignored"))
                continue
            captions[rel] = caption
    return captions, problems


def read_text_capped(path: Path, cap: int, root: Path) -> str:
    """The UTF-8 text of `path` (a BOM dropped); ValueError with the reason when it is a symbolic link out of
    `root`, over `cap` bytes, not UTF-8, or unreadable."""
    if path.is_symlink() and not path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{path.name} is a symbolic link to outside the input folder")
    try:
        with open(path, "rb") as f:
            data = f.read(cap + 1)
    except OSError as e:
        raise ValueError(f"cannot read {path.name}: {e}") from None
    if len(data) > cap:
        raise ValueError(f"{path.name} is over the {cap}-byte limit of a caption file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path.name} is not UTF-8 text (byte {e.start})") from None


def txt_caption(image: Path, root: Path | None = None) -> str | None:
    """The caption in `image`'s same-name .txt file, None when there is none; ValueError with the reason when
    it is unreadable, not UTF-8, over `MAX_TXT_BYTES` or a symbolic link out of `root` (default: its folder)."""
    txt = image.with_suffix(".txt")
    if not txt.is_file():
        return None
    try:
        return read_text_capped(txt, MAX_TXT_BYTES, root or image.parent)
    except ValueError as e:
        raise ValueError(f"caption file {e}") from None


# -- captions from a local BLIP / BLIP-2 model ------------------------------------------------------------------
CAPTION_MODEL_TYPES = {"blip": ("BlipForConditionalGeneration", "BlipProcessor"),
                       "blip-2": ("Blip2ForConditionalGeneration", "Blip2Processor")}


def _caption_model_type(folder: Path) -> str:
    """The model_type of a BLIP / BLIP-2 folder; SdedgeError naming the folder and what it is otherwise."""
    what = "a local BLIP or BLIP-2 model in transformers' layout"
    if not folder.is_dir():
        raise SdedgeError(f"--caption-model {folder}: not a folder ({what})")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SdedgeError(f"--caption-model {folder}: no config.json, so not {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SdedgeError(f"--caption-model {folder}: config.json unreadable ({e})") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind not in CAPTION_MODEL_TYPES:
        raise SdedgeError(f"--caption-model {folder}: config.json says model_type {kind!r}, not a BLIP or BLIP-2 "
                          f"captioning model ({', '.join(CAPTION_MODEL_TYPES)})")
    return kind


class Captioner:
    """Greedy captions of PIL images from the BLIP / BLIP-2 model in `folder`, each "<prefix> <caption>"."""

    def __init__(self, folder: str | Path, prefix: str = "", max_new_tokens: int = 30):
        self.folder, self.prefix, self.max_new_tokens = Path(folder), " ".join(prefix.split()), max_new_tokens
        self.model_type = _caption_model_type(self.folder)
        weights = sorted(self.folder.glob("*.safetensors"))
        if not weights:
            pickled = sorted(p.name for p in self.folder.glob("*.bin"))
            raise SdedgeError(f"--caption-model {self.folder}: no .safetensors weights"
                              + (f" ({', '.join(pickled)} is a pickle, which sdedge does not load: save the model "
                                 "with safe_serialization=True)" if pickled else ""))
        self.sha256 = combined_sha256((p.name, sha256_file(p)) for p in weights)
        self.weights = [p.name for p in weights]
        self._model, self._processor = self._load()

    def _load(self):
        try:
            import transformers
            from transformers.utils import logging as tl
        except ImportError as e:  # pragma: no cover - the train extra brings it
            raise SdedgeError(f"--caption-model needs torch and transformers (pip install 'sdedge[train]'): {e}") from e
        tl.disable_progress_bar()
        model_cls, processor_cls = (getattr(transformers, n) for n in CAPTION_MODEL_TYPES[self.model_type])
        try:
            processor = processor_cls.from_pretrained(str(self.folder), local_files_only=True)
            model = model_cls.from_pretrained(str(self.folder), local_files_only=True, use_safetensors=True).eval()
        except Exception as e:
            raise SdedgeError(f"--caption-model {self.folder}: cannot load a {self.model_type} captioning model and "
                              f"its processor: {e}") from e
        return model, processor

    @property
    def info(self) -> dict:
        """What metadata.json records about the captioner."""
        return {"path": str(self.folder.resolve()), "model_type": self.model_type, "weights": self.weights,
                "sha256": self.sha256, "prefix": self.prefix, "max_new_tokens": self.max_new_tokens}

    def caption(self, images: list) -> list[str]:
        """One caption per PIL image ("" when the model says nothing; the prefix is added to what it says)."""
        import torch

        inputs = self._processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        with torch.inference_mode():
            ids = self._model.generate(pixel_values=inputs["pixel_values"], max_new_tokens=self.max_new_tokens,
                                       do_sample=False, num_beams=1)
        texts = [" ".join(t.split()) for t in self._processor.batch_decode(ids, skip_special_tokens=True)]
        return [f"{self.prefix} {t}".strip() if t else "" for t in texts]
