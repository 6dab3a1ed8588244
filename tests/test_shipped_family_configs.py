"""The shipped Llama-3.1-8B + CLIP-L/336 and Qwen2.5-7B + SigLIP-so400m/384 configs (phase 1 and 2).

Each params yaml is read as run.py reads it and built on the meta device: its parameter count is that of
transformers' own vision tower and causal LM built from the published configs, plus the projector, and it converts
back to those configs. Freezing, image tokens against the preprocessing yamls, image transforms, and image_start_idx
against what the preprocessing writes (with the real tokenizers in ../shared/reference_data when present). Seconds.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel)

import convert_checkpoint as cc
import create_hdf5_dataset as hd
import model as M
import run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TOKENIZERS = Path(__file__).resolve().parents[2] / "shared" / "reference_data" / "tokenizer"
LLAMA3_TOKENIZER, QWEN_TOKENIZER = TOKENIZERS / "llama3_1_hf", TOKENIZERS / "qwen3_hf"  # Qwen2.5 = Qwen3's BPE
needs_tokenizers = pytest.mark.skipif(not (LLAMA3_TOKENIZER.is_dir() and QWEN_TOKENIZER.is_dir()),
                                      reason="../shared/reference_data/tokenizer not present")

# Published config.json values (openai/clip-vit-large-patch14-336, google/siglip-so400m-patch14-384,
# meta-llama/Llama-3.1-8B-Instruct, Qwen/Qwen2.5-7B-Instruct).
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
SIGLIP_SO400M_384 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                         image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
LLAMA_3_1_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                    max_position_embeddings=131072, tie_word_embeddings=False)
QWEN2_5_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  rope_scaling=None, max_position_embeddings=32768, tie_word_embeddings=False)

# name -> (vision tower class, its config, its parameters our ViT leaves out, causal LM class, its config,
#          preprocessing yaml stem)
FAMILIES = {
    "llama3_1_8b_clip336": (CLIPVisionModel, CLIPVisionConfig(**CLIP_L_336), (), LlamaForCausalLM,
                            LlamaConfig(**LLAMA_3_1_8B), "llava_llama3"),
    # SigLIP's attention-pooling head ("head.*") is not part of our ViT: LLaVA reads the patch features.
    "qwen2_5_7b_siglip384": (SiglipVisionModel, SiglipVisionConfig(**SIGLIP_SO400M_384), ("vision_model.head.",),
                             Qwen2ForCausalLM, Qwen2Config(**QWEN2_5_7B), "llava_qwen2_5"),
}
CASES = [(family, phase) for family in FAMILIES for phase in (1, 2)]
IMAGE_TOKENS = {"llama3_1_8b_clip336": 576, "qwen2_5_7b_siglip384": 729}  # (336/14)^2, (384/14)^2

# image_start_idx per (family, phase): phase 1 = the BOS tokens the tokenizer adds; phase 2 = the tokens of the
# chat template's text before the first user turn's content (no system message in the record).
IMAGE_START = {("llama3_1_8b_clip336", 1): 1, ("qwen2_5_7b_siglip384", 1): 0,
               ("llama3_1_8b_clip336", 2): 30, ("qwen2_5_7b_siglip384", 2): 24}
# That text, as the published templates write it. Meta's Llama-3.1-8B-Instruct template writes a system header
# with its knowledge-cutoff line and a date (create_hdf5_dataset.TEMPLATE_VARIABLES pins it) even without a system
# message; Qwen2.5-Instruct's writes its default system prompt when there is none.
TEMPLATE_HEAD = {
    "llama3_1_8b_clip336": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                            "December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
                            "<|start_header_id|>user<|end_header_id|>\n\n"),
    "qwen2_5_7b_siglip384": ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                             "assistant.<|im_end|>\n<|im_start|>user\n"),
}
# Our own minimal renderings of those two templates' layout (strings only, no tools), to run the preprocessing's
# own layout code on the reference tokenizers, whose shipped templates differ (see test_..._places_the_image_...).
FAMILY_TEMPLATES = {
    "llama3_1_8b_clip336": (
        "{{- bos_token -}}"
        "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\nToday Date: '"
        " + (date_string if date_string is defined else '26 Jul 2024') + '\\n\\n<|eot_id|>' -}}"
        "{%- for m in messages -%}"
        "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' -}}"
        "{%- endfor -%}"),
    "qwen2_5_7b_siglip384": (
        "{%- if messages[0]['role'] != 'system' -%}"
        "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' -}}"
        "{%- endif -%}"
        "{%- for m in messages -%}"
        "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
        "{%- endfor -%}"),
}
# bos_token_id / pad_token_id of train_input and eval_input (informational; what the preprocessing writes).
TOKEN_IDS = {"llama3_1_8b_clip336": (128000, 128009), "qwen2_5_7b_siglip384": (None, 151643)}


def params_path(family: str, phase: int) -> Path:
    return CONFIGS / f"params_llava_{family}_phase{phase}.yaml"


def read_params(family: str, phase: int) -> tuple:
    """(raw params, parsed sections) exactly as run.py main() reads a --params yaml."""
    params = run.load_params(str(params_path(family, phase)), [])
    return params, run.parse_sections(params)


def preproc_config(family: str, phase: int, tokenizer=None):
    stem = FAMILIES[family][5]
    mode = "LlavaPhaseOne" if phase == 1 else "LlavaPhaseTwo"
    overrides = {"huggingface_tokenizer": str(tokenizer)} if tokenizer else None
    return hd.load_config(CONFIGS / f"{stem}_phase_{phase}_preproc.yaml", mode, overrides)


def numel(module, skip=()) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if not name.startswith(tuple(skip)))


@pytest.mark.parametrize("family,phase", CASES)
def test_parameter_count_equals_transformers_tower_plus_lm_plus_projector(family, phase):
    vision_cls, vision_config, dropped, lm_cls, lm_config, _ = FAMILIES[family]
    _, sections = read_params(family, phase)
    with torch.device("meta"):
        llava = M.LlavaModel(sections["model"])
        tower, lm = vision_cls(vision_config), lm_cls(lm_config)
    d_in, d_out = vision_config.hidden_size, lm_config.hidden_size
    projector = d_in * d_out + d_out + d_out * d_out + d_out
    assert numel(llava.model.image_model) == numel(tower, dropped)
    assert numel(llava.model.text_model) == numel(lm)
    assert numel(llava.model.projector_image_model) == projector
    assert llava.parameter_counts()["total"] == numel(tower, dropped) + numel(lm) + projector


@pytest.mark.parametrize("family,phase", CASES)
def test_model_section_converts_to_the_published_hf_configs(family, phase):
    vision_cls, _, _, _, lm_config, _ = FAMILIES[family]
    cfg = read_params(family, phase)[1]["model"]
    vision = cc.cs_to_hf_vision_config(cfg)
    published = CLIP_L_336 if family.endswith("clip336") else SIGLIP_SO400M_384
    assert {k: vision[k] for k in published} == published
    assert vision["architectures"] == [vision_cls.__name__]
    text = cc.cs_to_hf_llama_config(cfg)
    published = LLAMA_3_1_8B if family.startswith("llama") else QWEN2_5_7B
    assert {k: text[k] for k in published} == published
    assert text["model_type"] == lm_config.model_type  # qwen2: q/k/v biases without an output bias


@pytest.mark.parametrize("family,phase", CASES)
def test_freeze_trains_only_the_projector_in_phase_1_and_projector_plus_lm_in_phase_2(family, phase):
    _, sections = read_params(family, phase)
    with torch.device("meta"):
        llava = M.LlavaModel(sections["model"])
    trainable = {name.split(".")[0] for name, p in llava.model.named_parameters() if p.requires_grad}
    frozen = {name.split(".")[0] for name, p in llava.model.named_parameters() if not p.requires_grad}
    if phase == 1:
        assert trainable == {"projector_image_model"} and frozen == {"image_model", "text_model"}
    else:
        assert trainable == {"projector_image_model", "text_model"} and frozen == {"image_model"}


@pytest.mark.parametrize("family", FAMILIES)
def test_phase_1_and_2_differ_only_in_freeze_and_image_start_idx(family):
    (p1, _), (p2, _) = read_params(family, 1), read_params(family, 2)
    m1, m2 = dict(p1["model"]), dict(p2["model"])
    for key in ("freeze", "image_start_idx"):
        m1.pop(key), m2.pop(key)
    assert m1 == m2
    assert p1["optimizer"]["optimizer_type"] == p2["optimizer"]["optimizer_type"] == "AdamW"


@pytest.mark.parametrize("family,phase", CASES)
def test_image_tokens_match_the_preprocessing_num_patches(family, phase):
    _, sections = read_params(family, phase)
    with torch.device("meta"):
        llava = M.LlavaModel(sections["model"])
    assert llava.model.num_image_tokens == run.image_tokens_of(sections["model"]) == IMAGE_TOKENS[family]
    pre = preproc_config(family, phase)
    assert pre.dataset.num_patches == IMAGE_TOKENS[family]
    assert pre.processing.max_seq_length == 2048
    if phase == 2:
        assert pre.dataset.system_prompt_style == "chat_template"
        assert pre.dataset.prompt_prefix is None and pre.dataset.completion_prefix is None


@pytest.mark.parametrize("family,phase", CASES)
def test_image_transforms_give_the_towers_input_size(family, phase):
    _, sections = read_params(family, phase)
    size = tuple(sections["model"].image_model.image_size)
    for name in ("train_input", "eval_input"):
        cfg = sections[name]
        assert tuple(cfg.image_data_size) == (3, *size)
        image = Image.fromarray(np.full((300, 500, 3), 255, dtype=np.uint8))  # wide: padded to a square
        x = hd.build_transforms(cfg.transforms)(image)
        assert x.shape == (3, *size)
        if family.endswith("siglip384"):  # grey padding 127 normalised by mean 0.5, std 0.5; white image -> 1.0
            assert x[:, 0, 0] == pytest.approx([127 / 255 * 2 - 1] * 3, abs=1e-6)
            assert x[:, size[0] // 2, size[1] // 2] == pytest.approx([1.0] * 3, abs=1e-6)


@pytest.mark.parametrize("family,phase", CASES)
def test_yaml_image_start_idx_and_token_ids(family, phase):
    params, sections = read_params(family, phase)
    assert sections["model"].image_start_idx == IMAGE_START[family, phase]
    for name in ("train_input", "eval_input"):
        assert (params[name]["bos_token_id"], params[name]["pad_token_id"]) == TOKEN_IDS[family]


@needs_tokenizers
@pytest.mark.parametrize("family", FAMILIES)
def test_phase_1_image_start_idx_is_what_the_preprocessing_writes(family):
    folder = LLAMA3_TOKENIZER if family.startswith("llama") else QWEN_TOKENIZER
    cfg = preproc_config(family, 1, folder)
    tok = hd.load_tokenizer(folder)
    layout = hd.TokenLayout(tok, cfg, 1)
    assert layout.image_start_idx == len(layout.bos) == IMAGE_START[family, 1]
    assert (tok.bos_token_id, layout.pad_id) == TOKEN_IDS[family]


@needs_tokenizers
@pytest.mark.parametrize("family", FAMILIES)
def test_phase_2_image_start_idx_counts_the_template_text_before_the_first_user_turn(family):
    from tokenizers import Tokenizer

    folder = LLAMA3_TOKENIZER if family.startswith("llama") else QWEN_TOKENIZER
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = tokenizer.encode(TEMPLATE_HEAD[family], add_special_tokens=False).ids
    assert len(ids) == IMAGE_START[family, 2]
    assert ids[0] == (128000 if family.startswith("llama") else tokenizer.token_to_id("<|im_start|>"))


@needs_tokenizers
@pytest.mark.parametrize("family", FAMILIES)
def test_phase_2_preprocessing_places_the_image_at_image_start_idx(family):
    """create_hdf5_dataset's own layout code (the one that writes data_params.json image_patch_start_idx), on the
    real vocabularies with each model's template layout. The reference Llama copy ships a template without the
    system header: with it the image starts at 5, the figure the yaml comments name for such a template."""
    folder = LLAMA3_TOKENIZER if family.startswith("llama") else QWEN_TOKENIZER
    cfg = preproc_config(family, 2, folder)
    tok = hd.load_tokenizer(folder)
    shipped = tok.chat_template
    try:
        tok.chat_template = FAMILY_TEMPLATES[family]
        layout = hd.TokenLayout(tok, cfg, 2)
        assert layout.image_start_idx == IMAGE_START[family, 2]
        assert layout.pad_id == TOKEN_IDS[family][1]
        if family.startswith("llama"):
            tok.chat_template = shipped
            assert hd.TokenLayout(tok, cfg, 2).image_start_idx == 5
    finally:
        tok.chat_template = shipped
