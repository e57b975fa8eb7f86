"""`sdedge train --train-tokens`: token-embedding rows trained beside the LoRA (trainer/tokens.py), saved in the
adapter, fused by export (export/lora.py) into the text encoder's embedding; parity against the trained model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import disc_dataset
from safetensors.torch import load_file, save_file

from sdedge.export.lora import LoraError, fuse_loras, unfuse_loras
from sdedge.runtime.errors import SdedgeError
from sdedge.runtime.strict import ConfigError
from sdedge.trainer.config import TrainConfig, resolve
from sdedge.trainer.lora_trainer import Trainer

COLORS = {"red": (220, 30, 30), "purple": (140, 50, 190)}
KEY = "text_encoder.text_model.embeddings.token_embedding.trainable_tokens_"
CAPTIONS = ["a purple circle", "a red circle", "purple", "a red square on a blue background"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from sdedge.export.bases import write_builtin_base

    return write_builtin_base("tiny", tmp_path_factory.mktemp("bases") / "tiny", seed=0)


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """12 steps on purple and red discs with a rank-4 LoRA on both models and purple's row trained; the Trainer
    itself (its adapted text encoder and UNet are the truth the fused export is checked against)."""
    data = disc_dataset(tmp_path_factory.mktemp("token-data"), COLORS)
    out = tmp_path_factory.mktemp("token-run") / "run"
    cfg = TrainConfig(base=str(base), data=str(data), out=str(out), rank=4, learning_rate=5e-3, token_lr=2e-2,
                      batch_size=2, max_steps=12, train_text_encoder=True, train_tokens=("purple",), progress=False,
                      tensorboard=False, checkpoint_steps=6)
    trainer = Trainer(cfg)
    result = trainer.run()
    return trainer, result


def _ids(tokenizer, captions):
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def _hidden(text_encoder, ids):
    with torch.no_grad():
        return text_encoder(ids)[0]


def test_the_row_trains_and_the_adapter_records_it(trained):
    trainer, result = trained
    purple = trainer.base.tokenizer("purple", add_special_tokens=False).input_ids
    sd = load_file(str(result.adapter))
    assert sd[KEY + "indices"].tolist() == purple and sd[KEY + "indices"].dtype == torch.int64
    delta = sd[KEY + "delta"]
    assert delta.shape == (len(purple), 64) and float(delta.norm()) > 1e-2  # it moved from zero
    doc = json.loads((result.out / "adapter.json").read_text())
    assert doc["tokens"] == {"purple": purple} and doc["config"]["train_tokens"] == ["purple"]
    # the frozen embedding itself did not change: only the delta trains
    emb = trainer.text_encoder.get_input_embeddings()
    from sdedge.export.bases import load_base

    base_emb = load_base(trainer.cfg.base).text_encoder.get_input_embeddings().weight
    torch.testing.assert_close(emb.base.weight.cpu(), base_emb, rtol=0, atol=0)
    # the checkpoint carries the delta, so a resumed run continues it
    ckpt = next((result.out / "checkpoints").iterdir())
    assert any(k.endswith("trainable_tokens_delta") for k in load_file(str(ckpt / "trainable.safetensors")))


@pytest.mark.slow  # an export: ~4 s; fast: test_scale_refuse_and_unfuse_restore_the_rows
def test_fused_export_equals_the_trained_model(trained):
    """Parity: the text encoder (LoRA and rows fused by export/lora.py) gives the trained, adapted text encoder's
    hidden states on captions with and without the word; the UNet likewise."""
    from sdedge.export.bases import load_base

    trainer, result = trained
    pipe = load_base(trainer.cfg.base)
    report = fuse_loras(pipe, [(result.adapter, 1.0)])
    assert report.complete and report.loras[0].tokens == 1 and report.loras[0].matched_keys == report.loras[0].keys
    ids = _ids(pipe.tokenizer, CAPTIONS)
    adapted = trainer.text_encoder.eval()
    want, got = _hidden(adapted, ids), _hidden(pipe.text_encoder, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # without the rows (the LoRA alone) the purple captions differ: the rows carry part of what was learned
    no_rows = load_base(trainer.cfg.base)
    plain = {k: v for k, v in load_file(str(result.adapter)).items() if "trainable_tokens" not in k}
    save_file(plain, str(result.out / "plain.safetensors"))
    fuse_loras(no_rows, [(result.out / "plain.safetensors", 1.0)])
    lora_only = _hidden(no_rows.text_encoder, ids)
    assert (lora_only[0] - want[0]).abs().max() > 1e-3 and (lora_only[2] - want[2]).abs().max() > 1e-3
    torch.testing.assert_close(lora_only[3], want[3], rtol=1e-5, atol=1e-5)  # no purple token: the same
    lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(lat, 500, encoder_hidden_states=got[:1]).sample,
                                   trainer.unet.eval()(lat, 500, encoder_hidden_states=want[:1]).sample,
                                   rtol=1e-4, atol=1e-4)


def test_scale_refuse_and_unfuse_restore_the_rows(trained):
    from sdedge.export.bases import load_base

    trainer, result = trained
    pipe = load_base(trainer.cfg.base)
    emb = pipe.text_encoder.get_input_embeddings().weight
    before = emb.detach().clone()
    sd = load_file(str(result.adapter))
    idx, delta = sd[KEY + "indices"], sd[KEY + "delta"]
    fuse_loras(pipe, [(result.adapter, 0.5)])
    torch.testing.assert_close(emb[idx], before[idx] + 0.5 * delta)
    others = torch.ones(len(before), dtype=torch.bool)
    others[idx] = False
    assert torch.equal(emb[others], before[others])
    fuse_loras(pipe, [(result.adapter, 1.0)])  # recomputed from the base, never accumulated
    torch.testing.assert_close(emb[idx], before[idx] + delta)
    unfuse_loras(pipe)
    assert torch.equal(emb, before)


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.pop(KEY + "indices"), "without their trainable_tokens_indices"),
    (lambda sd: sd.update({KEY + "indices": torch.tensor([10_000])}), "token index 10000"),
    (lambda sd: sd.update({KEY + "delta": torch.zeros(1, 32)}), r"delta \[1, 32\]"),
    (lambda sd: sd.update({KEY + "indices": torch.tensor([3.0])}), "needs integer indices"),
])
def test_bad_token_rows_are_refused_and_nothing_changes(trained, tmp_path, edit, match):
    from sdedge.export.bases import load_base

    trainer, result = trained
    sd = load_file(str(result.adapter))
    edit(sd)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    pipe = load_base(trainer.cfg.base)
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    with pytest.raises(LoraError, match=match):
        fuse_loras(pipe, [(bad, 1.0)])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, before)


def test_config_refusals():
    base = dict(base="b", data="d", out="o", train_tokens=("purple",))
    with pytest.raises(ConfigError, match="train_tokens: needs train_text_encoder"):
        resolve(TrainConfig(**base))
    with pytest.raises(ConfigError, match="train_tokens: needs format peft"):
        resolve(TrainConfig(**base, train_text_encoder=True, format="kohya"))
    with pytest.raises(ConfigError, match="train_tokens: names a word twice"):
        resolve(TrainConfig(**{**base, "train_tokens": ("purple", "purple")}, train_text_encoder=True))
    with pytest.raises(ConfigError, match="token_lr: must be positive"):
        resolve(TrainConfig(**base, train_text_encoder=True, token_lr=0.0))


def test_words_sharing_a_token_are_refused(base):
    from transformers import CLIPTokenizer

    from sdedge.trainer.tokens import token_ids

    tok = CLIPTokenizer.from_pretrained(str(base / "tokenizer"))
    assert token_ids(tok, ["purple"]) == {"purple": tuple(tok("purple", add_special_tokens=False).input_ids)}
    with pytest.raises(SdedgeError, match="share the token"):
        token_ids(tok, ["purple", "purple circle"])


def test_rows_alone_in_the_text_encoder_keep_other_captions_exact(base, tmp_path):
    """--train-tokens with no text-encoder LoRA modules: only the rows train there, so a caption without the word
    encodes exactly as in the base, and the fused export equals the trained text encoder."""
    from sdedge.export.bases import load_base

    data = disc_dataset(tmp_path / "d", COLORS)
    cfg = TrainConfig(base=str(base), data=str(data), out=str(tmp_path / "run"), rank=4, learning_rate=5e-3,
                      token_lr=2e-2, batch_size=2, max_steps=6, train_text_encoder=True, train_tokens=("purple",),
                      text_encoder_target_modules=(), progress=False, tensorboard=False)
    trainer = Trainer(cfg)
    result = trainer.run()
    keys = load_file(str(result.adapter)).keys()
    assert not [k for k in keys if k.startswith("text_encoder.") and "trainable_tokens" not in k]
    pipe, plain = load_base(str(base)), load_base(str(base))
    fuse_loras(pipe, [(result.adapter, 1.0)])
    ids = _ids(pipe.tokenizer, CAPTIONS)
    got, want, before = _hidden(pipe.text_encoder, ids), _hidden(trainer.text_encoder.eval(), ids), \
        _hidden(plain.text_encoder, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], before[1]) and torch.equal(got[3], before[3])  # no purple: the base's encoding
    assert (got[0] - before[0]).abs().max() > 1e-3
