"""`sdedge prepare`: a folder of images with captions in, a clean training set out.

    photos/ ─► captions (.txt | metadata.jsonl | metadata.csv | --caption-model BLIP)
            ─► safe open (JPEG/PNG/TIFF/WebP, bomb guard, 16-bit scaled, ICC/CMYK to sRGB, transparency on --background)
            ─► --min-size ─► resize + centre-crop (or aspect buckets) ─► exact / near-duplicate removal
            ─► optional augmented copies ─► data/images/*.png, data/captions/*.txt, data/metadata.json

Every input file ends up either kept or in the report with its reason: corrupt files, non-images,
unsupported formats, images without captions, unreadable or oversized caption files, symbolic links that leave the
input folder, too-small images and duplicates never stop the run. Output
images are PNGs built from the decoded pixels alone, so EXIF (GPS included) and all other metadata are gone.
The output is written to a temporary folder and renamed into place. An input with nothing usable is an error.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdedge.runtime.documents import DocumentType
from sdedge.runtime.errors import BadInput, SdedgeError
from sdedge.runtime.files import check_replaceable, staged_dir
from sdedge.runtime.strict import NonNegative

from .captions import METADATA_FILES, Captioner, read_captions, txt_caption
from .dedup import clip_embeddings, find_duplicates, phash, pixel_sha256
from .hashing import combined_sha256, sha256_bytes, sha256_file
from .images import AUGMENTS, ImageSkip, bucket_sizes, fit, nearest_bucket, open_image

__all__ = ["PrepareOptions", "PrepareReport", "prepare_dataset", "DATA_FORMAT", "DATA_VERSION", "DATASET",
           "DatasetMetadata", "DataItem"]

DATA_FORMAT = "sdedge-data"
DATA_VERSION = 1
METADATA_NAME = "metadata.json"


@dataclass(frozen=True)
class DataItem:
    """One training image of metadata.json: its files (relative to the dataset), their SHA-256 and its source."""

    image: str
    caption: str
    text: str
    width: NonNegative
    height: NonNegative
    sha256: str
    caption_sha256: str
    phash: str | None  # None for an augmented copy
    source: str
    source_sha256: str
    source_format: str
    source_size: tuple[int, int]
    augment: str | None = None  # the augmentation of an augmented copy
    of: str | None = None  # the image an augmented copy was made from
    caption_by: str = "file"  # "file", or "model" (--caption-model); datasets before --caption-model: file


@dataclass(frozen=True)
class Skipped:
    source: str
    reason: str


@dataclass(frozen=True)
class Counts:
    inputs: NonNegative
    kept: NonNegative
    augmented: NonNegative
    skipped: NonNegative


@dataclass(frozen=True)
class DatasetMetadata:
    """A prepared dataset's metadata.json (format "sdedge-data", version 1)."""

    created: str  # ISO 8601, UTC
    source: str  # the input folder
    resolution: NonNegative
    buckets: bool
    options: dict[str, Any]  # the PrepareOptions it was prepared with (min_size resolved)
    counts: Counts
    items: tuple[DataItem, ...]
    dataset_sha256: str | None = None  # the combined SHA-256 of its files (trainer/hashing.py)
    skipped: tuple[Skipped, ...] = ()
    caption_model: dict[str, Any] | None = None  # --caption-model's name and settings, and how many it captioned


DATASET = DocumentType(DatasetMetadata, DATA_FORMAT, DATA_VERSION, METADATA_NAME)


@dataclass(frozen=True)
class PrepareOptions:
    resolution: int = 512
    min_size: int | None = None  # shorter side in pixels; default: half the resolution
    buckets: bool = False
    dedup: float | None = 0.95  # similarity threshold (pHash, and CLIP cosine with clip_model); None: off
    clip_model: str | None = None
    augment: tuple[str, ...] = ()
    seed: int = 0
    max_pixels: int | None = None  # may only lower Pillow's decompression-bomb limit
    background: str = "white"  # what transparent pixels are composited on (a Pillow colour: name or #rrggbb)
    caption_model: str | None = None  # local BLIP / BLIP-2 folder: captions the images that have none
    caption_prefix: str = ""  # put before each generated caption (a trigger word)
    overwrite: bool = False


@dataclass
class PrepareReport:
    out: Path
    kept: int
    augmented: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)
    dataset_sha256: str = ""

    @property
    def images(self) -> int:
        return self.kept + self.augmented


@dataclass
class _Item:
    source: str
    caption: str
    source_sha256: str
    source_format: str
    source_size: tuple[int, int]
    size: tuple[int, int]
    pixel_sha256: str
    phash: int
    staged: Path  # processed PNG in the staging folder
    caption_by: str = "file"  # "file", or "model" (--caption-model)


def _check_options(o: PrepareOptions) -> None:
    if o.resolution < 8 or o.resolution % 8:
        raise BadInput(f"--resolution {o.resolution}: must be a positive multiple of 8")
    if o.buckets and o.resolution % 64:
        raise BadInput(f"--buckets needs a --resolution that is a multiple of 64, got {o.resolution}")
    if o.min_size is not None and o.min_size < 0:
        raise BadInput(f"--min-size {o.min_size}: must be >= 0")
    if o.dedup is not None and not 0 < o.dedup <= 1:
        raise BadInput(f"--dedup {o.dedup}: a similarity threshold in (0, 1], e.g. 0.95")
    bad = [a for a in o.augment if a not in AUGMENTS]
    if bad:
        raise BadInput(f"--augment {bad[0]!r}: choose from {', '.join(AUGMENTS)}")
    if o.max_pixels is not None and o.max_pixels < 1:
        raise BadInput(f"max_pixels {o.max_pixels}: must be positive")
    if o.caption_prefix.strip() and not o.caption_model:
        raise BadInput("--caption-prefix needs --caption-model (it is put before the captions the model writes)")
    _background(o.background)


def _background(colour: str) -> tuple[int, int, int]:
    from PIL import ImageColor

    try:
        return ImageColor.getrgb(colour)[:3]
    except (ValueError, AttributeError):
        raise BadInput(f"--background {colour!r}: not a colour (a name such as white, or #rrggbb)") from None


def _safe_name(rel: str, used: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(Path(rel).with_suffix("")).replace("/", "_")).strip("._") or "image"
    name, n = stem, 2
    while name.lower() in used:
        name, n = f"{stem}-{n}", n + 1
    used.add(name.lower())
    return name


def _walk(src: Path, exclude: Path | None) -> tuple[list[Path], list[tuple[str, str]]]:
    """The files under `src` (hidden ones and `exclude` left out), and the symbolic links that leave `src`
    (reported, never read)."""
    files, outside = [], []
    root = src.resolve()
    for dirpath, dirnames, filenames in os.walk(src):
        d = Path(dirpath)
        for n in sorted(dirnames + filenames):
            p = d / n
            if not n.startswith(".") and p.is_symlink() and not p.resolve().is_relative_to(root):
                outside.append((p.relative_to(src).as_posix(), "a symbolic link to outside the input folder: "
                                "not read"))
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and not (d / n).is_symlink()
                             and (exclude is None or (d / n).resolve() != exclude))
        files += [d / n for n in filenames if not n.startswith(".") and
                  not ((d / n).is_symlink() and not (d / n).resolve().is_relative_to(root))]
    return sorted(files, key=lambda p: p.relative_to(src).as_posix()), outside


@dataclass(frozen=True)
class _Reading:
    """What every input image is read against: the options resolved once per run."""

    src: Path
    opts: PrepareOptions
    min_size: int
    buckets: list[tuple[int, int]]
    background: tuple[int, int, int]
    captioner: Any  # a Captioner with --caption-model, else None
    captions: dict[str, str]  # from metadata.jsonl / metadata.csv
    log: Any


def prepare_dataset(src: str | Path, out: str | Path, opts: PrepareOptions = PrepareOptions(),
                    log=None) -> PrepareReport:
    """Prepare `src` into `out`; returns the report (also written to out/metadata.json)."""
    _check_options(opts)
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise SdedgeError(f"input folder not found: {src}")
    if out.resolve() == src.resolve():
        raise SdedgeError(f"--out {out} must not be the input folder {src}")
    # a non-empty --out is replaced only with --overwrite, when it is a dataset sdedge prepared and holds no input
    check_replaceable(out, {METADATA_NAME: DATASET}, (src,), overwrite=opts.overwrite)
    min_size = opts.resolution // 2 if opts.min_size is None else opts.min_size
    buckets = bucket_sizes(opts.resolution) if opts.buckets else [(opts.resolution, opts.resolution)]
    log = log or (lambda msg: None)

    background = _background(opts.background)
    captioner = Captioner(opts.caption_model, opts.caption_prefix) if opts.caption_model else None
    captions, skipped = read_captions(src)
    reading = _Reading(src, opts, min_size, buckets, background, captioner, captions, log)
    candidates, rel_of = _candidates(src, out, captions, skipped)

    with staged_dir(out) as stage:
        (stage / "images").mkdir()
        (stage / "captions").mkdir()
        items = _read_images(reading, stage, candidates, rel_of, skipped)
        items = _drop_duplicates(items, opts, skipped)
        if not items:
            reasons = "; ".join(f"{s}: {r}" for s, r in skipped[:8]) or "the folder holds no files"
            more = f" (and {len(skipped) - 8} more)" if len(skipped) > 8 else ""
            raise SdedgeError(f"no usable images in {src}: {reasons}{more}")
        entries = _write_entries(stage, items, opts)
        meta = _metadata(reading, entries, items, len(candidates), skipped)
        DATASET.write(stage / METADATA_NAME, meta)
    return PrepareReport(out=out, kept=meta.counts.kept, augmented=meta.counts.augmented, skipped=skipped,
                         dataset_sha256=meta.dataset_sha256)


def _candidates(src: Path, out: Path, captions: dict[str, str],
                skipped: list[tuple[str, str]]) -> tuple[list[Path], dict[Path, str]]:
    """The input files that may be images, and each file's path relative to `src`; the files that cannot be
    (captions without an image, links out of the folder, metadata rows without a file) go to `skipped`."""
    files, outside = _walk(src, out.resolve())
    skipped += outside
    rel_of = {p: p.relative_to(src).as_posix() for p in files}
    candidates = [p for p in files if p.suffix.lower() != ".txt" and p.name not in METADATA_FILES]
    candidate_stems = {p.with_suffix("") for p in candidates}
    for p in files:
        if p.suffix.lower() == ".txt" and p.with_suffix("") not in candidate_stems:
            skipped.append((rel_of[p], "caption without an image"))
    found = {rel_of[p] for p in candidates}
    for rel in sorted(set(captions) - found):
        skipped.append((rel, "listed in metadata but not found"))
    return candidates, rel_of


def _read_one(r: _Reading, path: Path, rel: str):
    """(image, format, caption, who wrote the caption) of one input; ImageSkip with the reason when it is not kept."""
    image, fmt = open_image(path, r.opts.max_pixels, r.background)
    if rel in r.captions:
        caption = r.captions[rel]
    else:
        try:
            caption = txt_caption(path, r.src)
        except ValueError as e:
            raise ImageSkip(str(e)) from None
        if caption is None and r.captioner is None:
            raise ImageSkip("no caption (no same-name .txt, not in metadata.jsonl/metadata.csv; "
                            "--caption-model writes one)")
    caption_by = "file" if caption is not None else "model"
    if caption is not None:
        caption = " ".join(caption.split())
        if not caption:
            raise ImageSkip("empty caption")
    w, h = image.size
    if min(w, h) < r.min_size:
        raise ImageSkip(f"too small: {w}x{h}, shorter side under --min-size {r.min_size}")
    if caption is None:  # captioned after the cheap checks
        caption = r.captioner.caption([image])[0]
        if not caption:
            raise ImageSkip("the caption model wrote nothing")
        r.log(f"captioned {rel}: {caption}")
    return image, fmt, caption, caption_by


def _read_images(r: _Reading, stage: Path, candidates: list[Path], rel_of: dict[Path, str],
                 skipped: list[tuple[str, str]]) -> list[_Item]:
    """Each candidate read, checked and fitted to its bucket as a staged PNG; the ones not kept go to `skipped`."""
    items: list[_Item] = []
    for n, path in enumerate(candidates):
        rel = rel_of[path]
        try:
            image, fmt, caption, caption_by = _read_one(r, path, rel)
        except ImageSkip as e:
            skipped.append((rel, str(e)))
            continue
        w, h = image.size
        size = nearest_bucket(w, h, r.buckets)
        fitted = fit(image, *size)
        staged = stage / "images" / f".{n:06d}.png"
        fitted.save(staged, format="PNG", optimize=False)
        items.append(_Item(rel, caption, sha256_file(path), fmt, (w, h), size, pixel_sha256(fitted),
                           phash(fitted), staged, caption_by))
        r.log(f"read {rel}")
    return items


def _drop_duplicates(items: list[_Item], opts: PrepareOptions, skipped: list[tuple[str, str]]) -> list[_Item]:
    """The items without their exact and near duplicates (--dedup, --clip-model); each dropped one goes to
    `skipped` naming the item it duplicates."""
    if opts.dedup is None or len(items) <= 1:
        return items
    embeddings = None
    if opts.clip_model:
        from PIL import Image

        imgs = []
        for it in items:
            with Image.open(it.staged) as im:
                imgs.append(im.convert("RGB"))
        embeddings = clip_embeddings(opts.clip_model, imgs)
    dups = find_duplicates([it.pixel_sha256 for it in items], [it.phash for it in items], opts.dedup,
                           embeddings)
    drop = set()
    for d in dups:
        what = "exact duplicate" if d.how == "exact" else f"near duplicate ({d.how} similarity {d.similarity:.3f})"
        skipped.append((items[d.index].source, f"{what} of {items[d.of].source}"))
        items[d.index].staged.unlink()
        drop.add(d.index)
    return [it for i, it in enumerate(items) if i not in drop]


def _write_entries(stage: Path, items: list[_Item], opts: PrepareOptions) -> list[dict]:
    """The kept images and captions under their final names, and their augmented copies (--augment): one
    metadata entry (DataItem's fields) each."""
    entries, used = [], set()
    rng = random.Random(opts.seed)
    for it in items:
        name = _safe_name(it.source, used)
        image_rel, caption_rel = f"images/{name}.png", f"captions/{name}.txt"
        os.replace(it.staged, stage / image_rel)
        caption_bytes = (it.caption + "\n").encode("utf-8")
        (stage / caption_rel).write_bytes(caption_bytes)
        base = dict(image=image_rel, caption=caption_rel, text=it.caption, width=it.size[0], height=it.size[1],
                    sha256=sha256_file(stage / image_rel), caption_sha256=sha256_bytes(caption_bytes),
                    phash=f"{it.phash:048x}", source=it.source, source_sha256=it.source_sha256,
                    source_format=it.source_format, source_size=list(it.source_size), augment=None, of=None,
                    caption_by=it.caption_by)
        entries.append(base)
        if opts.augment:
            from PIL import Image

            from .images import augment

            with Image.open(stage / image_rel) as im:
                fitted = im.convert("RGB")
            for kind in opts.augment:
                aug_name = _safe_name(f"{name}-{kind}", used)
                aug_rel, aug_cap = f"images/{aug_name}.png", f"captions/{aug_name}.txt"
                augment(fitted, kind, rng).save(stage / aug_rel, format="PNG")
                (stage / aug_cap).write_bytes(caption_bytes)
                entries.append({**base, "image": aug_rel, "caption": aug_cap, "sha256": sha256_file(stage / aug_rel),
                                "phash": None, "augment": kind, "of": image_rel})
    return entries


def _metadata(r: _Reading, entries: list[dict], items: list[_Item], inputs: int,
              skipped: list[tuple[str, str]]) -> DatasetMetadata:
    """metadata.json's document: the run's options, counts, every entry, every skipped input and why."""
    files_sha = [(e["image"], e["sha256"]) for e in entries] + [(e["caption"], e["caption_sha256"]) for e in entries]
    kept = sum(1 for e in entries if e["augment"] is None)
    options = {**asdict(r.opts), "min_size": r.min_size, "augment": list(r.opts.augment)}
    options.pop("overwrite", None)
    return DatasetMetadata(
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        source=str(r.src.resolve()),
        resolution=r.opts.resolution,
        buckets=r.opts.buckets,
        options=options,
        counts=Counts(inputs=inputs, kept=kept, augmented=len(entries) - kept, skipped=len(skipped)),
        dataset_sha256=combined_sha256(files_sha),
        items=tuple(DataItem(**e) for e in entries),
        skipped=tuple(Skipped(s, why) for s, why in skipped),
        caption_model={**r.captioner.info, "captioned": sum(1 for it in items if it.caption_by == "model")}
        if r.captioner else None,
    )
