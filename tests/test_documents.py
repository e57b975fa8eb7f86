"""The seven on-disk JSON documents through their one reader/writer (runtime/documents.py): each round-trips, an
unknown key, a wrong version and a wrong type are refused naming the file and the key, and the older versions
(the committed results here, and the keys documents carried before the format/version convention) still read."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

import pytest

from sdedge.benchmarks.report import REPORT, ReportError
from sdedge.export.markers import (
    BASE_MARKER,
    PRUNED,
    BaseMarker,
    ParentInfo,
    PrunedMarker,
    guidance_hint,
    read_base_marker,
    read_pruned_marker,
)
from sdedge.runtime.errors import BundleError, SdedgeError
from sdedge.runtime.manifest import (
    MANIFEST,
    ComponentInfo,
    Defaults,
    FileEntry,
    LatentInfo,
    Manifest,
    Precision,
    Provenance,
    PruneReport,
    ShapeRange,
    TensorInfo,
    TokenizerInfo,
    parse_manifest,
)
from sdedge.runtime.manifest import BaseInfo as ManifestBase
from sdedge.runtime.strict import ConfigError, to_dict
from sdedge.trainer.adapter import ADAPTER_JSON, read_adapter_json, write_adapter_json
from sdedge.trainer.checkpoint import STATE, CheckpointState, OptimizerRest
from sdedge.trainer.dataset import load_prepared
from sdedge.trainer.prepare import DATASET, Counts, DataItem, DatasetMetadata

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
TRAIN_STEP = RESULTS / "train-step-sd15-arch-256"
SHA = "ab" * 32


# -- one of each ------------------------------------------------------------------------------------------------
def _manifest() -> Manifest:
    tensor = TensorInfo("sample", "float32", ("batch", 4, "h", "w"))
    comp = {n: ComponentInfo(f"{n}/model.onnx", (tensor,), (tensor,), 17) for n in ("text_encoder", "unet",
                                                                                    "vae_decoder")}
    return Manifest(
        pipeline="sd15", precision=Precision.FP16, components=comp,
        files={c.file: FileEntry(SHA, 10) for c in comp.values()},
        shapes=ShapeRange(1, 2, 64, 512, 64, 512, 64, 256, 256),
        latent=LatentInfo(4, 8, 0.18215), tokenizer=TokenizerInfo("tokenizer", 77),
        scheduler={"num_train_timesteps": 1000}, defaults=Defaults(20, 7.5, "dpm++"),
        provenance=Provenance(ManifestBase("builtin:tiny@seed0", SHA), "2026-12-02T00:00:00Z", {"sdedge": "0.1"}))


def _prune() -> PruneReport:
    return PruneReport(0.3, "magnitude", 100, 70, 1000, 600, "(1, 4, 32, 32)")


def _dataset() -> DatasetMetadata:
    item = DataItem("images/a.png", "captions/a.txt", "a red circle", 64, 64, SHA, SHA, "0" * 48, "a.png", SHA, "PNG",
                    (80, 64))
    return DatasetMetadata("2026-12-02T00:00:00+00:00", "/src", 64, False, {"resolution": 64},
                           Counts(1, 1, 0, 0), (item,), SHA)


def _checkpoint() -> CheckpointState:
    groups = ({"lr": 1e-4, "betas": [0.9, 0.999], "params": [0, 1]},)
    return CheckpointState(step=3, optimizer=OptimizerRest(groups, {"0.step": 3.0}), config={"rank": 4},
                           base_sha256=SHA, dataset_sha256=SHA, loss=0.25, files={"trainable.safetensors": SHA})


# a committed report written before the document format (schema_version 1 and kind); the refreshed quickstart
# report is version 2 and cannot stand in for it
BENCH_V1 = RESULTS / "cpu-sd15-256" / "2026-11-25_epyc-2c_a645ba7" / "report.json"


def _bench_v1() -> dict:
    data = json.loads(BENCH_V1.read_text())
    assert (data.get("schema_version"), data.get("kind")) == (1, "sdedge-bench"), f"{BENCH_V1} is not a v1 report"
    return data


DOCUMENTS = {  # name: (its DocumentType, one document, the error class it raises)
    "manifest": (MANIFEST, _manifest(), BundleError),
    "base-marker": (BASE_MARKER, BaseMarker("tiny", 0, "sdedge.export.bases", {"unet": 10}, True, 7.5), ConfigError),
    "pruned-marker": (PRUNED, PrunedMarker(ParentInfo("builtin:tiny@seed0", SHA, "/bases/tiny"), _prune(), 7.5),
                      ConfigError),
    "dataset": (DATASET, _dataset(), ConfigError),
    "checkpoint": (STATE, _checkpoint(), ConfigError),
    "adapter": (ADAPTER_JSON, ADAPTER_JSON.read(TRAIN_STEP / "runs" / "cached" / "adapter.json"), ConfigError),
    "bench-report": (REPORT, REPORT.parse(_bench_v1()), ReportError),
}
# a key of each document whose value a wrong type replaces, and the key path the error must name
WRONG_TYPE = {
    "manifest": (("shapes", "batch_max"), "two", r"\.shapes\.batch_max: expected an integer"),
    "base-marker": (("seed",), "0", r"\.seed: expected an integer"),
    "pruned-marker": (("prune", "ratio"), "0.3", r"\.prune\.ratio: expected a number"),
    "dataset": (("counts", "kept"), -1, r"\.counts\.kept: -1 is below the minimum 0"),
    "checkpoint": (("step",), 3.5, r"\.step: expected an integer"),
    "adapter": (("lora", "rank"), True, r"\.lora\.rank: expected an integer"),
    "bench-report": (("settings", "isolation"), "thread", r"\.settings\.isolation: 'thread' is not one of"),
}


def _write(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", DOCUMENTS)
def test_round_trip(name, tmp_path):
    kind, obj, _ = DOCUMENTS[name]
    path = tmp_path / kind.name
    kind.write(path, obj)
    data = json.loads(path.read_text())
    assert list(data)[:2] == ["format", "version"] and (data["format"], data["version"]) == (kind.format, kind.version)
    assert kind.read(path) == obj
    assert kind.read_dict(path) == data


@pytest.mark.parametrize("name", DOCUMENTS)
def test_unknown_key_wrong_version_wrong_type_are_refused_naming_file_and_key(name, tmp_path):
    kind, obj, error = DOCUMENTS[name]
    good = kind.to_dict(obj)
    path = tmp_path / kind.name
    with pytest.raises(error, match=rf"{path}: unknown key 'colour'"):
        kind.read(_write(path, {**good, "colour": "red"}))
    with pytest.raises(error, match=rf"{path}: version {kind.version + 1} is unknown.*upgrade sdedge"):
        kind.read(_write(path, {**good, "version": kind.version + 1}))
    with pytest.raises(error, match=rf"{path}: version 0 is unknown"):
        kind.read(_write(path, {**good, "version": 0}))
    with pytest.raises(error, match=rf"{path}: format 'sdedge-other', not '{kind.format}'"):
        kind.read(_write(path, {**good, "format": "sdedge-other"}))
    keys, value, message = WRONG_TYPE[name]
    bad = copy.deepcopy(good)
    target = bad
    for k in keys[:-1]:
        target = target[k]
    target[keys[-1]] = value
    with pytest.raises(error, match=re.escape(str(path)) + message):
        kind.read(_write(path, bad))
    with pytest.raises(error, match=rf"{path}: not valid JSON"):
        path.write_text("{not json")
        kind.read(path)


def test_what_does_not_read_back_is_not_written(tmp_path):
    """The writer parses what it is about to write: a NaN (JSON has none) or a wrong type never reaches the disk."""
    path = tmp_path / "sdedge_base.json"
    with pytest.raises(ConfigError, match=r"sdedge_base.json \(being written\)\.default_guidance: nan is not a finite"):
        BASE_MARKER.write(path, BaseMarker("tiny", 0, default_guidance=float("nan")))
    with pytest.raises(ConfigError, match=r"\.seed: expected an integer"):
        BASE_MARKER.write(path, BaseMarker("tiny", "0"))
    assert list(tmp_path.iterdir()) == []


# -- the older versions ----------------------------------------------------------------------------------------
def test_older_manifest_reads():
    """Bundles written before the convention: "format_version": 1, and (before SDXL) no pipeline."""
    new = MANIFEST.to_dict(_manifest())
    old = {k: v for k, v in new.items() if k not in ("format", "version", "pipeline")}
    assert parse_manifest({"format_version": 1, **old}) == _manifest()
    with pytest.raises(BundleError, match="format_version 2 is unknown.*upgrade sdedge"):
        parse_manifest({"format_version": 2, **old})
    with pytest.raises(BundleError, match="unknown key 'format_version'"):  # one convention per document
        parse_manifest({**new, "format_version": 1})
    assert _manifest().format_version == 2


def test_older_markers_read(tmp_path, caplog):
    """A built-in base written before the convention carries no version keys; a pruned note is version 1."""
    (tmp_path / "sdedge_base.json").write_text(json.dumps(
        {"builtin": "sdxl-tiny", "seed": 1, "writer": "sdedge.export.sdxl_base", "parameters": {"unet": 5},
         "trained": False, "dtype": "float32"}))
    assert read_base_marker(tmp_path) == BaseMarker("sdxl-tiny", 1, "sdedge.export.sdxl_base", {"unet": 5},
                                                    dtype="float32")
    (tmp_path / "sdedge_base.json").write_text('{"builtin": "tiny", "seed": 0, "colour": 1}')
    assert read_base_marker(tmp_path) is None and guidance_hint(tmp_path) == 7.5  # a plain folder, logged:
    assert "sdedge_base.json: unknown key 'colour'" in caplog.text
    note = PRUNED.to_dict(DOCUMENTS["pruned-marker"][1])
    (tmp_path / "sdedge_pruned.json").write_text(json.dumps({**note, "prune": {**note["prune"], "ratio": "x"}}))
    with pytest.raises(SdedgeError, match=r"sdedge_pruned.json is damaged \(.*\.prune\.ratio: expected a number"):
        read_pruned_marker(tmp_path)
    (tmp_path / "sdedge_pruned.json").write_text(json.dumps(note))
    assert read_pruned_marker(tmp_path).prune == _prune() and guidance_hint(tmp_path) == 7.5


def test_older_checkpoint_state_reads(tmp_path):
    """state.json of earlier sdedge versions: a bare "version": 1, no format, and (earlier still) no files or
    teacher_sha256."""
    state = STATE.to_dict(_checkpoint())
    old = {k: v for k, v in state.items() if k not in ("format", "version", "files", "teacher_sha256")}
    read = STATE.read(_write(tmp_path / "state.json", {"version": 1, **old}))
    assert read.step == 3 and read.files == {} and read.teacher_sha256 is None
    with pytest.raises(ConfigError, match="state.json: version 2 is unknown"):  # a bare version is version 1 only
        STATE.read(_write(tmp_path / "state.json", {"version": 2, **old}))


def test_checkpoint_round_trip_and_an_older_one_resumes(tmp_path):
    """save_checkpoint stages the folder (runtime/files.py staged_dir) and writes state.json last; a checkpoint
    whose state.json is the old bare version 1 loads as before."""
    import torch

    from sdedge.trainer.checkpoint import latest_checkpoint, optimizer_to_flat, read_checkpoint, save_checkpoint

    p = torch.nn.Parameter(torch.ones(2, 3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.full_like(p, 0.5)
    opt.step()
    opt_tensors, opt_rest = optimizer_to_flat(opt.state_dict())
    state = CheckpointState(step=7, optimizer=opt_rest, config={"rank": 4}, world_size=1, base_sha256=SHA,
                            teacher_sha256=None, dataset_sha256=SHA, loss=0.5, optimizer_kind="adamw", scaler=None)
    folder = save_checkpoint(tmp_path, state, {"w": p.detach()}, opt_tensors)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["step-000007"]  # no scratch folder left
    got = read_checkpoint(folder)
    trainable, optimizer, state = got.trainable, got.optimizer, got.state
    assert torch.equal(trainable["w"], p.detach()) and state.step == 7 and state.base_sha256 == SHA
    assert optimizer["param_groups"][0]["betas"] == (0.9, 0.999)
    doc = json.loads((folder / "state.json").read_text())
    assert (doc.pop("format"), doc.pop("version")) == ("sdedge-checkpoint", 2)
    del doc["files"], doc["teacher_sha256"]
    _write(folder / "state.json", {"version": 1, **doc})  # as sdedge wrote it before
    assert read_checkpoint(folder).state.step == 7 and latest_checkpoint(tmp_path) == folder


def test_older_dataset_and_adapter_read():
    """The committed train-step results: a dataset prepared before --caption-model (no caption_by, no
    caption_model) loads with every file's SHA-256 checked; its adapter.json (no distilled_from) reads."""
    data = load_prepared(TRAIN_STEP / "data")
    meta = DATASET.read(TRAIN_STEP / "data" / "metadata.json")
    assert len(data.items) == 8 == meta.counts.kept and data.sha256 == meta.dataset_sha256
    assert meta.caption_model is None and all(it.caption_by == "file" for it in meta.items)
    for run in ("cached", "uncached"):
        adapter = read_adapter_json(TRAIN_STEP / "runs" / run / "adapter.json")
        assert adapter.distilled_from is None and adapter.dataset.sha256 == data.sha256 and adapter.lora.rank == 16


def test_adapter_json_is_checked_before_it_is_written(tmp_path):
    """write_adapter_json takes the AdapterDocument a trainer builds: checked to read back before it is written (a
    wrong value names its key and nothing is written); a dict of its fields is refused."""
    doc = DOCUMENTS["adapter"][1]
    write_adapter_json(tmp_path / "adapter.json", doc)
    assert read_adapter_json(tmp_path / "adapter.json") == doc
    with pytest.raises(ConfigError, match=r"b.json \(being written\)\.lora\.rank: -1 is below the minimum 0"):
        write_adapter_json(tmp_path / "b.json", dataclasses.replace(doc, lora=dataclasses.replace(doc.lora, rank=-1)))
    assert not (tmp_path / "b.json").exists()
    fields = {k: v for k, v in ADAPTER_JSON.read_dict(tmp_path / "adapter.json").items() if k not in ("format", "version")}
    with pytest.raises(TypeError, match="write_adapter_json: doc is a dict, not an AdapterDocument"):
        write_adapter_json(tmp_path / "c.json", fields)
    assert not (tmp_path / "c.json").exists()


def test_older_bench_reports_read():
    """Every committed report.json (version 1: schema_version and kind, or version 2) reads; a v1 of another kind
    does not."""
    reports = sorted(RESULTS.rglob("report.json"))
    assert len(reports) >= 3
    for path in reports:
        assert REPORT.read(path).engines
    with pytest.raises(ReportError, match="kind 'other-bench', not 'sdedge-bench'"):
        REPORT.parse({**_bench_v1(), "kind": "other-bench"})
    with pytest.raises(ReportError, match="schema_version 2 is unknown"):
        REPORT.parse({**_bench_v1(), "schema_version": 2})
    target = REPORT.parse(_bench_v1()).target
    assert target is None or all(isinstance(v.passed, bool) for v in target.engines.values())


def test_report_target_keeps_its_pass_key():
    """The `pass` key of target.engines (a Python keyword) reads into EngineTarget.passed and writes back as
    `pass`."""
    from sdedge.benchmarks.report import EngineTarget

    v1 = _bench_v1()
    v1["target"] = {"seconds": 1.0, "statistic": "median", "verdict": "pass", "statement": "PASS",
                    "engines": {"sdedge": {"seconds": 0.5, "pass": True}}}
    report = REPORT.parse(v1)
    assert report.target.engines == {"sdedge": EngineTarget(0.5, True)}
    assert REPORT.to_dict(report)["target"]["engines"] == {"sdedge": {"seconds": 0.5, "pass": True}}
    v1["target"]["engines"]["sdedge"] = {"seconds": 0.5, "passed": True}
    with pytest.raises(ReportError, match=r"report.json.target.engines.sdedge: unknown key 'passed'"):
        REPORT.parse(v1)


def test_documents_are_in_the_runtime_core_without_torch():
    """The generic reader is runtime: importing it (and the manifest) pulls in no torch."""
    import subprocess
    import sys

    code = ("import sys, sdedge.runtime.documents, sdedge.runtime.manifest; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
    assert to_dict(_manifest())["pipeline"] == "sd15"



def test_the_run_marker_is_a_document_and_folder_markers_are_read_through_their_type(tmp_path):
    """sdedge_run.json is written and read by runtime/documents.py; the --overwrite test (runtime/files.py) asks the
    marker's DocumentType whether a file declares it, looking at its format alone."""
    from sdedge.runtime.errors import BadInput
    from sdedge.runtime.files import check_sdedge_folder
    from sdedge.trainer.run_setup import RUN, RUN_MARKER, RUN_MARKERS, RunMarker

    run = tmp_path / "run"
    run.mkdir()
    RUN.write(run / RUN_MARKER, RunMarker())
    assert json.loads((run / RUN_MARKER).read_text()) == {"format": "sdedge-train-run", "version": 1}
    assert RUN.read(run / RUN_MARKER) == RunMarker() and RUN.declared_by(run / RUN_MARKER)
    check_sdedge_folder(run, RUN_MARKERS)  # passes
    other = tmp_path / "other"
    other.mkdir()
    for text in ('{"format": "sdedge-data", "version": 1}', "not json", "[]", '{"format": "sdedge-train-run"'):
        (other / RUN_MARKER).write_text(text)
        assert not RUN.declared_by(other / RUN_MARKER), text
        with pytest.raises(BadInput, match=r"no sdedge_run.json or adapter.json in it"):
            check_sdedge_folder(other, RUN_MARKERS)
    (other / RUN_MARKER).write_text('{"format": "sdedge-train-run", "version": 9}')  # a newer sdedge's run
    assert RUN.declared_by(other / RUN_MARKER)
    (other / RUN_MARKER).unlink()
    (other / RUN_MARKER).symlink_to(run / RUN_MARKER)
    assert not RUN.declared_by(other / RUN_MARKER)
