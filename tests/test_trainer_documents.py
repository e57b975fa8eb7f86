"""The trainer builds its documents as frozen dataclasses end to end (issue 20, must 2): a checkpoint's state.json
is a `CheckpointState` from the Trainer to save_checkpoint and back from read_checkpoint to the resumed run, and
adapter.json is the `AdapterDocument` the Trainer builds; save_checkpoint and write_adapter_json refuse a dict."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import disc_dataset

from sdedge.trainer.adapter import AdapterDocument, PriorRef, read_adapter_json
from sdedge.trainer.checkpoint import STATE, CheckpointState, OptimizerRest, optimizer_to_flat, save_checkpoint
from sdedge.trainer.config import TrainConfig
from sdedge.trainer.lora_trainer import Trainer

SHA = "ab" * 32


def _optimizer():
    p = torch.nn.Parameter(torch.ones(2, 3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.full_like(p, 0.5)
    opt.step()
    return p, opt


def test_save_checkpoint_refuses_a_dict_of_the_states_fields(tmp_path):
    p, opt = _optimizer()
    tensors, rest = optimizer_to_flat(opt.state_dict())
    assert isinstance(rest, OptimizerRest) and {"state.0.exp_avg", "state.0.exp_avg_sq"} <= set(tensors)
    fields = {"step": 1, "optimizer": {"param_groups": list(rest.param_groups), "scalars": rest.scalars},
              "base_sha256": SHA, "dataset_sha256": SHA, "loss": 0.5}
    with pytest.raises(TypeError, match="save_checkpoint: state is a dict, not a CheckpointState"):
        save_checkpoint(tmp_path, fields, {"w": p.detach()}, tensors)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a scratch folder
    state = CheckpointState(step=1, optimizer=rest, base_sha256=SHA, dataset_sha256=SHA, loss=0.5,
                            prior=PriorRef(sha256=SHA, images=4, path="/prior", weight=1.0))
    folder = save_checkpoint(tmp_path, state, {"w": p.detach()}, tensors)
    assert folder.name == "step-000001" and (folder / "state.json").is_file()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    from sdedge.export.bases import write_builtin_base

    root = tmp_path_factory.mktemp("trainer-documents")
    base = write_builtin_base("tiny-random", root / "base", seed=0)
    return base, disc_dataset(root / "data", {"red": (220, 30, 30), "green": (30, 200, 40)}, n=4)


class Recording(Trainer):
    """The SD 1.x Trainer noting what each seam was handed: the resumed state and each checkpoint's state."""

    def prepare_optimizer(self, opt_state, state):
        self.resumed_state = state
        super().prepare_optimizer(opt_state, state)

    def checkpoint_state(self, step, loss, optimizer):
        state = super().checkpoint_state(step, loss, optimizer)
        self.saved = [*getattr(self, "saved", []), state]
        return state


def test_a_resumed_run_gets_the_checkpoint_state_and_writes_an_adapter_document(inputs, tmp_path):
    base, data = inputs
    kw = dict(base=str(base), data=str(data), out=str(tmp_path / "run"), rank=4, batch_size=2, max_steps=2,
              checkpoint_steps=1, learning_rate=1e-2, seed=1, progress=False, tensorboard=False)
    first = Recording(TrainConfig(**kw), stop_after=1)
    first.run()  # stopped after step 1's checkpoint
    assert first.resumed_state is None  # a new run: no checkpoint state
    assert [type(s) for s in first.saved] == [CheckpointState] and first.saved[0].step == 1
    again = Recording(TrainConfig(**kw, resume="latest"))
    result = again.run()
    state = again.resumed_state
    assert isinstance(state, CheckpointState) and isinstance(state.optimizer, OptimizerRest)
    assert state.step == 1 == result.resumed_from and state.base_sha256 == again.base.sha256
    assert set(state.files) == {"trainable.safetensors", "optimizer.safetensors"}
    assert state == _as_written(first.saved[0], state.files)  # what was saved is what resumes
    doc = read_adapter_json(tmp_path / "run" / "adapter.json")
    assert isinstance(doc, AdapterDocument) and doc.resumed_from == 1 and doc.steps == 2
    assert doc.lora.alpha == 4.0 and doc.lora.unet_targets == tuple(again.cfg.target_modules)


def _as_written(state: CheckpointState, files: dict) -> CheckpointState:
    """`state` as save_checkpoint writes it (its tensor files' SHA-256 added) and a reader reads it back."""
    return STATE.parse(STATE.to_dict(dataclasses.replace(state, files=files)))


def test_the_same_adapter_weights_are_the_same_bytes(tmp_path):
    """safetensors writes its header's metadata in hash-map order, new in each map: write_adapter (the one writer,
    runtime/tensor_files.py) sorts it, so the same tensors and metadata give the same file (and adapter.json the
    same SHA-256), which still loads, its tensor bytes those safetensors itself writes."""
    from safetensors import safe_open
    from safetensors.torch import save

    from sdedge.trainer.adapter import write_adapter

    tensors = {"unet.a.lora_A.weight": torch.arange(12.0).reshape(3, 4), "unet.a.lora_B.weight": torch.ones(4, 3)}
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "4.0",
            "ss_base_model_version": "sd_v1", "ss_training_comment": "trained with sdedge é"}
    files = []
    for i in range(8):
        path = tmp_path / f"{i}.safetensors"
        write_adapter(path, tensors, dict(reversed(meta.items())) if i % 2 else meta)
        files.append(path.read_bytes())
    assert all(f == files[0] for f in files)
    with safe_open(str(tmp_path / "0.safetensors"), framework="pt") as f:
        assert f.metadata() == meta and all(torch.equal(f.get_tensor(k), t) for k, t in tensors.items())
    size = int.from_bytes(files[0][:8], "little")
    assert list(json.loads(files[0][8:8 + size])["__metadata__"]) == sorted(meta)
    assert _tensor_bytes(files[0]) == _tensor_bytes(save(tensors, metadata=meta)) == _tensor_bytes(save(tensors))


def _tensor_bytes(data: bytes) -> bytes:
    """What follows a safetensors file's 8-byte header size and header."""
    return data[8 + int.from_bytes(data[:8], "little"):]
