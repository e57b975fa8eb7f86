"""`sdedge quickstart` end to end in a fresh process, as a new user runs it."""

import json

import pytest
from conftest import run_cli


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
    # the LoRA teaches the colour the base never saw; the base still draws the colours it knows
    print("\nquickstart summary:", {k: summary[k] for k in ("match_rate_base", "match_rate_lora",
                                                          "match_rate_lora_int8", "match_rate_base_known_colours",
                                                          "int8_psnr", "int8_size_ratio", "seconds_total")})
    assert summary["match_rate_lora"] >= summary["match_rate_base"] + 0.1, summary
    assert summary["match_rate_base_known_colours"] >= 0.5
    assert summary["int8_psnr"] >= 15 and summary["parity_lora_image_psnr_db"] >= 40
    assert summary["bench_prompt_match"] is not None
    for b in ("bundle", "bundle_int8"):
        assert (out / b.replace("_", "-") / "sdedge.json").is_file() and (out / b.replace("_", "-") / "model.sig").is_file()
    assert (out / "tiny-base" / "model_index.json").is_file()
    assert summary["signer"].startswith("key sha256:")
    verify = run_cli("verify", str(out / "bundle"), "--public-key", summary["public_key"])
    assert verify.returncode == 0, verify.stderr
    assert "quickstart done" in r.stderr and str(out / "bundle") in r.stderr
    # a second run refuses to clobber the folder without --overwrite
    again = run_cli("quickstart", "--out", str(out))
    assert again.returncode == 2 and "--overwrite" in again.stderr
