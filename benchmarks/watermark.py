"""The watermark's figures: bit accuracy after PNG, JPEG 90/75, 0.5× resizes and crops; PSNR cost; ms per image.

    python -m sdedge.benchmarks.watermark --out benchmarks/results/provenance [--bundle DIR] [--peer-path DIR]

Images: the two photos scikit-learn ships (china.jpg, flower.jpg; centre-cropped, resized to each size) when it
is installed, six procedural photo-like images (1/f spectrum, a saturated disc, a black bar), and, with --bundle,
eight images the bundle generates (unmarked, then marked here). --peer-path: a folder holding the
`invisible-watermark` package (and opencv, PyWavelets) to measure its dwtDct, diffusers' SDXL watermark, on the
same images and payload (it refuses images under 256×256).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from sdedge.runtime import watermark as wm

SIZES = (64, 512)
DIGEST = "5eed" * 16


def _jpeg(a, q):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=q)
    return np.asarray(Image.open(buf).convert("RGB"))


def _resize(a, f, method):
    h, w = a.shape[:2]
    return np.asarray(Image.fromarray(a).resize((round(w * f), round(h * f)), method))


def _crop(a, frac):
    h, w = a.shape[:2]
    dy, dx = max(1, round(h * frac)), max(1, round(w * frac))
    return a[dy:h - dy, dx:w - dx]


ATTACKS = {
    "png": lambda a: a,
    "jpeg90": lambda a: _jpeg(a, 90),
    "jpeg75": lambda a: _jpeg(a, 75),
    "resize0.5_bicubic": lambda a: _resize(a, 0.5, Image.BICUBIC),
    "resize0.5_lanczos": lambda a: _resize(a, 0.5, Image.LANCZOS),
    "resize0.5_bilinear": lambda a: _resize(a, 0.5, Image.BILINEAR),
    "resize0.5_bicubic+jpeg75": lambda a: _jpeg(_resize(a, 0.5, Image.BICUBIC), 75),
    "shift1px": lambda a: a[1:, 1:],
    "crop2%": lambda a: _crop(a, 0.02),
    "crop5%": lambda a: _crop(a, 0.05),
}


def procedural(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    f = np.sqrt(np.fft.fftfreq(size)[:, None] ** 2 + np.fft.fftfreq(size)[None, :] ** 2)
    f[0, 0] = 1.0
    chans = [np.fft.ifft2((rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)) / f).real for _ in range(3)]
    img = np.stack([(c - c.mean()) / c.std() * 50 + 128 for c in chans], axis=-1)  # (size, size, 3)
    y, x = np.mgrid[0:size, 0:size] / size
    img[(x - 0.3) ** 2 + (y - 0.3) ** 2 < 0.03] = 255.0
    img[int(size * 0.8):, :] = 0.0
    return np.clip(img, 0, 255).astype(np.uint8)


def photos(size: int) -> list[np.ndarray]:
    try:
        import sklearn.datasets
    except ImportError:
        return []
    out = []
    for a in sklearn.datasets.load_sample_images().images:  # (427, 640, 3) each
        h, w = a.shape[:2]
        s = min(h, w)
        crop = a[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        out.append(np.asarray(Image.fromarray(crop).resize((size, size), Image.LANCZOS)))
    return out


def generated(bundle: str | None) -> list[np.ndarray]:
    if not bundle:
        return []
    from sdedge.runtime.pipeline import Pipeline, to_uint8

    pipe = Pipeline.load(bundle, verify="off")
    prompts = ["a red circle", "a blue square on green", "a yellow triangle", "a white star on black"]
    try:
        return [to_uint8(pipe.generate(p, seed=s, watermark=False).images)[0] for p in prompts for s in (1, 2)]
    finally:
        pipe.close()


class Ours:
    name = f"sdedge {wm.METHOD}"

    def __init__(self):
        self.data = wm.payload(DIGEST)
        self.truth = np.unpackbits(np.frombuffer(self.data, np.uint8))

    def embed(self, a):
        return wm.embed(a, self.data)

    def bits(self, a):
        return wm.detect(a).bits

    def recovered(self, a):
        return wm.detect(a).digest_prefix == DIGEST[:12]


class Peer:
    """invisible-watermark's dwtDct (what diffusers' StableDiffusionXLWatermarker uses), same 72-bit payload."""

    name = "invisible-watermark dwtDct"

    def __init__(self):
        from imwatermark import WatermarkDecoder, WatermarkEncoder

        self.data = wm.payload(DIGEST)
        self.truth = np.unpackbits(np.frombuffer(self.data, np.uint8))
        self.enc = WatermarkEncoder()
        self.enc.set_watermark("bytes", self.data)
        self.dec = WatermarkDecoder("bits", wm.PAYLOAD_BITS)

    def embed(self, a):
        # as diffusers' StableDiffusionXLWatermarker calls it: float32 BGR in 0-255 (uint8 input overflows inside)
        out = self.enc.encode(np.ascontiguousarray(a[:, :, ::-1], dtype=np.float32), "dwtDct")
        return np.clip(np.round(out[:, :, ::-1]), 0, 255).astype(np.uint8)

    def bits(self, a):
        if a.shape[0] * a.shape[1] < 256 * 256:  # the package refuses these
            return None
        return np.asarray(self.dec.decode(a[:, :, ::-1].copy(), "dwtDct"), dtype=np.uint8)

    def recovered(self, a):
        b = self.bits(a)
        return b is not None and bool(np.all(b == self.truth))


def measure(method, images: list[np.ndarray], repeats: int) -> dict:
    rows = {k: [] for k in ATTACKS}
    exact = {k: 0 for k in ATTACKS}
    psnrs, embed_ms, detect_ms = [], [], []
    for img in images:
        try:
            marked = method.embed(img)
        except RuntimeError as exc:  # invisible-watermark: "image too small, should be larger than 256x256"
            return {"images": len(images), "unsupported": str(exc)}
        psnrs.append(float(10 * np.log10(255.0 ** 2 / max(np.mean((marked.astype(np.float64) - img) ** 2), 1e-12))))
        for name, attack in ATTACKS.items():
            attacked = attack(marked)
            bits = method.bits(attacked)
            rows[name].append(float("nan") if bits is None else float(np.mean(bits == method.truth)))
            exact[name] += int(method.recovered(attacked))
    img = images[0]
    for _ in range(repeats):
        t0 = time.perf_counter()
        marked = method.embed(img)
        embed_ms.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        method.bits(marked)
        detect_ms.append((time.perf_counter() - t0) * 1e3)
    return {"images": len(images), "psnr_db": {"min": min(psnrs), "mean": float(np.mean(psnrs))},
            "embed_ms": {"median": float(np.median(embed_ms)), "min": float(np.min(embed_ms))},
            "detect_ms": {"median": float(np.median(detect_ms)), "min": float(np.min(detect_ms))},
            "bit_accuracy": {k: {"mean": float(np.mean(v)), "min": float(np.min(v))} for k, v in rows.items()},
            "payload_recovered": {k: f"{n}/{len(images)}" for k, n in exact.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdedge.benchmarks.watermark", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--bundle", help="also measure on images this bundle generates (at its own size)")
    ap.add_argument("--peer-path", help="folder with invisible-watermark, opencv and PyWavelets to compare with")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args(argv)
    from sdedge.benchmarks.machine import describe_machine
    from sdedge.runtime.environment import package_versions
    from sdedge.runtime.files import atomic_write_json

    methods = [Ours()]
    if args.peer_path:
        sys.path.insert(0, args.peer_path)
        methods.append(Peer())
    sets = {f"{s}px": photos(s) + [procedural(s, seed) for seed in range(6)] for s in SIZES}
    gen = generated(args.bundle)
    if gen:
        sets[f"generated-{gen[0].shape[0]}px"] = gen
    results = {m.name: {k: measure(m, imgs, args.repeats) for k, imgs in sets.items()} for m in methods}
    doc = {"schema": "sdedge-watermark-bench/1", "payload_bits": wm.PAYLOAD_BITS, "attacks": list(ATTACKS),
           "sets": {k: len(v) for k, v in sets.items()}, "results": results, "machine": describe_machine(),
           "versions": package_versions(["sdedge", "numpy", "pillow", "invisible-watermark", "opencv-python-headless",
                                         "PyWavelets", "scikit-learn"])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "watermark.json", doc)
    for name, per in results.items():
        for k, r in per.items():
            if "unsupported" in r:
                print(f"{name} {k}: {r['unsupported']}")
                continue
            acc = ", ".join(f"{a} {v['mean']:.3f}" for a, v in r["bit_accuracy"].items())
            print(f"{name} {k}: PSNR {r['psnr_db']['mean']:.1f} dB (min {r['psnr_db']['min']:.1f}), embed "
                  f"{r['embed_ms']['median']:.2f} ms, detect {r['detect_ms']['median']:.2f} ms; {acc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
