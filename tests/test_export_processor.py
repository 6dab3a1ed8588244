"""The exported image processor gives the pixels training gave the model: convert_checkpoint.py's hf and llava-hf
outputs, loaded back with transformers, against create_hdf5_dataset.build_transforms of the same images.

The tiny demo yaml goes through the whole CLI (a freshly built checkpoint); the 7B phase-2 yaml, whose model is too
big to build here, through the functions the CLI calls (exported_image_settings, llava_processor) and convert-config.
Offline, CPU, seconds.

    python -m pytest -q tests/test_export_processor.py
"""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, CLIPImageProcessor

import convert_checkpoint as cc
import create_hdf5_dataset as hd
import model as M
from test_convert_checkpoint import run_cli
from test_convert_llava_hf import TEXTS

ROOT = Path(__file__).resolve().parents[1]
TINY, BIG = ROOT / "configs" / "params_llava_tiny_phase2.yaml", ROOT / "configs" / \
    "params_llava_v1p5_pretrain_7b_phase2_MSL2K.yaml"
PIXEL_TOL = 1e-5


def images() -> list:
    """Non-square (wide and tall), square, grey and tiny images with random pixels."""
    rng = np.random.default_rng(0)
    sizes = [(97, 53), (41, 130), (64, 64), (500, 333), (7, 5)]
    out = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    return out + [Image.fromarray(rng.integers(0, 256, (30, 70), dtype=np.uint8))]  # "L": both convert to RGB


def training_pixels(specs, img) -> np.ndarray:
    return hd.build_transforms(specs)(img.convert("RGB"))  # the H5 reader converts to RGB before the transforms


def max_difference(image_processor, specs, pad_first: bool = False) -> float:
    worst = 0.0
    for img in images():
        if pad_first:  # the LLaVA repo pads (expand2square) in int(255 * image_mean) before a CLIPImageProcessor
            colour = [int(255 * m) for m in image_processor.image_mean]
            img = hd._t_expand_to_square(colour)(img.convert("RGB"))
        theirs = image_processor(images=img, return_tensors="np")["pixel_values"][0]
        ours = training_pixels(specs, img)
        assert theirs.shape == ours.shape
        worst = max(worst, float(np.abs(theirs - ours).max()))
    return worst


def eval_transforms(path: Path) -> list:
    specs, _ = cc.training_transforms(yaml.safe_load(path.read_text()), str(path))
    return specs


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from preprocess_dataset import write_llama_tokenizer

    return write_llama_tokenizer(TEXTS, tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=400)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A run.py-style checkpoint of the tiny demo model, its resolved params in __metadata__."""
    params = yaml.safe_load(TINY.read_text())
    torch.manual_seed(0)
    state = M.LlavaModel(params["model"]).state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint_1.mdl"
    torch.save({"model": state, "__metadata__": [{"version": "2.10.0", "params": params}]}, path)
    return path


# ----------------------------------------------------------------------------------------------
# The tiny demo yaml through the CLI: llava-hf and hf layouts


@pytest.mark.parametrize("with_config", [True, False], ids=["--config", "metadata"])
def test_llava_hf_processor_of_the_demo_yaml_gives_the_training_pixels(tmp_path, tokenizer_dir, tiny_checkpoint,
                                                                       with_config):
    out = tmp_path / "llava_hf"
    config = ["--config", TINY] if with_config else []  # without: the checkpoint's own (resolved) params
    assert run_cli("convert", "--model", "llava", "--src-fmt", "cs-2.2", "--tgt-fmt", "llava-hf", *config,
                   "--tokenizer-dir", tokenizer_dir, "--output-dir", out, "--no-progress-bar", tiny_checkpoint) == 0
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor.image_processor).__name__.startswith("LlavaImageProcessor")
    assert processor.image_processor.resample == 2  # bilinear, as the yaml says (the CLIP default is bicubic)
    assert max_difference(processor.image_processor, eval_transforms(TINY)) <= PIXEL_TOL


def test_hf_layout_processor_of_the_demo_yaml_gives_the_training_pixels(tmp_path, tiny_checkpoint):
    out = tmp_path / "hf"
    assert run_cli("convert", "--model", "llava", "--src-fmt", "cs-2.2", "--tgt-fmt", "hf", "--config", TINY,
                   "--output-dir", out, "--no-progress-bar", tiny_checkpoint) == 0
    text = yaml.safe_load((out / "text_model" / "config.json").read_text())
    assert text["image_aspect_ratio"] == "square"  # no expand_to_square in the demo's transforms: LLaVA must not pad
    image_processor = CLIPImageProcessor.from_pretrained(out / "image_model")
    assert max_difference(image_processor, eval_transforms(TINY)) <= PIXEL_TOL


def test_ignore_transforms_keeps_the_clip_processor_and_says_so(tmp_path, tokenizer_dir, tiny_checkpoint, capsys):
    out = tmp_path / "llava_hf"
    assert run_cli("convert", "--model", "llava", "--src-fmt", "cs-2.2", "--tgt-fmt", "llava-hf", "--config", TINY,
                   "--tokenizer-dir", tokenizer_dir, "--output-dir", out, "--no-progress-bar", "--ignore-transforms",
                   tiny_checkpoint) == 0
    assert "--ignore-transforms" in capsys.readouterr().err
    image_processor = AutoImageProcessor.from_pretrained(out)
    assert image_processor.resample == 3 and list(image_processor.image_mean) == cc.CLIP_MEAN
    assert max_difference(image_processor, eval_transforms(TINY)) > 0.1  # the mismatch the option accepts


def test_ignore_transforms_on_a_cs_target_says_to_drop_it(tmp_path, tiny_checkpoint, capsys):
    assert run_cli("convert", "--model", "llava", "--src-fmt", "cs-2.2", "--tgt-fmt", "cs-2.2", "--output-dir",
                   tmp_path, "--ignore-transforms", tiny_checkpoint) == 1
    assert "drop the option" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The 7B phase-2 yaml (pad in the CLIP mean colour, bicubic shortest-edge resize, center crop, CLIP mean/std)


def test_llava_hf_processor_of_the_7b_yaml_gives_the_training_pixels(tmp_path, tokenizer_dir):
    cfg = cc.parse_cs_config(cc.read_cs_yaml(BIG))
    settings = cc.exported_image_settings(cfg, BIG, None, None, ignore=False)
    tok = cc.llava_tokenizer(tokenizer_dir)
    cc.llava_processor(cfg, tok, cc.CHAT_TEMPLATE, settings).save_pretrained(tmp_path / "processor")
    image_processor = AutoProcessor.from_pretrained(tmp_path / "processor").image_processor
    assert image_processor.do_pad and image_processor.do_center_crop
    assert max_difference(image_processor, eval_transforms(BIG)) <= PIXEL_TOL


def test_hf_layout_processor_of_the_7b_yaml_gives_the_training_pixels(tmp_path):
    assert run_cli("convert-config", "--model", "llava", "--src-fmt", "cs-2.2", "--tgt-fmt", "hf", "--output-dir",
                   tmp_path, BIG) == 0
    text = yaml.safe_load((tmp_path / "text_model" / "config.json").read_text())
    assert text["image_aspect_ratio"] == "pad"
    image_processor = CLIPImageProcessor.from_pretrained(tmp_path / "image_model")
    assert max_difference(image_processor, eval_transforms(BIG), pad_first=True) <= PIXEL_TOL


# ----------------------------------------------------------------------------------------------
# Every shipped params yaml, and transforms the processor can and cannot express


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("params_*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_exports_its_training_pixels(tmp_path, path):
    specs, where = cc.training_transforms(yaml.safe_load(path.read_text()), path.name)
    cc.llava_image_processor(None, cc.image_processor_settings(specs, where)).save_pretrained(tmp_path)
    assert max_difference(AutoImageProcessor.from_pretrained(tmp_path), specs) <= PIXEL_TOL


def test_every_training_transform_has_a_processor_stage():
    assert set(cc.TRANSFORM_STAGES) == set(hd.TRANSFORMS)


@pytest.mark.parametrize("specs", [
    [{"name": "expand_to_square", "background_color": [10, 200, 30]}, {"name": "resize", "size": [40, 40],
                                                                        "interpolation": "lanczos"}],
    [{"name": "resize", "size": 60, "interpolation": "nearest"}, {"name": "center_crop", "size": [48, 40]},
     {"name": "to_tensor"}, {"name": "normalize", "mean": [0.2], "std": 0.3}],
    [{"name": "resize", "size": [33, 47], "interpolation": "box", "max_size": 40}],  # max_size: unused for [h, w]
    [],
], ids=["pad-without-normalize", "crop-inside-resize", "exact-resize-only", "to-tensor-only"])
def test_expressible_transforms_give_the_training_pixels(tmp_path, specs):
    cc.llava_image_processor(None, cc.image_processor_settings(specs, "t")).save_pretrained(tmp_path)
    assert max_difference(AutoImageProcessor.from_pretrained(tmp_path), specs) <= PIXEL_TOL


@pytest.mark.parametrize("specs,message", [
    ([{"name": "resize", "size": 48}, {"name": "expand_to_square"}], r"transforms\[1\] \(expand_to_square\) comes "
                                                                     r"after a resize step"),
    ([{"name": "expand_to_square", "background_color": [0, 0, 0]}, {"name": "resize", "size": [48, 48]},
      {"name": "to_tensor"}, {"name": "normalize", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}],
     r"background_color \[0, 0, 0\], but the image processor pads in .* \[127, 127, 127\]"),
    ([{"name": "resize", "size": 48, "max_size": 64}], "max_size 64 has no image-processor equivalent"),
    ([{"name": "resize", "size": 40}, {"name": "center_crop", "size": 48}], "center_crop 48x48 can be larger"),
    ([{"name": "center_crop", "size": 48}], "no resize before it"),
    ([{"name": "resize", "size": 48}, {"name": "resize", "size": 40}], r"\(resize\) comes after a resize step"),
    ([{"name": "flip"}], "unknown transform 'flip'"),
])
def test_inexpressible_transforms_name_the_transform_and_the_option(specs, message):
    with pytest.raises(cc.ConversionError, match=message) as e:
        cc.image_processor_settings(specs, "params.yaml eval_input.transforms")
    assert "params.yaml eval_input.transforms" in str(e.value)
    if "unknown" not in message:
        assert "--ignore-transforms" in str(e.value)


def test_a_transform_without_a_processor_stage_is_named(monkeypatch):
    monkeypatch.setitem(hd.TRANSFORMS, "random_flip", lambda p=0.5: (lambda img: img))
    with pytest.raises(cc.ConversionError, match=r"transforms\[0\] \(random_flip\) has no image-processor "
                                                 r"equivalent.*--ignore-transforms"):
        cc.image_processor_settings([{"name": "random_flip"}], "transforms")


def test_transforms_that_disagree_with_the_model_image_size_are_an_error(tmp_path):
    params = yaml.safe_load(TINY.read_text())
    params["eval_input"]["transforms"][0]["size"] = [40, 40]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    cfg = cc.parse_cs_config(params["model"])
    with pytest.raises(cc.ConversionError, match=r"eval_input.transforms make 40x40 images but "
                                                 r"model.image_model.image_size is 48"):
        cc.exported_image_settings(cfg, path, None, None, ignore=False)


def test_eval_input_transforms_win_over_train_input():
    params = {"train_input": {"transforms": [{"name": "resize", "size": 1}]},
              "eval_input": {"transforms": [{"name": "resize", "size": 2}]}}
    assert cc.training_transforms(params, "p") == ([{"name": "resize", "size": 2}], "p eval_input.transforms")
    assert cc.training_transforms({"train_input": params["train_input"]}, "p")[1] == "p train_input.transforms"
    assert cc.training_transforms({"model": {}}, "p") == (None, None)
