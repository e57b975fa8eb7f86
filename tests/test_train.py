"""`sdedge train`: config, learning on tiny, adapter files diffusers loads, checkpoints and resume, DDP on 2 CPUs."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import disc_dataset
from PIL import Image

from sdedge.runtime.errors import SdedgeError
from sdedge.runtime.strict import ConfigError
from sdedge.trainer.config import TrainConfig, add_config_flags, config_from_args, resolve
from sdedge.trainer.metrics import read_metrics
from sdedge.trainer.train import lr_factor, train

REPO = Path(__file__).resolve().parents[1]
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
QUIET = dict(progress=False, tensorboard=False)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """The trained tiny base's architecture with random weights: on it a few steps on a small random image set
    make the loss fall clearly (the trained base already fits images like these, so its curve is flat)."""
    from sdedge.export.bases import write_builtin_base

    return write_builtin_base("tiny-random", tmp_path_factory.mktemp("bases") / "tiny-random", seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """8 captioned 64x64 pictures of coloured discs on textured backgrounds, prepared."""
    return disc_dataset(tmp_path_factory.mktemp("train-data"), COLORS)


def cfg(tiny_base, data, out, **kw) -> TrainConfig:
    base = dict(base=str(tiny_base), data=str(data), out=str(out), rank=8, learning_rate=2e-2, batch_size=2, **QUIET)
    return TrainConfig(**{**base, **kw})


# -- config ------------------------------------------------------------------------------------------------------


def _parse(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    add_config_flags(p)
    return p.parse_args(argv)


@pytest.mark.parametrize("flags", [["--learning-rate", "inf"], ["--learning-rate", "nan"], ["--noise-offset", "inf"]])
def test_config_refuses_a_number_that_is_not_finite(flags):
    with pytest.raises(ConfigError, match=rf"{flags[0][2:].replace('-', '_')}: must be a finite number"):
        resolve(config_from_args(_parse(["--base", "b", "--data", "d", "--out", "o", *flags]), None))


def test_config_yaml_keys_are_flags_and_unknown_keys_fail(tmp_path):
    y = tmp_path / "train.yaml"
    y.write_text("base: b\ndata: d\nout: o\nrank: 4\nlearning_rate: 0.001\nvalidation_prompts: [a cat, a dog]\n"
                 "gradient_checkpointing: true\nmin_snr_gamma: 5\n")
    c = config_from_args(_parse(["--rank", "8", "--no-gradient-checkpointing", "--max-steps", "20"]), str(y))
    assert (c.rank, c.learning_rate, c.max_steps, c.gradient_checkpointing) == (8, 1e-3, 20, False)  # flags win
    assert c.validation_prompts == ("a cat", "a dog") and c.min_snr_gamma == 5.0
    r = resolve(c)
    assert r.alpha == 8.0 and r.cache_text_embeddings is True and r.max_steps == 20
    assert resolve(config_from_args(_parse(["--epochs", "3"]), str(y)), steps_per_epoch=4).max_steps == 12
    assert resolve(config_from_args(_parse([]), str(y))).max_steps == 500
    y.write_text("base: b\nlearning_rte: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key 'learning_rte'"):
        config_from_args(_parse([]), str(y))
    y.write_text("rank: four\n")
    with pytest.raises(ConfigError, match=r"\.rank: expected an integer"):
        config_from_args(_parse([]), str(y))
    with pytest.raises(ConfigError, match="rank: must be at least 1"):
        resolve(TrainConfig(base="b", data="d", out="o", rank=0))
    with pytest.raises(ConfigError, match="cache_text_embeddings"):
        resolve(TrainConfig(base="b", data="d", out="o", train_text_encoder=True, cache_text_embeddings=True))
    with pytest.raises(ConfigError, match="data: required"):
        resolve(TrainConfig(base="b", out="o"))
    # every key has its flag
    import dataclasses

    for f in dataclasses.fields(TrainConfig):
        assert hasattr(_parse([]), f.name) is False  # suppressed until given
    ns = _parse(["--resume"])
    assert ns.resume == "latest"


def test_lr_schedule():
    c = TrainConfig(base="b", data="d", out="o", max_steps=12, lr_warmup_steps=3, lr_scheduler="cosine")
    f = [lr_factor(c, s) for s in range(12)]
    assert f[:3] == [0.25, 0.5, 0.75] and f[3] == 1.0 and f[-1] < 0.1
    assert all(a >= b for a, b in zip(f[3:], f[4:]))
    assert lr_factor(TrainConfig(max_steps=10, lr_scheduler="linear"), 5) == 0.5


# -- learning ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_base, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "lora"
    c = cfg(tiny_base, data, out, alpha=4.0, max_steps=24, checkpoint_steps=12, validation_prompts=("a red circle",),
            validation_steps=12, validation_inference_steps=2, tensorboard=True)
    return train(c), c


def _eval_loss(pipe, data, n_t=8):
    """The denoising loss on fixed latents, noise and timesteps (the same for every pipeline compared)."""
    from sdedge.trainer.dataset import image_tensor, load_prepared

    d = load_prepared(data)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        pix = torch.stack([image_tensor(it.image) for it in d.items])
        lat = pipe.vae.encode(pix).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer([it.text for it in d.items], padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        hidden = pipe.text_encoder(ids)[0]
        total, outs = 0.0, []
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(pipe.scheduler.config)
        for t in np.linspace(50, 950, n_t).astype(int):
            noise = torch.randn(lat.shape, generator=g)
            tt = torch.full((lat.shape[0],), int(t))
            pred = pipe.unet(sched.add_noise(lat, noise, tt), tt, hidden).sample
            outs.append(pred)
            total += float(torch.nn.functional.mse_loss(pred, noise))
    return total / n_t, torch.cat(outs)


@pytest.mark.slow  # a 24-step run and three pipelines: 5-55 s; fast: test_clear_errors, test_tokens
def test_loss_falls_and_the_adapter_changes_the_unet(trained, tiny_base, data):
    """The acceptance test: on tiny with a small generated image set the training loss falls, and the adapter
    (loaded unchanged by diffusers' load_lora_weights) changes the UNet's output and lowers its loss."""
    from sdedge.export.bases import load_base

    result, c = trained
    losses = result.losses
    assert len(losses) == 24 and all(np.isfinite(losses))
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.05, losses

    base_pipe = load_base(tiny_base)
    base_loss, base_out = _eval_loss(base_pipe, data)
    lora_pipe = load_base(tiny_base)
    lora_pipe.load_lora_weights(str(result.adapter))
    lora_loss, lora_out = _eval_loss(lora_pipe, data)
    assert (lora_out - base_out).abs().max() > 1e-2, "the adapter must change the UNet output"
    assert lora_loss < base_loss * 0.95, (base_loss, lora_loss)

    # the same adapter fused by export/lora.py gives diffusers' unfused UNet output
    from sdedge.export.lora import fuse_loras

    fused_pipe = load_base(tiny_base)
    report = fuse_loras(fused_pipe, [(result.adapter, 1.0)])
    assert report.complete and report.loras[0].layers == {"unet": 80, "text_encoder": 0}
    _, fused_out = _eval_loss(fused_pipe, data)
    torch.testing.assert_close(fused_out, lora_out, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # the same 24-step run (module fixture): ~15 s alone; fast: test_clear_errors
def test_run_outputs(trained, tiny_base, data):
    from safetensors import safe_open

    from sdedge.export.bases import describe_base

    result, c = trained
    out = Path(c.out)
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["base"]["sha256"] == describe_base(tiny_base)["sha256"]
    assert meta["dataset"]["sha256"] == json.loads((Path(data) / "metadata.json").read_text())["dataset_sha256"]
    assert meta["steps"] == 24 and meta["final_loss"] == pytest.approx(result.losses[-1])
    assert meta["config"]["rank"] == 8 and meta["config"]["alpha"] == 4.0 and meta["key_format"] == "peft"
    assert meta["lora"]["unet_layers"] == 80 and meta["world_size"] == 1
    import hashlib

    assert meta["sha256"] == hashlib.sha256((out / "adapter.safetensors").read_bytes()).hexdigest()
    with safe_open(str(out / "adapter.safetensors"), "pt") as f:
        keys = list(f.keys())
        header = json.loads(f.metadata()["lora_adapter_metadata"])
    assert len(keys) == 160 and all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
                                   for k in keys)
    assert header["unet.r"] == 8 and header["unet.lora_alpha"] == 4.0
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["max_steps"] == 24 and saved["alpha"] == 4.0 and "resume" not in saved
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 25)) and [r["loss"] for r in rows] == result.losses
    assert any((out / "logs").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["grid.png", "step-000012-00.png",
                                                                      "step-000024-00.png"]
    with Image.open(out / "validation" / "grid.png") as im:  # labelled: sdedge.runtime.grid (tests/test_grids.py)
        assert json.loads(im.info["sdedge-grid"]) == {"rows": ["step 12", "step 24"], "columns": ["a red circle"]}
    with Image.open(out / "validation" / "step-000024-00.png") as im:
        assert im.size == (64, 64)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000012"]
    assert not list(out.glob(".*tmp"))


# -- checkpoints and resume --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_injected_stop_then_resume_gives_the_same_curve(tiny_base, data, tmp_path):
    """Text-encoder LoRA, grad accumulation, warm-up + cosine, min-SNR, noise offset, no caches, kohya keys:
    a run stopped after a checkpoint and resumed equals an uninterrupted run, bit for bit."""
    kw = dict(max_steps=4, checkpoint_steps=2, train_text_encoder=True, gradient_accumulation_steps=2,
              lr_warmup_steps=2, lr_scheduler="cosine", min_snr_gamma=5.0, noise_offset=0.05, cache_latents=False,
              gradient_checkpointing=True, format="kohya", batch_size=1, learning_rate=1e-2)
    full = train(cfg(tiny_base, data, tmp_path / "full", **kw))
    stopped = train(cfg(tiny_base, data, tmp_path / "cut", **kw), stop_after=2)
    assert stopped.adapter is None and not (tmp_path / "cut" / "adapter.safetensors").exists()
    with (tmp_path / "cut" / "metrics.jsonl").open("a") as f:  # lines of steps after the checkpoint, one cut short
        f.write('{"step": 3, "loss": 9.9}\n{"step": 4, "lo')
    resumed = train(cfg(tiny_base, data, tmp_path / "cut", resume="latest", **kw))
    assert resumed.resumed_from == 2
    assert resumed.losses == full.losses and len(full.losses) == 4
    assert [r["loss"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")] == full.losses
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "full" / "adapter.safetensors")), load_file(str(tmp_path / "cut" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in a)
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0") for k in a)
    # kohya keys load in diffusers and fuse with every key matched
    from sdedge.export.bases import load_base
    from sdedge.export.lora import fuse_loras

    pipe = load_base(tiny_base)
    pipe.load_lora_weights(str(tmp_path / "full" / "adapter.safetensors"))
    report = fuse_loras(load_base(tiny_base), [(tmp_path / "full" / "adapter.safetensors", 1.0)])
    assert report.complete and report.loras[0].layers == {"unet": 80, "text_encoder": 8}
    # a resume with a setting that changes the curve is refused, naming it
    with pytest.raises(ConfigError, match="rank was 8 in the interrupted run and is 4 now"):
        step2 = str(tmp_path / "cut" / "checkpoints" / "step-000002")
        train(cfg(tiny_base, data, tmp_path / "cut", **{**kw, "rank": 4, "resume": step2}))


@pytest.mark.slow
def test_resume_after_killing_the_process(tiny_base, data, tmp_path):
    """`sdedge train` killed (SIGKILL) after a checkpoint, then --resume: the loss curve equals an uninterrupted
    run's with the same seed."""
    out = tmp_path / "killed"
    args = ["train", "--base", str(tiny_base), "--data", str(data), "--out", str(out), "--rank", "8",
            "--learning-rate", "0.02", "--batch-size", "2", "--checkpoint-steps", "3", "--max-steps", "60",
            "--no-progress", "--no-tensorboard"]
    proc = subprocess.Popen([sys.executable, "-m", "sdedge", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (out / "checkpoints" / "step-000003" / "state.json").exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "adapter.safetensors").exists()
    resumed = train(cfg(tiny_base, data, out, checkpoint_steps=3, max_steps=6, resume="latest"))
    full = train(cfg(tiny_base, data, tmp_path / "full", checkpoint_steps=3, max_steps=6))
    assert resumed.resumed_from >= 3
    np.testing.assert_allclose(resumed.losses, full.losses, rtol=1e-5)
    np.testing.assert_allclose([r["loss"] for r in read_metrics(out / "metrics.jsonl")], full.losses, rtol=1e-5)


# -- DDP ---------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_cpu_processes_equal_one_process_with_the_global_batch(tiny_base, data, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo), batch 1 each, follows the curve of 1 process, batch 2."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "sdedge", "train", "--base", str(tiny_base),
           "--data", str(data), "--out", str(out), "--rank", "8", "--learning-rate", "0.02", "--batch-size", "1",
           "--max-steps", "3", "--no-progress", "--no-tensorboard"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"}
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 processes" in run.stderr
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["world_size"] == 2
    single = train(cfg(tiny_base, data, tmp_path / "single", batch_size=2, max_steps=3))
    ddp_losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    np.testing.assert_allclose(ddp_losses, single.losses, rtol=1e-4)
    from safetensors.torch import load_file

    a, b = load_file(str(out / "adapter.safetensors")), load_file(str(tmp_path / "single" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # Adam's normalised steps (lr 0.02) amplify reduction-order differences in near-zero gradients
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-3)


# -- errors and the CLI --------------------------------------------------------------------------------------------


def test_clear_errors(tiny_base, data, tmp_path):
    with pytest.raises(SdedgeError, match="no metadata.json; prepare the images first"):
        train(cfg(tiny_base, tmp_path, tmp_path / "o"))
    with pytest.raises(SdedgeError, match="training needs a diffusers folder"):
        train(cfg(tmp_path / "nope", data, tmp_path / "o", max_steps=1))
    with pytest.raises(SdedgeError, match="fp16 needs a CUDA GPU"):
        if torch.cuda.is_available():
            raise SdedgeError("fp16 needs a CUDA GPU (skipped: a GPU is here)")
        train(cfg(tiny_base, data, tmp_path / "o", mixed_precision="fp16"))
    with pytest.raises(SdedgeError, match="no checkpoint in"):
        train(cfg(tiny_base, data, tmp_path / "o", resume="latest", max_steps=1))
    out = tmp_path / "done"
    train(cfg(tiny_base, data, out, max_steps=1, mixed_precision="bf16"))  # bf16 autocast runs on a CPU
    with pytest.raises(SdedgeError, match="holds an earlier run"):
        train(cfg(tiny_base, data, out, max_steps=1))
    train(cfg(tiny_base, data, out, max_steps=1, overwrite=True))
    # a dataset changed after prepare names the file
    import shutil

    changed = tmp_path / "changed"
    shutil.copytree(data, changed)
    img = sorted((changed / "images").iterdir())[0]
    Image.new("RGB", (64, 64)).save(img)
    with pytest.raises(SdedgeError, match=rf"{img.name}: SHA-256 .* differs"):
        train(cfg(tiny_base, changed, tmp_path / "o2", max_steps=1))


def test_cli_unknown_yaml_key(tmp_path, capsys):
    from sdedge.cli import main

    y = tmp_path / "t.yaml"
    y.write_text("base: b\ndata: d\nout: o\nbatchsize: 2\n")
    assert main(["train", "--config", str(y)]) == 2
    assert "unknown key 'batchsize'" in " ".join(capsys.readouterr().err.split())  # rich wraps long lines


@pytest.mark.slow
def test_cli_train_through_python_m_sdedge(tiny_base, data, tmp_path):
    from conftest import run_cli

    r = run_cli("train", "--base", str(tiny_base), "--data", str(data), "--out", str(tmp_path / "o"), "--max-steps",
                "2", "--rank", "4", "--no-progress", env={"COLUMNS": "300"})
    assert r.returncode == 0, r.stderr
    assert "adapter written to" in r.stderr and (tmp_path / "o" / "adapter.safetensors").exists()
