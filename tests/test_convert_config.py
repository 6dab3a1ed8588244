"""convert_checkpoint.py config mapping (spec 6.5): HF <-> CS `model:` sections, no weights (meta device).

The real-config tests use ../shared/reference_data/hf_configs and skip when it is absent.
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

import convert_checkpoint as cc
import model as M

ROOT = Path(__file__).resolve().parents[1]
REF = Path(__file__).resolve().parents[2] / "shared" / "reference_data" / "hf_configs"
CLIP_DIR, LLAVA_DIR = REF / "openai--clip-vit-large-patch14-336", REF / "liuhaotian--llava-v1.5-7b"
VICUNA_DIR, LLAVA_HF_DIR = REF / "lmsys--vicuna-7b-v1.5", REF / "llava-hf--llava-1.5-7b-hf"
needs_reference = pytest.mark.skipif(not REF.is_dir(), reason="../shared/reference_data/hf_configs not present")


def cerebras_section(phase: int) -> dict:
    path = ROOT / "configs" / f"params_llava_v1p5_pretrain_7b_phase{phase}_MSL2K.yaml"
    return yaml.safe_load(path.read_text())["model"]


def flat(cfg) -> dict:
    """A parsed LlavaModelConfig as {dotted field: value}, so differences are named field by field."""
    out = {}

    def walk(prefix, obj):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(f"{prefix}{f.name}.", value)
            else:
                out[prefix + f.name] = value
    walk("", cfg)
    return out


def differences(section_a: dict, section_b: dict) -> dict:
    a, b = flat(M.parse_model_config(section_a)), flat(M.parse_model_config(section_b))
    return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


# Values no HF config holds, so the converted yaml cannot know them (they are set in the curated configs):
# max_position_embeddings is 4096 in Llama-2/Vicuna configs and the training MSL (2048) in Cerebras' yamls
# (no weight depends on it); image_start_idx depends on the data's prompt template (phase 2: 35); freeze is the
# training phase (tune_mm_mlp_adapter false in a finished LLaVA = phase 2 setting).
EXPECTED_DIFFERENCES = {
    1: {"text_model.max_position_embeddings": (4096, 2048),
        "freeze": (["^image_model"], ["^image_model", "^text_model"])},
    2: {"text_model.max_position_embeddings": (4096, 2048), "image_start_idx": (1, 35)},
}


def read(path: Path) -> dict:
    return json.loads(path.read_text())


@needs_reference
@pytest.mark.parametrize("clip_file", ["vision_config.CLIPVisionModel.json",
                                       "config.resaved_by_transformers_4.33.json"])
@pytest.mark.parametrize("phase", [1, 2])
def test_real_llava_v15_7b_configs_convert_to_the_cerebras_7b_model_section(clip_file, phase):
    section = cc.hf_configs_to_cs(read(CLIP_DIR / clip_file), read(LLAVA_DIR / "config.json"))
    assert differences(section, cerebras_section(phase)) == EXPECTED_DIFFERENCES[phase]
    # Key for key as Cerebras writes the image tower; the text/projector sections differ only in the
    # always-default extras rope_theta / pos_scaling_factor / initializer_range.
    assert section["image_model"] == cerebras_section(phase)["image_model"]
    assert section["projector"] == cerebras_section(phase)["projector"]
    extra = {k: v for k, v in section["text_model"].items() if k not in cerebras_section(phase)["text_model"]}
    assert extra == {"rope_theta": 10000.0, "pos_scaling_factor": 1.0, "initializer_range": 0.02}
    with torch.device("meta"):  # the converted section builds the 7B model (no weights)
        model = M.LlavaModel(section)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(7.06e9, rel=2e-3)


@needs_reference
def test_real_vicuna_config_without_mm_fields_gets_llava_defaults():
    section = cc.hf_configs_to_cs(read(CLIP_DIR / "vision_config.CLIPVisionModel.json"),
                                  read(VICUNA_DIR / "config.json"))
    assert differences(section, cerebras_section(2)) == EXPECTED_DIFFERENCES[2]


@needs_reference
def test_real_llava_hf_config_converts_to_the_cerebras_model_section_with_its_grown_vocab():
    section = cc.llava_hf_config_to_cs(read(LLAVA_HF_DIR / "config.json"))
    expected = dict(EXPECTED_DIFFERENCES[2], **{"text_model.vocab_size": (32064, 32000)})
    assert differences(section, cerebras_section(2)) == expected


@needs_reference
def test_converted_real_config_survives_cs_to_hf_to_cs():
    section = cc.hf_configs_to_cs(read(CLIP_DIR / "vision_config.CLIPVisionModel.json"),
                                  read(LLAVA_DIR / "config.json"))
    cfg = cc.parse_cs_config(section)
    text = cc.cs_to_hf_text_config(cfg, "/x/image_model")
    again = cc.hf_configs_to_cs(cc.cs_to_hf_clip_config(cfg), text)
    assert again == section
    original = read(LLAVA_DIR / "config.json")
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "rms_norm_eps",
                "vocab_size", "max_position_embeddings", "mm_hidden_size", "mm_projector_type",
                "mm_vision_select_layer", "mm_vision_select_feature", "tune_mm_mlp_adapter", "image_aspect_ratio",
                "mm_use_im_start_end", "mm_use_im_patch_token", "tie_word_embeddings", "model_type"):
        assert text[key] == original[key], key
    assert text["mm_vision_tower"] == "/x/image_model"


def test_hf_default_tables_match_transformers():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    clip, llama = CLIPVisionConfig().to_dict(), LlamaConfig().to_dict()
    assert {k: clip[k] for k in cc.HF_CLIP_DEFAULTS} == cc.HF_CLIP_DEFAULTS
    llama_defaults = dict(cc.HF_LLAMA_DEFAULTS, num_key_value_heads=32)  # LlamaConfig resolves None to heads
    assert {k: llama[k] for k in llama_defaults} == llama_defaults
    llava = LlavaConfig().to_dict()
    assert {k: llava[k] for k in cc.LLAVA_HF_DEFAULTS} == cc.LLAVA_HF_DEFAULTS
    assert {k: llava["vision_config"][k] for k in cc.LLAVA_HF_VISION_DEFAULTS} == cc.LLAVA_HF_VISION_DEFAULTS


TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
             "image_size": 28, "patch_size": 7}
TINY_LLAVA = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0},
              "tie_word_embeddings": True, "mm_hidden_size": 32, "mm_projector_type": "mlp3x_gelu",
              "mm_vision_select_layer": 2, "mm_vision_select_feature": "cls_patch", "tune_mm_mlp_adapter": True}


def test_gqa_rope_tie_and_projector_depth_map_both_ways():
    section = cc.hf_configs_to_cs(TINY_CLIP, TINY_LLAVA)
    tm = section["text_model"]
    assert tm["attention_module"] == "multiquery_attention" and tm["extra_attention_params"] == {"num_kv_groups": 2}
    assert (tm["rope_theta"], tm["pos_scaling_factor"], tm["share_embedding_weights"]) == (500000.0, 2.0, True)
    assert section["projector"]["image_model"]["layers_units"] == [64, 64, 64]
    assert section["projector"]["image_model"]["layers_activation"] == ["gelu", "gelu", None]
    assert section["image_feature_select_layer_idx"] == 1  # hidden_states[2] = output of layer index 1
    assert section["image_feature_select_mode"] == "cls_patch"
    assert section["freeze"] == ["^image_model", "^text_model"]
    cfg = cc.parse_cs_config(section)
    assert M.num_kv_heads(cfg.text_model) == 2
    text = cc.cs_to_hf_text_config(cfg, "img")
    assert {k: text[k] for k in TINY_LLAVA} == TINY_LLAVA
    assert cc.hf_configs_to_cs(cc.cs_to_hf_clip_config(cfg), text) == section


def test_llava_hf_config_round_trips():
    cfg = cc.parse_cs_config(cc.hf_configs_to_cs(TINY_CLIP, dict(TINY_LLAVA, mm_projector_type="mlp2x_gelu",
                                                                      mm_vision_select_feature="patch")))
    hf = cc.cs_to_llava_hf_config(cfg, image_token_index=127, pad_token_id=126)
    assert (hf["vision_feature_layer"], hf["vision_feature_select_strategy"]) == (2, "default")
    assert hf["image_seq_length"] == 16
    assert hf["text_config"]["num_key_value_heads"] == 2 and hf["image_token_index"] == 127
    from transformers import LlavaConfig

    LlavaConfig(**hf)  # transformers accepts it
    back = cc.parse_cs_config(cc.llava_hf_config_to_cs(hf))
    assert flat(back) == dict(flat(cfg), freeze=["^image_model"])  # freeze is not part of a llava-hf config


@pytest.mark.parametrize("change,message", [
    ({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
    ({"mm_projector_type": "linear"}, "mlp<N>x_gelu"),
    ({"mm_hidden_size": 48}, "mm_hidden_size 48"),
    ({"mm_vision_select_layer": 0}, "embeddings"),
    ({"hidden_act": "gelu"}, "silu"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "linear"),
])
def test_unsupported_llava_config_values_fail_with_the_field_name(change, message):
    with pytest.raises(cc.ConversionError, match=message):
        cc.hf_configs_to_cs(TINY_CLIP, dict(TINY_LLAVA, **change))


def test_cs_values_hf_cannot_express_fail_with_the_field_name():
    section = cc.hf_configs_to_cs(TINY_CLIP, TINY_LLAVA)
    bad = dict(section, image_feature_select_layer_idx=None)
    with pytest.raises(cc.ConversionError, match="image_feature_select_layer_idx"):
        cc.cs_to_hf_text_config(cc.parse_cs_config(bad), "img")
    bad = dict(section, text_model=dict(section["text_model"], rotary_dim=8))
    with pytest.raises(cc.ConversionError, match="rotary_dim"):
        cc.cs_to_hf_text_config(cc.parse_cs_config(bad), "img")
    with pytest.raises(cc.ConversionError, match="2-layer projector"):  # mlp3x has no llava-hf form
        cc.cs_to_llava_hf_config(cc.parse_cs_config(section), 1, 2)


def test_convert_config_cli_writes_a_yaml_model_py_accepts(tmp_path):
    src = tmp_path / "hf"
    for sub, cfg in (("image_model", TINY_CLIP), ("text_model", TINY_LLAVA)):
        (src / sub).mkdir(parents=True)
        (src / sub / "config.json").write_text(json.dumps(cfg))
    assert cc.main(["convert-config", "--model", "llava", "--src-fmt", "hf", "--tgt-fmt", "cs-2.2",
                    "--output-dir", str(tmp_path / "cs"), str(src)]) == 0
    written = yaml.safe_load((tmp_path / "cs" / "config_to_cs-2.2.yaml").read_text())
    assert written["model"] == cc.hf_configs_to_cs(TINY_CLIP, TINY_LLAVA)
    M.parse_model_config(written["model"])
    assert cc.main(["convert-config", "--model", "llava", "--src-fmt", "cs-2.2", "--tgt-fmt", "hf",
                    "--output-dir", str(tmp_path / "back"), str(tmp_path / "cs" / "config_to_cs-2.2.yaml")]) == 0
    back = cc.hf_configs_to_cs(read(tmp_path / "back" / "image_model" / "config.json"),
                               read(tmp_path / "back" / "text_model" / "config.json"))
    assert back == written["model"]
    assert read(tmp_path / "back" / "image_model" / "preprocessor_config.json")["crop_size"] == {"height": 28,
                                                                                                  "width": 28}
