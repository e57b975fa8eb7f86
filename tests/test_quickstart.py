"""`sdedge quickstart` end to end in a fresh process, as a new user runs it."""

import json
from pathlib import Path

import pytest
from conftest import run_cli

from sdedge.quickstart_lora import FASTER_BY

# Honest floors, measured on the 2-core machine (docs/tiny-base.md, "Teaching it purple"): the quickstart's recipe
# (prior preservation, rank 64 on RECOVERY_TARGETS, fused at 0.75) reached 0.72-0.94 on the new colour over five
# training seeds (mean 0.83; issue 23 asks 0.85; the base 0.36) and kept the base colours at 0.72-0.88 (mean 0.80,
# the base 0.85; seed 0, the quickstart's, 0.94 / 0.73); a CPU with other vector units trains another trajectory. The
# floor leaves about 1.5 standard errors (0.07 on 36 images) under the lowest seed and still fails an unfused or
# untrained LoRA (the base's 0.36); the drift cap one (0.055 on 60 images) over the largest drift, and still fails a
# recipe that loses the base colours as the guided loss (0.15) or the base's own images as the prior (0.65) did.
NEW_COLOUR_FLOOR = 0.60
BASE_DRIFT_CAP = 0.19


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    out = tmp_path / "qs"
    r = run_cli("quickstart", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parity_image_psnr_db"] >= 40
    assert all(v <= 1e-3 for v in summary["parity_max_abs_err"].values())
    from PIL import Image

    assert Image.open(summary["images"]["before_after"]).size[0] > 64 * 18
    assert Image.open(summary["images"]["base_colours"]).size[0] > 64 * 30
    # issue 23: the LoRA teaches the colour the base never saw (36 images), keeps the base colours (30 captions x 2
    # seeds), and the optimised bundle is the one the speed gate measured faster, as good as fp32
    rates, opt = summary["match_rates"], summary["optimised"]
    print("\nquickstart summary:", rates, opt, summary["seconds_total"])
    assert summary["images_per_rate"] == 36 and summary["images_per_base_colour_rate"] == 60
    assert rates["base"]["new_colour"] <= 0.5 and rates["base"]["base_colours"] >= 0.75, rates
    assert rates["lora_fp32"]["new_colour"] >= NEW_COLOUR_FLOOR, rates
    # the recipe trains purple's token row beside the LoRA (--train-tokens), fused into the bundle's text encoder, at
    # rank 64 on RECOVERY_TARGETS, with the 180 rendered base-colour scenes as its prior (--prior-data, weight 1)
    adapter = json.loads((out / "lora" / "adapter.json").read_text())
    assert list(adapter["tokens"]) == ["purple"] and adapter["config"]["token_lr"] == 3e-3, adapter["tokens"]
    assert adapter["config"]["rank"] == 64 and "conv1" in adapter["config"]["target_modules"], adapter["config"]
    assert adapter["prior"]["images"] == 180 and adapter["prior"]["weight"] == 1.0, adapter["prior"]
    assert adapter["prior"]["path"] == str((out / "prior-data").resolve())
    assert rates["lora_fp32"]["base_colours"] >= rates["base"]["base_colours"] - BASE_DRIFT_CAP, rates
    if opt["precision"] == "fp32":  # nothing reduced was faster here: the reason names each candidate's speed
        assert opt["speed_ratio"] is None and all(" not faster here" in t or "off by" in t for t in opt["tried"])
        assert rates["optimised"] == rates["lora_fp32"] and opt["reason"].startswith("kept the fp32 bundle")
    else:
        assert opt["speed_ratio"] >= FASTER_BY and opt["precision"] in ("int8", "bf16"), opt
        for k in ("new_colour", "base_colours"):
            assert abs(rates["optimised"][k] - rates["lora_fp32"][k]) <= 0.05, rates
        assert (out / f"bundle-{opt['precision']}" / "model.sig").is_file()
    assert summary["parity_lora_image_psnr_db"] >= 40
    assert summary["bench_prompt_match"] is not None
    # fast mode: the shipped LCM-LoRA and tiny decoder at 4 LCM steps and guidance 1, beside the 20-step bundle
    fast = summary["fast_mode"]
    b20, f4 = fast["base_20_steps"], fast["fast"]
    print("fast mode:", fast)
    assert (b20["steps"], f4["steps"], f4["scheduler"], f4["guidance"]) == (20, 4, "lcm", 1.0)
    assert b20["images"] == f4["images"] == 30
    assert 0 < f4["seconds_per_image"] < b20["seconds_per_image"] and fast["speedup"] >= 2.0, fast
    # the shipped LCM-LoRA's own figures are in benchmarks/results/tiny-lcm (30 captions here: a coarse rate)
    assert f4["prompt_match"] >= 0.4 and b20["prompt_match"] >= 0.6, fast
    assert fast["parity_image_psnr_db"] >= 40 and fast["decoder_psnr_vs_full_db"] >= 20, fast
    assert (out / "bundle-fast" / "sdedge.json").is_file()
    assert "10/10 fast mode" in r.stderr
    for b in ("bundle", "bundle_optimised"):
        assert (Path(summary[b]) / "sdedge.json").is_file() and (Path(summary[b]) / "model.sig").is_file()
    assert (out / "tiny-base" / "model_index.json").is_file()
    assert summary["signer"].startswith("key sha256:")
    verify = run_cli("verify", str(out / "bundle"), "--public-key", summary["public_key"])
    assert verify.returncode == 0, verify.stderr
    assert "quickstart done" in r.stderr and str(out / "bundle") in r.stderr
    # a second run refuses to clobber the folder without --overwrite
    again = run_cli("quickstart", "--out", str(out))
    assert again.returncode == 2 and "--overwrite" in again.stderr
