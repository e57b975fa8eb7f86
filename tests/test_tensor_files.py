"""The one safetensors writer (runtime/tensor_files.py `write_safetensors`) and every writer that uses it: the same
tensors and metadata, in whatever insertion order, give the same bytes; a failure while writing leaves the old file.

safetensors (0.8) alone writes the header's `__metadata__` in hash-map order, new for each map, so the same tensors
gave other bytes from one save to the next (`test_safetensors_alone_is_not_byte_stable` keeps that in view)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import save_file as pt_save_file

from sdedge.runtime.tensor_files import write_safetensors

META = {"format": "pt", "ss_network_dim": "4", "ss_network_alpha": "4.0", "writer": "sdedge test",
        "note": 'quotes " and \\ and a newline\n, a tab\t, a control \x01 and non-ASCII é ✓'}
SAVERS = {"torch": pt_save_file, "numpy": np_save_file}


def _tensors(kind: str) -> dict:
    t = {"b.weight": torch.arange(12.0).reshape(3, 4), "a.bias": torch.ones(3, dtype=torch.float16),
         "c.ids": torch.arange(5, dtype=torch.int64).unsqueeze(0), "d.scalar": torch.tensor(2.5)}
    return t if kind == "torch" else {k: v.numpy() for k, v in t.items()}


def _header(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file's header (its key order kept) and what follows it (the tensors' bytes)."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]), data[8 + size:]


def _orders(meta: dict) -> list[dict]:
    """The same metadata in eight insertion orders."""
    keys = list(meta)
    return [{k: meta[k] for k in (keys[i:] + keys[:i])[::(-1) ** i]} for i in range(8)]


def _saves(tmp_path: Path, write) -> list[bytes]:
    out = []
    for i, meta in enumerate(_orders(META)):
        path = tmp_path / f"{i}.safetensors"
        write(path, meta)
        out.append(path.read_bytes())
    return out


def test_safetensors_alone_is_not_byte_stable(tmp_path):
    files = _saves(tmp_path, lambda p, m: pt_save_file(_tensors("torch"), str(p), metadata=m))
    assert len(set(files)) > 1


@pytest.mark.parametrize("kind", sorted(SAVERS))
def test_the_same_tensors_and_metadata_are_the_same_bytes(tmp_path, kind):
    files = _saves(tmp_path, lambda p, m: write_safetensors(p, _tensors(kind), m, SAVERS[kind]))
    assert all(f == files[0] for f in files)
    header, data = _header(files[0])
    assert list(header["__metadata__"]) == sorted(META)
    raw = tmp_path / "raw.safetensors"
    SAVERS[kind](_tensors(kind), str(raw), metadata=META)
    raw_header, raw_data = _header(raw.read_bytes())
    # only the metadata's order differs from what safetensors wrote: the same header length, entries and tensor bytes
    assert len(raw.read_bytes()) == len(files[0]) and raw_data == data and raw_header == header
    with safe_open(str(tmp_path / "0.safetensors"), framework="np") as f:
        assert f.metadata() == META
        assert all(np.array_equal(f.get_tensor(k), np.asarray(v)) for k, v in _tensors(kind).items())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{i}.safetensors" for i in range(8)] +
                                                                ["raw.safetensors"])


def test_without_metadata_the_file_is_what_safetensors_writes(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", _tensors("torch"), None, pt_save_file)
    pt_save_file(_tensors("torch"), str(tmp_path / "b.safetensors"))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def _old_file(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"old": torch.zeros(2)}, {"format": "pt"}, pt_save_file)
    return path, path.read_bytes()


def test_an_error_from_the_tensors_leaves_the_old_file(tmp_path):
    path, old = _old_file(tmp_path)
    tensors = {"a": torch.ones(3), "b": torch.ones(4, 4).t()}  # not contiguous: safetensors refuses it
    with pytest.raises(ValueError, match="non contiguous"):
        write_safetensors(path, tensors, META, pt_save_file)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_an_error_after_the_tensors_are_written_leaves_the_old_file(tmp_path):
    """The whole new file was on disk under its temporary name when the writer failed: it is never renamed in."""
    path, old = _old_file(tmp_path)

    def save_then_fail(tensors, name, metadata=None):
        pt_save_file(tensors, name, metadata=metadata)
        assert Path(name).stat().st_size > len(old)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_safetensors(path, _tensors("torch"), META, save_then_fail)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_a_write_that_fails_midway_leaves_the_old_file(tmp_path):
    """A 4 MB file under a 1 MB file-size limit: the disk refuses the write half-way (EFBIG), inside safetensors."""
    path, old = _old_file(tmp_path)
    script = textwrap.dedent(f"""
        import resource, signal, numpy as np
        from safetensors.numpy import save_file
        from sdedge.runtime.tensor_files import write_safetensors
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            write_safetensors({str(path)!r}, {{"big": np.ones(1 << 20, np.float32)}}, {{"format": "np"}}, save_file)
        except Exception as e:
            print("failed:", type(e).__name__, e)
        else:
            print("written")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("failed:"), out.stdout
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


# -- every writer that uses it -------------------------------------------------------------------------------------
def _same_bytes(paths) -> bytes:
    files = [Path(p).read_bytes() for p in paths]
    assert all(f == files[0] for f in files)
    return files[0]


def test_single_file_checkpoints_are_byte_stable(tiny_pipe, tmp_path):
    from sdedge.export.single_file import save_single_file

    data = _same_bytes(save_single_file(tiny_pipe, tmp_path / f"{i}.safetensors") for i in range(4))
    assert list(_header(data)[0]["__metadata__"]) == ["format", "writer"]


def test_sdxl_single_file_checkpoints_are_byte_stable(tmp_path):
    from sdedge.export.sdxl_base import build_sdxl_pipeline, save_sdxl_single_file

    pipe = build_sdxl_pipeline("sdxl-tiny")
    data = _same_bytes(save_sdxl_single_file(pipe, tmp_path / f"{i}.safetensors") for i in range(4))
    assert list(_header(data)[0]["__metadata__"]) == ["format", "writer"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i}.safetensors" for i in range(4)]


def test_hub_layout_text_encoder_rewrite_is_byte_stable_and_atomic(tmp_path):
    from sdedge.export.base_io import hub_layout_text_encoder

    tensors = {k: np.asarray(v) for k, v in _tensors("numpy").items()}
    folders = []
    for i, meta in enumerate(_orders(META)[:4]):
        folder = tmp_path / str(i)
        folder.mkdir()
        np_save_file(tensors, str(folder / "model.safetensors"), metadata=meta)
        assert hub_layout_text_encoder(folder) == len(tensors)
        assert [p.name for p in folder.iterdir()] == ["model.safetensors"]
        folders.append(folder / "model.safetensors")
    header, _ = _header(_same_bytes(folders))
    assert list(header["__metadata__"]) == sorted(META) and all(k.startswith("text_model.") for k in header
                                                                if k != "__metadata__")


def test_pack_lcm_lora_is_byte_stable(tmp_path):
    from sdedge.tinyworld.lcm_lora import PACKAGED, pack_lcm_lora

    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter.json").write_text(json.dumps({"steps": 3, "final_loss": 0.5}))
    notes, paths = [], []
    for i, meta in enumerate(_orders(META)[:4]):
        pt_save_file(_tensors("torch"), str(run / "adapter.safetensors"), metadata=meta)
        notes.append(pack_lcm_lora(run, tmp_path / f"data{i}"))
        paths.append(tmp_path / f"data{i}" / f"{PACKAGED}.safetensors")
    header, _ = _header(_same_bytes(paths))
    assert list(header["__metadata__"]) == sorted(META)
    assert len({n["sha256"] for n in notes}) == 1 and {v["dtype"] for k, v in header.items() if k != "__metadata__"} \
        == {"F16"}


def test_random_lcm_lora_is_byte_stable(tiny_base, tmp_path):
    from sdedge.benchmarks.fast_inputs import write_random_lcm_lora

    data = _same_bytes(write_random_lcm_lora(tiny_base, tmp_path / f"{i}.safetensors") for i in range(2))
    assert _header(data)[0]["__metadata__"] == {"format": "pt"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.safetensors", "1.safetensors"]
