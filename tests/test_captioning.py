"""`sdedge prepare --caption-model DIR`: images with no caption are captioned by a local BLIP model (here a seeded
tiny BLIP built from transformers' configs, with a tiny BERT tokenizer: mechanics, not quality), the prefix goes
first, metadata.json records the model and its SHA-256; no model is today's behaviour; a folder that is not a
BLIP model is a clear error naming it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdedge.cli import main as sdedge_main
from sdedge.runtime.errors import SdedgeError
from sdedge.trainer.captions import Captioner
from sdedge.trainer.prepare import PrepareOptions, prepare_dataset

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square", "on", "background",
         "photo", "of", "the", "green", "triangle", "small", "big", "white"]


@pytest.fixture(scope="module")
def blip(tmp_path_factory) -> Path:
    """A seeded tiny BLIP captioning model in transformers' layout (safetensors, BERT tokenizer, processor)."""
    from transformers import BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip import BlipImageProcessor

    d = tmp_path_factory.mktemp("tiny-blip")
    (d / "vocab.txt").write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(str(d / "vocab.txt"), do_lower_case=True)  # the vocab file (positional: v4 and v5)
    assert len(tokenizer) == len(WORDS)
    text = dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=64, encoder_hidden_size=32, bos_token_id=2, sep_token_id=3, pad_token_id=0,
                eos_token_id=3)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()
    with torch.no_grad():  # words, never special tokens: a caption of max_new_tokens words
        model.text_decoder.cls.predictions.decoder.bias[:5] = -1e4
    model.save_pretrained(d)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def blip2(tmp_path_factory) -> Path:
    """A seeded tiny BLIP-2 (ViT + Q-Former + OPT) with a word-level tokenizer and its processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, PreTrainedTokenizerFast
    from transformers.models.blip import BlipImageProcessor

    d = tmp_path_factory.mktemp("tiny-blip2")
    words = ["<pad>", "<unk>", "</s>", "<image>", *WORDS[5:]]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.WhitespaceSplit(), decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                        bos_token="</s>", additional_special_tokens=["<image>"])
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg = Blip2Config(vision_config={**small, "image_size": 32, "patch_size": 8},
                      qformer_config={**small, "vocab_size": len(words), "encoder_hidden_size": 32},
                      text_config=dict(model_type="opt", vocab_size=len(words), hidden_size=32, num_hidden_layers=1,
                                       ffn_dim=64, num_attention_heads=2, max_position_embeddings=64,
                                       word_embed_proj_dim=32, pad_token_id=0, bos_token_id=2, eos_token_id=2),
                      num_query_tokens=4, image_token_index=3)
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # special tokens at logit 0: a word wins, the caption is not empty
        model.language_model.lm_head.weight[:4] = 0
    model.save_pretrained(d)
    Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer,
                   num_query_tokens=4).save_pretrained(d)
    return d


def _image(seed: int, size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)


@pytest.fixture()
def photos(tmp_path) -> Path:
    src = tmp_path / "photos"
    src.mkdir()
    for i, name in enumerate(("a", "b", "c")):
        _image(i).save(src / f"{name}.png")
    (src / "a.txt").write_text("a red circle\n", encoding="utf-8")
    return src


def _reference_caption(blip: Path, image: Image.Image, version: str = "") -> str:
    """The model's greedy caption of `image` through transformers itself."""
    model_cls = getattr(transformers, f"Blip{version}ForConditionalGeneration")
    proc = getattr(transformers, f"Blip{version}Processor").from_pretrained(blip, local_files_only=True)
    model = model_cls.from_pretrained(blip, local_files_only=True).eval()
    with torch.no_grad():
        ids = model.generate(**proc(images=image.convert("RGB"), return_tensors="pt"), max_new_tokens=30,
                             do_sample=False, num_beams=1)
    return proc.decode(ids[0], skip_special_tokens=True).strip()


def _items(out: Path) -> tuple[dict, dict]:
    meta = json.loads((out / "metadata.json").read_text(encoding="utf-8"))
    return meta, {e["source"]: e for e in meta["items"]}


@pytest.mark.slow  # two datasets captioned: up to 13 s; fast: test_cli
def test_uncaptioned_images_get_the_models_caption_with_the_prefix(blip, photos, tmp_path):
    out = tmp_path / "data"
    opts = PrepareOptions(resolution=32, min_size=8, dedup=None, caption_model=str(blip), caption_prefix="sks  style")
    report = prepare_dataset(photos, out, opts)
    assert report.kept == 3 and not report.skipped
    meta, items = _items(out)
    assert items["a.png"]["text"] == "a red circle" and items["a.png"]["caption_by"] == "file"  # its own caption kept
    for name in ("b.png", "c.png"):
        want = _reference_caption(blip, Image.open(photos / name))
        assert want and items[name]["text"] == f"sks style {want}" and items[name]["caption_by"] == "model"
        assert (out / items[name]["caption"]).read_text(encoding="utf-8") == f"sks style {want}\n"
    weights = hashlib.sha256(f"model.safetensors  {hashlib.sha256((blip / 'model.safetensors').read_bytes()).hexdigest()}\n"
                             .encode()).hexdigest()
    assert meta["caption_model"] == {"path": str(blip.resolve()), "model_type": "blip", "weights": ["model.safetensors"],
                                     "sha256": weights, "prefix": "sks style", "max_new_tokens": 30, "captioned": 2}
    assert meta["options"]["caption_model"] == str(blip) and meta["options"]["caption_prefix"] == "sks  style"
    again = prepare_dataset(photos, tmp_path / "again", opts)  # greedy decoding: the same captions, the same set
    assert again.dataset_sha256 == report.dataset_sha256


def test_blip2(blip2, photos, tmp_path):
    report = prepare_dataset(photos, tmp_path / "data", PrepareOptions(resolution=32, min_size=8, dedup=None,
                                                                      caption_model=str(blip2), caption_prefix="sks"))
    meta, items = _items(tmp_path / "data")
    assert report.kept == 3 and meta["caption_model"]["model_type"] == "blip-2" and meta["caption_model"]["captioned"] == 2
    want = _reference_caption(blip2, Image.open(photos / "b.png"), "2")
    assert want and items["b.png"]["text"] == f"sks {want}" and items["b.png"]["caption_by"] == "model"


def test_no_model_is_todays_behaviour(photos, tmp_path):
    report = prepare_dataset(photos, tmp_path / "data", PrepareOptions(resolution=32, min_size=8, dedup=None))
    assert report.kept == 1
    skipped = dict(report.skipped)
    assert set(skipped) == {"b.png", "c.png"} and all(r.startswith("no caption") for r in skipped.values())
    meta, items = _items(tmp_path / "data")
    assert meta["caption_model"] is None and list(items) == ["a.png"]


def test_small_images_are_skipped_before_captioning(blip, photos, tmp_path):
    _image(9, (10, 10)).save(photos / "tiny.png")
    report = prepare_dataset(photos, tmp_path / "data", PrepareOptions(resolution=32, dedup=None,
                                                                      caption_model=str(blip)))
    assert dict(report.skipped)["tiny.png"].startswith("too small")
    assert _items(tmp_path / "data")[0]["caption_model"]["captioned"] == 2


def test_a_folder_that_is_not_blip_is_named(blip, photos, tmp_path):
    with pytest.raises(SdedgeError, match=r"--caption-model .*nowhere: not a folder"):
        Captioner(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SdedgeError, match=rf"--caption-model {empty}: no config.json"):
        Captioner(empty)
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text('{"model_type": "clip"}', encoding="utf-8")
    with pytest.raises(SdedgeError, match=rf"{clip}: config.json says model_type 'clip', not a BLIP"):
        Captioner(clip)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_bytes((blip / "config.json").read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(SdedgeError, match=r"no .safetensors weights \(pytorch_model.bin is a pickle"):
        Captioner(pickled)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((blip / "config.json").read_bytes())
    (broken / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(SdedgeError, match=rf"{broken}: cannot load a blip captioning model"):
        Captioner(broken)
    with pytest.raises(SdedgeError, match="--caption-prefix needs --caption-model"):
        prepare_dataset(photos, tmp_path / "out", PrepareOptions(caption_prefix="sks"))
    assert not (tmp_path / "out").exists()


def test_cli(blip, photos, tmp_path, capsys):
    out = tmp_path / "data"
    assert sdedge_main(["prepare", str(photos), "--out", str(out), "--resolution", "32", "--min-size", "8",
                        "--no-dedup", "--caption-model", str(blip), "--caption-prefix", "sks"]) == 0
    meta, items = _items(out)
    assert meta["caption_model"]["captioned"] == 2 and items["b.png"]["text"].startswith("sks ")
    assert sdedge_main(["prepare", str(photos), "--out", str(tmp_path / "x"), "--caption-model",
                        str(photos)]) == 2
    assert f"--caption-model {photos}: no config.json" in capsys.readouterr().err
