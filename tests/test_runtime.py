"""The PyTorch-free runtime on the tiny bundle: parity with diffusers, features, and bad input."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import run_cli

from sdedge.runtime.errors import BadInput, BundleError
from sdedge.runtime.pipeline import Pipeline

DETERMINISTIC = ["ddim", "pndm", "euler", "dpm++2m", "dpm++2m-karras"]


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    p = Pipeline.load(tiny_bundle, device="cpu", backend="onnxruntime")  # fp32 parity: auto may pick bf16
    yield p
    p.close()


def seeded_latents(pipe, seed=3, batch=1, size=64):
    lat = pipe.manifest.latent
    shape = (batch, lat.channels, size // lat.vae_scale_factor, size // lat.vae_scale_factor)
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


@pytest.mark.parametrize("scheduler", DETERMINISTIC)
def test_image_parity_with_diffusers(pipe, tiny_pipe, scheduler):
    from sdedge.export.reference import psnr, reference_images

    latents = seeded_latents(pipe)
    kw = dict(steps=12, guidance=7.5)
    ours = pipe.generate("a red circle", "blurry", scheduler=scheduler, latents=latents, watermark=False, **kw).images
    ref = reference_images(tiny_pipe, "a red circle", "blurry", latents=latents, scheduler=scheduler,
                           scheduler_config=pipe.manifest.scheduler, **kw)
    assert ours.shape == ref.shape == (1, 64, 64, 3)
    assert psnr(ours, ref) >= 40.0, scheduler


def test_several_images_negative_prompts_and_seeds(pipe):
    r = pipe.generate(["a red circle", "a blue square"], ["", "dark"], num_images=2, seed=5, steps=4)
    assert r.images.shape == (4, 64, 64, 3)
    again = pipe.generate(["a red circle", "a blue square"], ["", "dark"], num_images=2, seed=5, steps=4)
    np.testing.assert_array_equal(r.images, again.images)  # same seed, same images
    other = pipe.generate(["a red circle", "a blue square"], ["", "dark"], num_images=2, seed=6, steps=4)
    assert not np.array_equal(r.images, other.images)
    assert not np.array_equal(r.images[0], r.images[1])  # two images of one prompt differ
    neg = pipe.generate("a red circle", "something else entirely", seed=5, steps=4).images
    assert not np.array_equal(neg[0], r.images[0])  # the negative prompt is used
    assert len(r.step_times) == 4 and set(r.timings) >= {"text_encoder", "unet", "vae_decoder"}


def test_guidance_one_skips_the_negative_batch(pipe):
    """guidance <= 1 runs no guidance pass (runtime/conditioning.py `runs_guidance`): the negative prompt is not
    run, so it changes nothing, and the whole batch is free for images; above 1 both hold no longer."""
    r = pipe.generate("a red circle", guidance=1.0, seed=1, steps=3)
    assert r.images.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(pipe.generate("a red circle", "dark", guidance=1.0, seed=1, steps=3).images, r.images)
    guided = [pipe.generate("a red circle", neg, guidance=1.5, seed=1, steps=3).images for neg in ("", "dark")]
    assert not np.array_equal(*guided)
    most = pipe.manifest.shapes.batch_max
    assert pipe.generate("a red circle", guidance=1.0, num_images=most, seed=1, steps=1).images.shape[0] == most
    with pytest.raises(BadInput, match="num_images"):
        pipe.generate("a red circle", guidance=1.5, num_images=most, seed=1, steps=1)


@pytest.mark.parametrize("scheduler", ["euler_a", "lcm"])
def test_stochastic_schedulers_are_seeded(pipe, scheduler):
    a = pipe.generate("a red circle", scheduler=scheduler, seed=2, steps=4).images
    b = pipe.generate("a red circle", scheduler=scheduler, seed=2, steps=4).images
    np.testing.assert_array_equal(a, b)
    assert np.isfinite(a).all()


def test_low_memory_mode_gives_the_same_images(tiny_bundle, pipe):
    low = Pipeline.load(tiny_bundle, device="cpu", memory="low", backend="onnxruntime")  # as `pipe`
    assert not any(e.loaded for e in low.engines.values())
    a = low.generate("a red circle", seed=9, steps=3).images
    assert not any(e.loaded for e in low.engines.values())  # released after use
    np.testing.assert_array_equal(a, pipe.generate("a red circle", seed=9, steps=3).images)


def test_long_prompt_is_truncated_with_a_warning(pipe):
    with pytest.warns(UserWarning, match=r"125 token\(s\) dropped"):
        pipe.generate("red circle " * 100, seed=0, steps=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(width=60), "multiple of 16"),
        (dict(height=72), "multiple of 16"),
        (dict(width=1024), "outside the range"),
        (dict(steps=0), "steps=0"),
        (dict(steps=1001), "1 to 1000"),
        (dict(guidance=math.nan), "finite"),
        (dict(guidance=math.inf), "finite"),
        (dict(scheduler="k_lms_fancy"), "k_lms_fancy"),
        (dict(num_images=100), "num_images"),
    ],
)
def test_bad_requests_are_clear(pipe, kwargs, message):
    with pytest.raises(BadInput, match=message):
        pipe.generate("a red circle", **kwargs)


def test_generate_in_a_process_that_cannot_import_torch(tiny_bundle, tmp_path):
    """A full generate with torch, diffusers and transformers made unimportable: the runtime needs none."""
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('torch', 'diffusers', 'transformers'):
                    raise ImportError('blocked ' + name)
        sys.meta_path.insert(0, Block())
        from sdedge.runtime import Pipeline
        pipe = Pipeline.load({str(tiny_bundle)!r})
        images = pipe("a red circle", negative_prompt="", steps=4, guidance=7.5, seed=7, width=64, height=64,
                      scheduler="ddim")
        images[0].save({str(tmp_path / 'x.png')!r})
        assert not {{'torch', 'diffusers', 'transformers'}} & set(sys.modules), sorted(sys.modules)
        print('ok', images[0].size)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "ok (64, 64)" in r.stdout
    assert (tmp_path / "x.png").stat().st_size > 0


def test_cli_generate_verbose_reports_peak_rss(tiny_bundle, tmp_path):
    out = tmp_path / "img.png"
    r = run_cli("generate", str(tiny_bundle), "a red circle", "--seed", "7", "--steps", "5", "--scheduler",
                "dpm++2m", "--out", str(out), "--memory", "low", "--verbose")
    assert r.returncode == 0, r.stderr
    assert "peak RSS" in r.stderr and "per UNet step" in r.stderr
    from PIL import Image

    assert Image.open(out).size == (64, 64)


@pytest.mark.parametrize("args, message", [
    (["--width", "65"], "multiple of 16"),
    (["--steps", "10000"], "1 to 1000"),
    (["--guidance", "nan"], "finite"),
    (["--scheduler", "nope"], "nope"),
])
def test_cli_bad_input_exit_2(tiny_bundle, tmp_path, args, message):
    r = run_cli("generate", str(tiny_bundle), "x", "--out", str(tmp_path / "o.png"), *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


# -- damaged bundles --------------------------------------------------------------------------------------------
@pytest.fixture
def copy_bundle(tiny_bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle, dst)
    return dst


def test_flipped_byte_in_a_component_is_named(copy_bundle):
    path = copy_bundle / "unet" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"unet/model.onnx: SHA-256 differs"):
        Pipeline.load(copy_bundle, backend="onnxruntime")  # loads at load; OpenVINO reads (and checks) at first use


def test_truncated_component_is_named(copy_bundle):
    path = copy_bundle / "vae_decoder" / "model.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(BundleError, match=r"vae_decoder/model.onnx: 1000 bytes on disk"):
        Pipeline.load(copy_bundle)


def test_missing_component_is_named(copy_bundle):
    (copy_bundle / "text_encoder" / "model.onnx").unlink()
    r = run_cli("generate", str(copy_bundle), "x")
    assert r.returncode == 2 and "text_encoder/model.onnx: missing" in r.stderr, r.stderr


def test_corrupt_onnx_with_matching_manifest_is_a_clear_error(copy_bundle):
    """A garbage file whose hash was (re)recorded still fails at load with the file named."""
    from sdedge.export.bundle_writer import hash_files
    from sdedge.runtime.manifest import read_manifest

    (copy_bundle / "unet" / "model.onnx").write_bytes(b"not an onnx model" * 10)
    m = read_manifest(copy_bundle)
    (copy_bundle / "sdedge.json").write_text(m.with_files(hash_files(copy_bundle)).to_json())
    with pytest.raises(BundleError, match=r"unet/model.onnx: ONNX Runtime cannot load"):
        Pipeline.load(copy_bundle, backend="onnxruntime")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(version=3), "version 3.*upgrade sdedge"),
    (lambda d: d.update(format="sdedge-data"), "format 'sdedge-data', not 'sdedge-bundle'"),
    (lambda d: d.update(colour="red"), "unknown key 'colour'"),
    (lambda d: d["files"].update({"../etc/passwd": {"sha256": "0" * 64, "bytes": 1}}), "inside the bundle"),
    (lambda d: d["components"].pop("unet"), "no 'unet' component"),
])
def test_bad_manifest_is_refused(copy_bundle, edit, message):
    path = copy_bundle / "sdedge.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match=message):
        Pipeline.load(copy_bundle)


def test_stages_name_the_stage_that_raised_the_peak_memory():
    # in a fresh process: this one's peak is already set by earlier tests
    code = textwrap.dedent("""
        import io, numpy as np
        from rich.console import Console
        from sdedge.runtime.stages import Stages
        out = io.StringIO()
        stages = Stages(Console(file=out, width=200))
        with stages("small"):
            pass
        with stages("big"):
            block = np.ones(300 << 20, dtype=np.uint8)  # 300 MB, touched
            del block
        assert set(stages.seconds) == {"small", "big"} and list(stages.peak_bytes) == ["big"], stages.peak_bytes
        lines = out.getvalue().splitlines()
        assert "peak RSS" not in lines[0] and "big" in lines[1] and "peak RSS" in lines[1], lines
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
