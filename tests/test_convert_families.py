"""convert_checkpoint.py with today's towers and LMs in the hf (LLaVA-repo) layout: image_model/ a CLIPVisionModel
or SiglipVisionModel folder, text_model/ a Llama-3, Mistral, Qwen2 or Qwen3 folder with a projector.

hf -> cs-2.2 gives the logits of the same model written with transformers' modules, and cs-2.2 -> hf gives the
same weights and configs back exactly. Tiny random models, CPU, seconds.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
                          SiglipVisionConfig, SiglipVisionModel)

import convert_checkpoint as cc
from test_convert_checkpoint import (hf_to_cs, our_logits, randomize_, read_hf_folder, run_cli, tiny_projector,
                                     write_shards)

TOL = 1e-4
TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)
LMS = {
    "llama3": (LlamaForCausalLM, LlamaConfig(**TEXT, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}), "llava"),
    "mistral": (MistralForCausalLM, MistralConfig(**TEXT, rope_theta=1e6, sliding_window=64), "llava_mistral"),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**TEXT, rope_theta=1e6), "llava_qwen"),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(**TEXT, head_dim=24, rope_theta=1e6), "llava_qwen3"),
}
TOWERS = {
    "clip": (CLIPVisionModel, CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                               num_attention_heads=4, image_size=28, patch_size=7,
                                               hidden_act="quick_gelu")),
    "siglip": (SiglipVisionModel, SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                     num_attention_heads=4, image_size=28, patch_size=7,
                                                     vision_use_head=False)),
}


def make_folder(root, tower: str, lm: str):
    vision_cls, vision_config = TOWERS[tower]
    text_cls, text_config, llava_type = LMS[lm]
    torch.manual_seed(0)
    vision = randomize_(vision_cls(vision_config).eval())
    text = randomize_(text_cls(text_config).eval())
    projector = tiny_projector()
    vision.save_pretrained(root / "image_model")
    write_shards(root / "text_model", {**text.state_dict(), **projector}, 2)
    llava_fields = dict(model_type=llava_type, mm_hidden_size=32, mm_projector_type="mlp2x_gelu",
                        mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_use_im_start_end=False,
                        mm_use_im_patch_token=False, tune_mm_mlp_adapter=False, mm_vision_tower="unused")
    config = dict(text.config.to_dict(), **llava_fields)
    (root / "text_model" / "config.json").write_text(json.dumps(config))
    return vision, text, projector


def reference_logits(vision, text, projector, pixels, ids, start, has_cls):
    """LLaVA's forward with transformers' modules: hidden_states[-2] (without CLS when there is one) ->
    mlp2x_gelu -> written over the placeholder embeddings -> the LM."""
    feats = vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    feats = feats[:, 1:] if has_cls else feats
    p = projector
    feats = F.linear(F.gelu(F.linear(feats, p["model.mm_projector.0.weight"], p["model.mm_projector.0.bias"])),
                     p["model.mm_projector.2.weight"], p["model.mm_projector.2.bias"])
    embeds = text.get_input_embeddings()(ids.long()).clone()
    embeds[:, start:start + feats.shape[1]] = feats
    return text(inputs_embeds=embeds).logits


@pytest.mark.parametrize("tower,lm", [("siglip", "qwen2"), ("clip", "llama3"), ("siglip", "qwen3"),
                                      ("clip", "mistral")])
def test_hf_folder_to_cs_and_back_exactly(tmp_path, tower, lm):
    vision, text, projector = make_folder(tmp_path / "hf", tower, lm)
    ckpt, section = hf_to_cs(tmp_path / "hf", tmp_path / "cs")
    assert section["image_model"]["prepend_cls_token"] is (tower == "clip")
    pixels = torch.randn(2, 3, 28, 28)
    ids = torch.randint(1, 127, (2, 40), dtype=torch.int32)
    with torch.no_grad():
        theirs = reference_logits(vision, text, projector, pixels, ids, section["image_start_idx"], tower == "clip")
    assert (our_logits(section, ckpt["model"], pixels, ids) - theirs).abs().max() <= TOL

    out = tmp_path / "back"
    assert run_cli("convert", "--model", "llava", "--src-fmt", "cs-2.2", "--tgt-fmt", "hf", "--config",
                   tmp_path / "cs" / "config_to_cs-2.2.yaml", "--output-dir", out, "--no-progress-bar",
                   tmp_path / "cs" / "pytorch_model_to_cs-2.2.mdl") == 0
    image, back_text = read_hf_folder(out / "image_model"), read_hf_folder(out / "text_model")
    expected_text = {**text.state_dict(), **projector}
    assert image.keys() == vision.state_dict().keys() and back_text.keys() == expected_text.keys()
    assert all(torch.equal(image[k], v) for k, v in vision.state_dict().items())
    assert all(torch.equal(back_text[k], v) for k, v in expected_text.items())
    image_config = json.loads((out / "image_model" / "config.json").read_text())
    text_config = json.loads((out / "text_model" / "config.json").read_text())
    assert text_config["model_type"] == LMS[lm][2]
    assert cc.hf_configs_to_cs(image_config, text_config) == section
    # the written configs build the same transformers models again
    vision_cls, _ = TOWERS[tower]
    text_cls, _, _ = LMS[lm]
    rebuilt = vision_cls(type(TOWERS[tower][1]).from_dict(image_config))
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in vision.parameters())
    lm_config = dict(text_config, model_type=cc.HF_TEXT_CLASSES[cc.TEXT_FAMILIES[LMS[lm][2]]][1])
    rebuilt_text = text_cls(type(LMS[lm][1]).from_dict(lm_config))
    rebuilt_text.load_state_dict(text.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt_text(ids.long()).logits, text(ids.long()).logits)
