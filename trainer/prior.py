"""DreamBooth-style prior preservation for `sdedge train --prior-data DIR --prior-weight w`.

A LoRA trained only on images of a new concept drifts: what the base drew for its other prompts changes too
(on the tiny base, a LoRA that learns purple shifts the base colours, docs/tiny-base.md). DreamBooth's remedy
(Ruiz et al., 2023): images that the *base itself* generated for the class ("class images") are mixed into every
step, and their denoising loss holds the adapted model to what the base did:

    loss = loss(instance micro-batch) + w · loss(prior micro-batch)

DIR is a folder written by `sdedge prepare` from the class images; `write_class_images` renders them (PNG +
caption pairs, the layout `sdedge prepare` reads) with any generator, e.g. the base's own bundle. Real pictures of
the class do better where the base draws it badly: on the tiny base, rendered scenes reduced drift and the base's
own images increased it (docs/training.md, tests/test_prior.py). A prior micro-batch has as many images as an
instance one, drawn by its own plan and its own seeded stream (seed, "prior", micro-step, slot), so a resumed run
sees the same prior batches as an uninterrupted one.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

from sdedge.runtime.errors import SdedgeError

from .adapter import PriorRef
from .batches import Batches, latent_cache, text_cache
from .checkpoint import CheckpointState
from .dataset import BatchPlan, load_prepared, seed_for

__all__ = ["PriorBatches", "prior_batches", "prior_record", "check_prior_resume", "write_class_images"]


class PriorBatches(Batches):
    """The prior data's micro-batches: `Batches` on their own plan and seed stream."""

    stream = "prior"


def prior_batches(trainer) -> PriorBatches | None:
    """The prior stream of a run with `prior_data` (None without): its latents cached as the run caches the
    instance data's, its captions added to the run's text cache."""
    cfg = trainer.cfg
    if not cfg.prior_data:
        return None
    data = load_prepared(cfg.prior_data)
    mine = trainer.data.resolution or trainer.data.items[0].width
    if data.resolution and data.resolution != mine:
        raise SdedgeError(f"--prior-data {cfg.prior_data}: prepared at {data.resolution} px, the training data at "
                          f"{mine} px; prepare both at the same --resolution")
    plan = BatchPlan([(it.width, it.height) for it in data.items], cfg.batch_size, trainer.world,
                     seed_for(cfg.seed, "prior-plan"))
    cache = latent_cache(trainer.vae, data, trainer.device) if cfg.cache_latents else None
    if trainer.text_cache is not None:
        trainer.text_cache.update(text_cache(trainer.text_encoder, trainer.base.tokenizer, data, trainer.device))
    return PriorBatches(cfg, trainer.base, data, plan, trainer.accelerator, cache)


def prior_record(trainer) -> PriorRef | None:
    """What adapter.json and a checkpoint record of the prior data (None without it)."""
    prior = getattr(trainer, "prior", None)
    if prior is None:
        return None
    return PriorRef(sha256=prior.data.sha256, images=len(prior.data.items),
                    path=str(Path(trainer.cfg.prior_data).resolve()), weight=float(trainer.cfg.prior_weight))


def check_prior_resume(cfg, state: CheckpointState, checkpoint: Path) -> None:
    """A run resumes only on the prior data it was interrupted with (same SHA-256)."""
    saved = state.prior.sha256 if state.prior is not None else None
    now = load_prepared(cfg.prior_data).sha256 if cfg.prior_data else None
    if saved != now:
        raise SdedgeError(f"--resume {checkpoint}: the prior data changed since the checkpoint (SHA-256 differs)")


def write_class_images(generate: Callable[[str, int], object], prompts: Sequence[str], out_dir: str | Path,
                       seeds: Sequence[int] = (0,)) -> Path:
    """Class images for `--prior-data`: `generate(prompt, seed)` (an (H, W, 3) uint8 array or a PIL image,
    e.g. from the base's own bundle) for every prompt and seed, written as `0000.png` + `0000.txt` into out_dir
    (the layout `sdedge prepare` reads); returns out_dir."""
    import numpy as np
    from PIL import Image

    from sdedge.runtime.files import atomic_write_bytes, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    i = 0
    for prompt in prompts:
        for seed in seeds:
            image = generate(prompt, seed)
            if not isinstance(image, Image.Image):
                image = Image.fromarray(np.asarray(image, dtype=np.uint8))
            buf = io.BytesIO()
            image.convert("RGB").save(buf, format="PNG")
            atomic_write_bytes(out / f"{i:04d}.png", buf.getvalue())
            atomic_write_text(out / f"{i:04d}.txt", prompt + "\n")
            i += 1
    return out
