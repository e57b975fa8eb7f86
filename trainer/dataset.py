"""A prepared dataset (the output of `sdedge prepare`) and the order training visits it in.

`load_prepared(folder)` reads `metadata.json`, checks every image and caption file against its SHA-256
(naming the file that differs) and returns the items and the dataset's SHA-256.

`BatchPlan` makes the order a pure function of (seed, micro-step): micro-step m belongs to epoch
m // batches_per_epoch, each epoch is a seeded permutation, grouped by image size (aspect buckets) into
global batches of batch_size x world_size images, and process r takes its slice of the global batch. Nothing
depends on earlier steps, so a resumed run visits exactly the images an uninterrupted run would, and
2 processes x batch 1 see the same images as 1 process x batch 2.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from sdedge.runtime.errors import SdedgeError

from .hashing import combined_sha256, sha256_file
from .prepare import DATASET, METADATA_NAME

__all__ = ["Item", "PreparedData", "load_prepared", "BatchPlan", "seed_for", "image_tensor"]


@dataclass(frozen=True)
class Item:
    image: Path
    text: str
    width: int
    height: int


@dataclass(frozen=True)
class PreparedData:
    folder: Path
    items: tuple[Item, ...]
    sha256: str
    resolution: int


def _fail(meta: Path, msg: str) -> SdedgeError:
    return SdedgeError(f"{meta}: {msg}")


def load_prepared(folder: str | Path, verify: bool = True) -> PreparedData:
    folder = Path(folder)
    meta_path = folder / METADATA_NAME
    if not meta_path.is_file():
        raise SdedgeError(f"--data {folder}: no metadata.json; prepare the images first with `sdedge prepare`")
    meta = DATASET.read(meta_path)
    if not meta.items:
        raise _fail(meta_path, "lists no images")
    items, files = [], []
    root = folder.resolve()
    for i, e in enumerate(meta.items):
        for rel in (e.image, e.caption):
            p = (folder / rel).resolve()
            if root not in p.parents:
                raise _fail(meta_path, f"item {i}: path {rel!r} leaves the dataset folder")
            if not p.is_file():
                raise _fail(meta_path, f"item {i}: {rel} is missing")
        if verify:
            for rel, want in ((e.image, e.sha256), (e.caption, e.caption_sha256)):
                got = sha256_file(folder / rel)
                if got != want:
                    raise SdedgeError(f"{folder / rel}: SHA-256 {got[:16]}… differs from metadata.json's {want[:16]}…; "
                                      "the dataset changed after `sdedge prepare` (prepare it again)")
        files += [(e.image, e.sha256), (e.caption, e.caption_sha256)]
        items.append(Item(folder / e.image, e.text, e.width, e.height))
    sha = combined_sha256(files)
    if meta.dataset_sha256 is not None and meta.dataset_sha256 != sha:
        raise _fail(meta_path, "dataset_sha256 does not match its items")
    return PreparedData(folder=folder, items=tuple(items), sha256=sha, resolution=meta.resolution)


def image_tensor(path: Path):
    """A prepared image as a float32 tensor (3, H, W) in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def seed_for(*parts) -> int:
    """A 63-bit seed from any parts (seed, step, slot, ...), the same on every machine and Python."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class BatchPlan:
    def __init__(self, sizes: list[tuple[int, int]], batch_size: int, world_size: int, seed: int):
        self.sizes = list(sizes)
        self.batch_size = batch_size
        self.world_size = world_size
        self.global_batch = batch_size * world_size
        self.seed = seed
        groups: dict[tuple[int, int], int] = {}
        for s in self.sizes:
            groups[s] = groups.get(s, 0) + 1
        self.batches_per_epoch = sum(math.ceil(n / self.global_batch) for n in groups.values())
        self._cache: dict[int, list[list[int]]] = {}

    def _epoch(self, epoch: int) -> list[list[int]]:
        if epoch in self._cache:
            return self._cache[epoch]
        import torch

        g = torch.Generator().manual_seed(seed_for(self.seed, "epoch", epoch))
        perm = torch.randperm(len(self.sizes), generator=g).tolist()
        by_size: dict[tuple[int, int], list[int]] = {}
        for i in perm:
            by_size.setdefault(self.sizes[i], []).append(i)
        batches = []
        for size in sorted(by_size):
            idx = by_size[size]
            n = math.ceil(len(idx) / self.global_batch)
            for b in range(n):  # the last batch of a group wraps around to its start
                batches.append([idx[(b * self.global_batch + j) % len(idx)] for j in range(self.global_batch)])
        order = torch.randperm(len(batches), generator=g).tolist()
        self._cache = {epoch: [batches[k] for k in order]}
        return self._cache[epoch]

    def epoch_of(self, micro_step: int) -> int:
        return micro_step // self.batches_per_epoch

    def global_indices(self, micro_step: int) -> list[int]:
        return self._epoch(self.epoch_of(micro_step))[micro_step % self.batches_per_epoch]

    def local_slots(self, rank: int) -> range:
        return range(rank * self.batch_size, (rank + 1) * self.batch_size)
