"""`sdedge quickstart` end to end in a fresh process, as a new user runs it."""

import json

from conftest import run_cli


def test_quickstart_end_to_end(tmp_path):
    out = tmp_path / "qs"
    r = run_cli("quickstart", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parity_image_psnr_db"] >= 40
    assert all(v <= 1e-3 for v in summary["parity_max_abs_err"].values())
    for image in summary["images"]:
        from PIL import Image

        assert Image.open(image).size == (64, 64)
    assert (out / "bundle" / "sdedge.json").is_file() and (out / "tiny-base" / "model_index.json").is_file()
    assert (out / "bundle" / "model.sig").is_file() and summary["signer"].startswith("key sha256:")
    verify = run_cli("verify", str(out / "bundle"), "--public-key", summary["public_key"])
    assert verify.returncode == 0, verify.stderr
    assert "quickstart done" in r.stderr and str(out / "bundle") in r.stderr
    # a second run refuses to clobber the folder without --overwrite
    again = run_cli("quickstart", "--out", str(out))
    assert again.returncode == 2 and "--overwrite" in again.stderr
