"""`sdedge train` on SDXL (issue 21, must 4), on sdxl-tiny: a LoRA on the UNet and both text encoders, conditioned
with SDXL's pooled text embeds and time ids; resume equals an uninterrupted run; the adapter in peft/diffusers and
in kohya SDXL keys (lora_unet_ LDM names, lora_te1_, lora_te2_), each fused by export with parity against the
peft-adapted models; SDXL adapters on an SD 1.5 base (and the reverse) refused naming the key."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import test_sdxl  # noqa: E402
import test_train  # noqa: E402
from safetensors import safe_open  # noqa: E402
from test_sdxl import TEXT_ENCODERS, _equal_weights, _outputs, _peft_adapted  # noqa: E402
from test_train import QUIET  # noqa: E402

from sdedge.export.bases import build_builtin_pipeline, load_base  # noqa: E402
from sdedge.export.lora import LoraError, fuse_loras, unfuse_loras  # noqa: E402
from sdedge.export.single_file import unet_key_to_ldm  # noqa: E402
from sdedge.trainer.config import TrainConfig  # noqa: E402
from sdedge.trainer.metrics import read_metrics  # noqa: E402
from sdedge.trainer.train import train  # noqa: E402

base, pipe, work = test_sdxl.base, test_sdxl.pipe, test_sdxl.work  # the sdxl-tiny base, its pipeline, per module
data = test_train.data  # 8 prepared 64x64 captioned images
RANK, ALPHA, STEPS = 4, 8.0, 4
COMPONENTS = ("unet", *TEXT_ENCODERS)


def _cfg(base, data, out, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(base=str(base), data=str(data), out=str(out), rank=RANK, alpha=ALPHA,
                                 learning_rate=1e-2, batch_size=2, max_steps=STEPS, train_text_encoder=True,
                                 seed=7, **QUIET), **kw})


@pytest.fixture(scope="module")
def runs(base, data, work):
    """An uninterrupted run (peft keys) and the same run killed after step 2's checkpoint and resumed (kohya keys)."""
    full = train(_cfg(base, data, work / "full", validation_prompts=("a red circle",), validation_steps=2,
                      validation_inference_steps=2))
    cut = _cfg(base, data, work / "cut", format="kohya", checkpoint_steps=2)
    stopped = train(cut, stop_after=2, unet_key_to_ldm=unet_key_to_ldm)
    resumed = train(_cfg(base, data, work / "cut", format="kohya", checkpoint_steps=2, resume="latest"),
                    unet_key_to_ldm=unet_key_to_ldm)
    return {"full": full, "stopped": stopped, "resumed": resumed}


def _keys(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def _layers(path) -> dict:
    """{(component, module path): (down, up)} of a peft-layout adapter file."""
    out: dict = {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            comp, rest = key.split(".", 1)
            module, _, which = rest.rpartition(".lora_")
            slot = out.setdefault((comp, module), [None, None])
            slot[0 if which.startswith("A") else 1] = f.get_tensor(key)
    return {k: tuple(v) for k, v in out.items()}


def _model_path(model, path: str) -> str:
    """A file's text-encoder path (transformers' `text_model.` prefix) as the loaded model names it."""
    return path if hasattr(model, "text_model") or not path.startswith("text_model.") else path[len("text_model."):]


@pytest.mark.slow  # three short sdxl-tiny runs: ~40 s
def test_sdxl_lora_learns_and_resume_equals_uninterrupted(runs):
    full, stopped, resumed = runs["full"], runs["stopped"], runs["resumed"]
    assert stopped.adapter is None and resumed.resumed_from == 2
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-7)
    assert all(r["loss"] == r["loss"] for r in read_metrics(full.out / "metrics.jsonl"))  # finite, logged
    assert sorted(p.name for p in (full.out / "validation").glob("step-*.png")) == [
        "step-000002-00.png", "step-000004-00.png"]  # StableDiffusionXLPipeline renders them


@pytest.mark.slow
def test_sdxl_adapter_layouts(runs, pipe):
    peft_keys, kohya_keys = _keys(runs["full"].adapter), _keys(runs["resumed"].adapter)
    for comp in COMPONENTS:
        assert any(k.startswith(f"{comp}.") and k.endswith(".lora_A.weight") for k in peft_keys), comp
    assert any(k.startswith("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.") for k in peft_keys)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya_keys  # LDM names
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in kohya_keys
    assert "lora_te2_text_model_encoder_layers_0_self_attn_out_proj.lora_up.weight" in kohya_keys
    assert not any(k.startswith("lora_unet_down_blocks") for k in kohya_keys)
    assert len(kohya_keys) == len(peft_keys) * 3 // 2  # down, up and alpha for each A, B pair


@pytest.mark.slow
def test_trained_sdxl_adapter_fuses_to_the_peft_adapted_models(runs, base, pipe):
    """Both layouts of the trained weights (the runs are identical) fuse by export into the UNet and both text
    encoders, matching the peft-adapted models (unmerged adapters with those weights) within 1e-4."""
    layers = _layers(runs["full"].adapter)
    assert {c for c, _ in layers} == set(COMPONENTS)
    moved = {(c, _model_path(getattr(pipe, c), p)): w for (c, p), w in layers.items()}
    truth = _outputs(*(_peft_adapted(getattr(pipe, c), moved, c, RANK, ALPHA) for c in COMPONENTS))
    fresh = load_base(base)
    plain = _outputs(fresh.unet, fresh.text_encoder, fresh.text_encoder_2)
    assert float((plain[0] - truth[0]).abs().max()) > 1e-3, "training should move the UNet"
    for adapter in (runs["full"].adapter, runs["resumed"].adapter):
        report = fuse_loras(fresh, [(adapter, 1.0)])
        assert report.complete and report.modules == {c: sum(1 for k in layers if k[0] == c) for c in COMPONENTS}
        errs = [float((got - want).abs().max()) for got, want in
                zip(_outputs(fresh.unet, fresh.text_encoder, fresh.text_encoder_2), truth)]
        print(f"{adapter.name} ({report.loras[0].format}) fused vs peft-adapted, max abs (unet, te1, te2): {errs}")
        assert max(errs) <= 1e-4, (adapter.name, errs)
    unfuse_loras(fresh)
    _equal_weights(fresh, pipe)


@pytest.mark.slow
def test_adapters_of_the_other_architecture_refused(runs, pipe, data, work):
    sd15 = build_builtin_pipeline("tiny-random")
    for adapter, key in ((runs["full"].adapter, r"key 'text_encoder_2\.|key 'unet\..*does not fit"),
                         (runs["resumed"].adapter, r"key 'lora_te[12]_|key 'lora_unet_input_blocks")):
        with pytest.raises(LoraError, match=key):
            fuse_loras(sd15, [(adapter, 1.0)])
    from sdedge.export.bases import write_builtin_base

    sd15_base = write_builtin_base("tiny-random", work / "sd15-base", seed=0)
    sd15_run = train(TrainConfig(base=str(sd15_base), data=str(data), out=str(work / "sd15-run"), rank=2,
                                 max_steps=1, batch_size=2, **QUIET))
    with pytest.raises(LoraError, match=r"sd15-run/adapter\.safetensors: key 'unet\..*SD 1\.x LoRA on an SDXL base"):
        fuse_loras(pipe, [(sd15_run.adapter, 1.0)])


def test_kohya_sdxl_keys_need_the_ldm_mapping_before_training(base, data, work):
    from sdedge.runtime.errors import SdedgeError

    with pytest.raises(SdedgeError, match="kohya SDXL keys use the UNet's original"):
        train(_cfg(base, data, work / "no-mapping", format="kohya"))
    assert not (work / "no-mapping" / "adapter.safetensors").exists()
