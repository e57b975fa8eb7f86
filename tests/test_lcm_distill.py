"""`sdedge train --lcm` (issue 19, must 2): latent consistency distillation of an LCM-LoRA.

Mechanics on the tiny-random base (a few steps): the boundary scalings and the DDIM solver against diffusers'
LCMScheduler / DDIMScheduler, the teacher (the student with its LoRA off) equal to the frozen base, the adapter in
the LCM-LoRA layout fused completely by `sdedge export`'s fuse, resume equal to an uninterrupted run, the user's
LoRA fused into the teacher, bad input exit 2 with nothing written. Slow: the shipped LCM-LoRA of the trained tiny
base at 4 LCM steps and guidance 1 within 0.05 of the base's prompt match at 20 DPM++ 2M steps and guidance 7.5.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import disc_dataset, run_cli

from sdedge.trainer.config import LCM_TARGETS, TrainConfig
from sdedge.trainer.lcm import DdimSolver, LcmTrainer, boundary_scalings, lora_off, train_lcm, weights_swapped

QUIET = dict(progress=False, tensorboard=False)


@pytest.fixture(scope="module")
def tiny_random(tmp_path_factory) -> Path:
    from sdedge.export.bases import write_builtin_base

    return write_builtin_base("tiny-random", tmp_path_factory.mktemp("bases") / "tiny-random", seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """8 captioned 64x64 discs on textured backgrounds, prepared."""
    return disc_dataset(tmp_path_factory.mktemp("lcm-data"), {"red": (220, 30, 30), "green": (30, 200, 40)})


def cfg(base, data, out, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(base=str(base), data=str(data), out=str(out), lcm=True, rank=4, learning_rate=1e-3,
                                 batch_size=2, max_steps=4, seed=3, **QUIET), **kw})


# -- the formulas, against diffusers ---------------------------------------------------------------------------------


def test_boundary_scalings_are_lcm_schedulers():
    from diffusers import LCMScheduler

    ref = LCMScheduler(timestep_scaling=10.0)
    t = torch.tensor([0, 1, 19, 259, 999])
    c_skip, c_out = boundary_scalings(t, timestep_scaling=10.0)
    for i, step in enumerate(t.tolist()):
        want_skip, want_out = ref.get_scalings_for_boundary_condition_discrete(step)
        assert c_skip[i].item() == pytest.approx(want_skip, rel=1e-6, abs=1e-12)
        assert c_out[i].item() == pytest.approx(want_out, rel=1e-6)
    assert (c_skip[0].item(), c_out[0].item()) == (1.0, 0.0)  # f is the identity at t = 0
    # the formula itself: c_skip = σ²/((st)² + σ²), c_out = st/√((st)² + σ²), σ = 0.5
    s = 10.0 * 19
    assert c_skip[2].item() == pytest.approx(0.25 / (s * s + 0.25))
    assert c_out[2].item() == pytest.approx(s / (s * s + 0.25) ** 0.5)


def test_ddim_solver_steps_as_ddim_scheduler_with_eta_0():
    """A solver step from t_(n+1) = 20(n+1) - 1 down 20 timesteps is DDIMScheduler.step (50 steps, eta 0) there,
    the first one (to before t = 0) included."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False, prediction_type="epsilon")
    ddim.set_timesteps(50)
    solver = DdimSolver(ddim.alphas_cumprod, 1000, 50)
    assert solver.timesteps[:3].tolist() == [19, 39, 59] and solver.timesteps[-1].item() == 999 and solver.skip == 20
    g = torch.Generator().manual_seed(0)
    index = torch.tensor([0, 7, 49])
    x, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    a_t = ddim.alphas_cumprod[solver.timesteps[index]].reshape(-1, 1, 1, 1)
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()  # (3, 4, 8, 8)
    ours = solver.step(x0, eps, index)
    for row, n in enumerate(index.tolist()):
        want = ddim.step(eps[row:row + 1], int(solver.timesteps[n]), x[row:row + 1], eta=0.0).prev_sample
        torch.testing.assert_close(ours[row:row + 1], want, rtol=1e-4, atol=1e-5)


# -- mechanics on tiny-random ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tiny_random, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lcm") / "run"
    return train_lcm(cfg(tiny_random, data, out, checkpoint_steps=2, validation_prompts=("a red circle",),
                         validation_steps=2)), out


def test_lcm_run_writes_an_lcm_lora_that_export_fuses_completely(run, tiny_random):
    from sdedge.export.bases import load_base
    from sdedge.export.lora import fuse_loras

    result, out = run
    assert len(result.losses) == 4 and all(np.isfinite(result.losses))
    doc = json.loads((out / "adapter.json").read_text())
    assert doc["config"]["lcm"] is True and tuple(doc["lora"]["unet_targets"]) == LCM_TARGETS
    assert doc["distilled_from"]["sha256"] == doc["base"]["sha256"]  # no LoRA fused: the teacher is the base
    assert sorted(p.name for p in (out / "validation").glob("step-*.png")) == ["step-000002-00.png",
                                                                                "step-000004-00.png"]
    pipe = load_base(tiny_random)
    report = fuse_loras(pipe, [(str(result.adapter), 1.0)])
    assert report.complete and report.loras[0].layers["unet"] == doc["lora"]["unet_layers"]
    names = [n for n, _ in pipe.unet.named_modules()]
    kinds = {t for t in LCM_TARGETS if any(n.endswith("." + t) for n in names)}
    assert kinds == set(LCM_TARGETS)  # every kind of the LCM-LoRA layout is in the tiny UNet and got a LoRA
    assert doc["lora"]["unet_layers"] == sum(1 for n in names if any(n.endswith("." + t) for t in LCM_TARGETS))


def test_resume_equals_an_uninterrupted_run(run, tiny_random, data, tmp_path):
    from safetensors.torch import load_file

    whole, whole_out = run
    out = tmp_path / "resumed"
    c = cfg(tiny_random, data, out, checkpoint_steps=2, validation_prompts=("a red circle",), validation_steps=2)
    stopped = train_lcm(c, stop_after=2)
    assert stopped.adapter is None and (out / "checkpoints").is_dir()
    resumed = train_lcm(TrainConfig(**{**c.__dict__, "resume": "latest"}))
    assert resumed.resumed_from == 2
    np.testing.assert_allclose(resumed.losses, whole.losses, rtol=1e-5)
    a, b = load_file(str(resumed.adapter)), load_file(str(whole.adapter))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_the_teacher_is_the_frozen_base(tiny_random, data, tmp_path):
    """After training steps the student's LoRA is non-zero, and with it off the UNet is the base's, exactly."""
    from diffusers import UNet2DConditionModel

    t = LcmTrainer(cfg(tiny_random, data, tmp_path / "t", max_steps=2))
    t.run()
    unet = t.accelerator.unwrap_model(t.unet_p).eval()
    base = UNet2DConditionModel.from_pretrained(str(tiny_random), subfolder="unet").eval()
    g = torch.Generator().manual_seed(1)
    x, hidden = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 64, generator=g)
    ts = torch.tensor([999, 19])
    with torch.no_grad():
        student = unet(x, ts, hidden).sample
        with lora_off(unet):
            teacher = unet(x, ts, hidden).sample
        want = base(x, ts, hidden).sample
    torch.testing.assert_close(teacher, want, rtol=0, atol=1e-6)
    assert (student - want).abs().max() > 1e-4  # the LoRA trained away from zero
    assert all(p.requires_grad for n, p in unet.named_parameters() if "lora_" in n)  # switched back on


def test_a_fused_user_lora_is_the_teacher_and_part_of_resume(tiny_random, data, tmp_path, run):
    from sdedge.export.lora import fuse_loras

    whole, _ = run
    mine = f"{whole.adapter}:0.5"  # any LoRA of this base serves as "the user's"
    out = tmp_path / "fused"
    c = cfg(tiny_random, data, out, lcm_fuse=(mine,), checkpoint_steps=2)
    stopped = train_lcm(c, stop_after=2, lora_fuser=fuse_loras)
    assert stopped.adapter is None
    with pytest.raises(Exception, match="lcm_fuse needs"):
        train_lcm(TrainConfig(**{**c.__dict__, "resume": "latest"}))  # no fuser: refused, not silently unfused
    from sdedge.runtime.errors import SdedgeError

    changed = TrainConfig(**{**c.__dict__, "resume": "latest", "lcm_fuse": (f"{whole.adapter}:0.25",)})
    with pytest.raises(SdedgeError, match="lcm_fuse"):
        train_lcm(changed, lora_fuser=fuse_loras)
    done = train_lcm(TrainConfig(**{**c.__dict__, "resume": "latest"}), lora_fuser=fuse_loras)
    doc = json.loads((out / "adapter.json").read_text())
    assert done.resumed_from == 2 and doc["distilled_from"]["sha256"] != doc["base"]["sha256"]
    assert doc["config"]["lcm_fuse"] == [mine]


def test_the_guidance_interval_leaves_the_teacher_unguided_below_its_timestep(tiny_random, data, tmp_path):
    """lcm_unguided_below t_g: w = 1 in exactly the rows whose solver step starts below t_g; every other draw (the
    solver step of each row, w above t_g) is the one without the interval, so the two runs share their noise."""
    from sdedge.trainer.batches import Batch

    plain = LcmTrainer(cfg(tiny_random, data, tmp_path / "plain", lcm_guidance_min=5.0, lcm_guidance_max=10.0))
    gated = LcmTrainer(cfg(tiny_random, data, tmp_path / "gated", lcm_guidance_min=5.0, lcm_guidance_max=10.0,
                           lcm_unguided_below=500))
    for t in (plain, gated):
        t.setup_models()
    below = above = 0
    for micro in range(8):
        batch = Batch(latents=None, noise=None, timesteps=None, captions=[""] * 4, micro=micro, slots=[0, 1, 2, 3])
        (i0, w0), (i1, w1) = plain.draws(batch), gated.draws(batch)
        assert torch.equal(i0, i1)
        start = gated.solver.timesteps[i1]  # (b,) the step's start timestep
        assert torch.all(w1[start < 500] == 1.0) and torch.equal(w1[start >= 500], w0[start >= 500])
        assert torch.all((w0 >= 5.0) & (w0 <= 10.0))
        below, above = below + int((start < 500).sum()), above + int((start >= 500).sum())
    assert below and above  # both sides of the interval were drawn


class _Recording(LcmTrainer):
    """LcmTrainer recording the LoRA weights and the EMA after every optimizer step (copies; nothing changed)."""

    def optimizer_step(self, step):
        loss = super().optimizer_step(step)
        self.seen = getattr(self, "seen", [])
        self.seen.append(({n: p.detach().clone() for n, p in self.lora_params(unwrap=True).items()},
                          {n: e.clone() for n, e in self.ema.items()} if self.ema is not None else None))
        return loss


def test_the_ema_target_is_what_the_formula_says(tiny_random, data, tmp_path):
    """lcm_ema_decay d: θ⁻_0 = θ_0, θ⁻_k = d·θ⁻_(k-1) + (1 − d)·θ_k after every optimizer step; the target pass
    runs on θ⁻ (step 1's loss equals the online run's, where θ⁻ = θ; step 2's differs), and the student's weights
    are its own again after it, bit for bit. adapter.json records the decay."""
    d = 0.6
    online = LcmTrainer(cfg(tiny_random, data, tmp_path / "online", max_steps=3))
    online.run()
    t = _Recording(cfg(tiny_random, data, tmp_path / "ema", max_steps=3, lcm_ema_decay=d))
    t.run()
    from sdedge.trainer.adapter import lora_parameters

    init = LcmTrainer(cfg(tiny_random, data, tmp_path / "init", max_steps=3, lcm_ema_decay=d))
    init.setup_models()
    prev = {f"unet.{n}": p.detach().clone() for n, p in lora_parameters(init.unet)}  # θ_0: the seeded LoRA init
    assert any(v.abs().max() > 0 for v in prev.values())
    for k, (theta, ema) in enumerate(t.seen):
        want = {n: d * prev[n] + (1 - d) * theta[n] for n in theta}
        for n in theta:
            torch.testing.assert_close(ema[n], want[n], rtol=0, atol=1e-7, msg=f"step {k + 1} {n}")
        prev = ema
    assert online.history[0] == pytest.approx(t.history[0], rel=1e-6)  # θ⁻_0 = θ_0: the same target at step 1
    assert abs(online.history[1] - t.history[1]) > 1e-7  # θ⁻_1 ≠ θ_1: the target is the EMA's
    params = t.lora_params(unwrap=True)
    own = {n: p.detach().clone() for n, p in params.items()}
    with weights_swapped(params, t.ema):
        assert all(torch.equal(params[n], t.ema[n]) for n in params)
    assert all(torch.equal(params[n], own[n]) for n in params)
    doc = json.loads((tmp_path / "ema" / "adapter.json").read_text())
    assert doc["config"]["lcm_ema_decay"] == d
    assert json.loads((tmp_path / "online" / "adapter.json").read_text())["config"]["lcm_ema_decay"] == 0.0


def test_resume_restores_the_ema_target(tiny_random, data, tmp_path):
    """A run with lcm_ema_decay killed at step 2 and resumed follows the uninterrupted run's losses, adapter and
    EMA: the checkpoint holds the EMA (ema.safetensors, in state.json's files) and resume reads it back."""
    from safetensors.torch import load_file

    from sdedge.runtime.strict import ConfigError
    from sdedge.trainer.checkpoint import read_checkpoint

    c = cfg(tiny_random, data, tmp_path / "whole", max_steps=4, checkpoint_steps=2, lcm_ema_decay=0.5)
    whole = LcmTrainer(c)
    whole.run()
    out = tmp_path / "resumed"
    c = TrainConfig(**{**c.__dict__, "out": str(out)})
    assert LcmTrainer(c, stop_after=2).run().adapter is None
    state = json.loads((out / "checkpoints" / "step-000002" / "state.json").read_text())
    assert "ema.safetensors" in state["files"]
    saved = read_checkpoint(out / "checkpoints" / "step-000002").ema
    assert set(saved) == set(whole.ema) and any(not torch.equal(saved[n], whole.ema[n]) for n in saved)
    with pytest.raises(ConfigError, match="lcm_ema_decay"):  # another decay would not continue the same run
        LcmTrainer(TrainConfig(**{**c.__dict__, "resume": "latest", "lcm_ema_decay": 0.9})).run()
    resumed = LcmTrainer(TrainConfig(**{**c.__dict__, "resume": "latest"}))
    result = resumed.run()
    assert result.resumed_from == 2
    np.testing.assert_allclose(resumed.history, whole.history, rtol=1e-5)
    for n in whole.ema:
        torch.testing.assert_close(resumed.ema[n], whole.ema[n], rtol=1e-5, atol=1e-7)
    a, b = load_file(str(result.adapter)), load_file(str(tmp_path / "whole" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_checkpoints_ema_file_is_checked_like_its_other_tensors(tmp_path):
    """ema.safetensors is written beside the trainable weights, its SHA-256 in state.json: read_checkpoint reads it back,
    a damaged one makes the checkpoint invalid (latest_checkpoint passes over it), a NaN one is never written."""
    from sdedge.runtime.errors import SdedgeError
    from sdedge.trainer import checkpoint as ck

    w = {"unet.layer.lora_A.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    state = ck.CheckpointState(step=1, optimizer=ck.OptimizerRest(param_groups=({"lr": 1e-3},)))
    plain = ck.save_checkpoint(tmp_path / "a", state, w, {})
    assert ck.read_checkpoint(plain).ema is None and "ema.safetensors" not in ck.read_checkpoint(plain).state.files
    ema = {k: v * 0.5 for k, v in w.items()}
    folder = ck.save_checkpoint(tmp_path / "b", state, w, {}, ema=ema)
    assert ck.read_checkpoint(folder).state.files.keys() == {"trainable.safetensors", "optimizer.safetensors",
                                                           "ema.safetensors"}
    assert torch.equal(ck.read_checkpoint(folder).ema["unet.layer.lora_A.weight"], ema["unet.layer.lora_A.weight"])
    data = bytearray((folder / "ema.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "ema.safetensors").write_bytes(bytes(data))
    with pytest.raises(SdedgeError, match="ema.safetensors: damaged"):
        ck.read_checkpoint(folder)
    assert ck.latest_checkpoint(tmp_path / "b") is None
    with pytest.raises(SdedgeError, match="ema.safetensors.*NaN"):
        ck.save_checkpoint(tmp_path / "c", state, w, {}, ema={k: v * float("nan") for k, v in w.items()})
    assert not (tmp_path / "c" / "step-000001").exists()


# -- bad input -------------------------------------------------------------------------------------------------------


def test_lcm_on_a_unet_that_does_not_take_the_schedule_exits_2_nothing_written(data, tmp_path):
    from sdedge.export.bases import write_builtin_base

    inpaint = write_builtin_base("tiny-inpaint", tmp_path / "tiny-inpaint", seed=0)
    out = tmp_path / "out"
    r = run_cli("train", "--lcm", "--base", str(inpaint), "--data", str(data), "--out", str(out), "--max-steps", "2",
                "--no-progress")
    assert r.returncode == 2, r.stderr
    assert "in_channels" in r.stderr and "9 input channels" in r.stderr and str(inpaint) in r.stderr
    assert not out.exists()  # refused before the run folder is made
    r = run_cli("train", "--lcm", "--base", str(inpaint), "--data", str(data), "--out", str(out),
                "--lcm-ddim-timesteps", "2000", "--no-progress")
    assert r.returncode == 2 and "lcm_ddim_timesteps" in r.stderr
    r = run_cli("train", "--lcm", "--base", str(inpaint), "--data", str(data), "--out", str(out),
                "--lcm-unguided-below", "1001", "--no-progress")
    assert r.returncode == 2 and "lcm_unguided_below 1001" in r.stderr and "1000 training timesteps" in r.stderr
    assert not out.exists()


def test_lcm_config_refuses_what_it_cannot_combine():
    from sdedge.runtime.strict import ConfigError
    from sdedge.trainer.config import resolve

    for kw, key in ((dict(distill_from="t"), "distill_from"), (dict(train_text_encoder=True), "train_text_encoder"),
                    (dict(lcm_guidance_min=8.0, lcm_guidance_max=4.0), "lcm_guidance_min"),
                    (dict(lcm_ddim_timesteps=1), "lcm_ddim_timesteps"), (dict(lcm_ema_decay=1.0), "lcm_ema_decay"),
                    (dict(lcm_ema_decay=-0.1), "lcm_ema_decay"), (dict(lcm_unguided_below=-1), "lcm_unguided_below")):
        with pytest.raises(ConfigError, match=key):
            resolve(TrainConfig(base="b", data="d", out="o", lcm=True, **kw))


# -- the shipped LCM-LoRA of the trained tiny base ----------------------------------------------------------------------


@pytest.mark.slow
def test_shipped_lcm_lora_reaches_its_measured_floor_at_4_steps(tiny_base):
    """The shipped LCM-LoRA at 4 LCM steps and guidance 1 (one UNet batch a step) on the 90 base captions x 2 seeds
    reaches the prompt match recorded with it (tiny-lcm-lora.json, benchmarks/results/tiny-lcm), far above the base
    without it at those settings, and within 0.05 of the base at 20 DPM++ 2M steps and guidance 7.5 (issue 19,
    must 2), both measured in this run on the same 180 images' prompts and seeds."""
    from sdedge.benchmarks.tiny_lcm import lcm_curve, row
    from sdedge.export.bases import load_base
    from sdedge.tinyworld.classifier import base_captions, load_classifier
    from sdedge.tinyworld.lcm_lora import lcm_lora_note, packaged_lcm_lora

    curve = lcm_curve(tiny_base, packaged_lcm_lora(), steps=(4,))
    four = curve["lcm"][0]
    assert four["unet_batches_per_step"] == 1 and four["images"] == 180
    recorded = lcm_lora_note()["prompt_match"]
    floor = next(r for r in recorded["lcm"] if r["steps"] == 4)["prompt_match"]
    assert four["prompt_match"] >= floor - 0.03, (four, floor)  # the same seeds; another CPU may round differently
    assert four["prompt_match"] >= curve["base"]["prompt_match"] - 0.05, curve  # issue 19 must 2, measured here
    assert recorded["gap_at_4"] == pytest.approx(recorded["base"]["prompt_match"] - floor, abs=1e-3)
    pipe = load_base(tiny_base)  # the base without the LoRA at the same 4 LCM steps and guidance 1
    pipe.set_progress_bar_config(disable=True)
    without = row(pipe, load_classifier(), base_captions(), scheduler="lcm", steps=4, guidance=1.0)
    assert four["prompt_match"] >= without["prompt_match"] + 0.2, (four, without)
