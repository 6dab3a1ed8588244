"""Numerical parity with transformers' CLIP, Llama and LLaVA (tiny random configs, fp32, max abs diff <= 1e-4).

Weights go through the HF -> CS key mapping of convert_checkpoint.py, so these tests prove the model and the
mapping (position-row rotation, q/k row interleave for rotary) together.
"""

import pytest
import torch
from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                          LlavaForConditionalGeneration)

import convert_checkpoint as cc
import model as M
import modeling_llava as ml

TOL = 1e-4
VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
           patch_size=7, hidden_act="quick_gelu", layer_norm_eps=1e-5)
LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)


def model_section(num_kv_heads=4, select_layer=-2, image_start_idx=3):
    text = dict(vocab_size=LLAMA["vocab_size"], hidden_size=64, num_hidden_layers=2, num_heads=4, filter_size=96,
                max_position_embeddings=128)
    if num_kv_heads != 4:
        text.update(attention_module="multiquery_attention", extra_attention_params={"num_kv_groups": num_kv_heads})
    return {
        "image_model": dict(hidden_size=32, num_hidden_layers=3, num_heads=4, filter_size=64, image_size=[28, 28],
                            patch_size=[7, 7]),
        "text_model": text,
        "projector": {"image_model": dict(input_unit=32, layers_units=[64, 64], layers_activation=["gelu", None])},
        "image_feature_select_layer_idx": select_layer,
        "image_start_idx": image_start_idx,
    }


def randomize_(module):
    """Non-trivial norms and biases, so a mapping mistake on them cannot hide behind ones/zeros."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or "layernorm" in name or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_vit_matches_clip_vision_model_at_every_layer():
    torch.manual_seed(0)
    hf = CLIPVisionModel(CLIPVisionConfig(**VIT)).eval()
    randomize_(hf)
    vit = ml.ViTModel(hidden_size=32, num_hidden_layers=3, num_heads=4, filter_size=64, image_size=(28, 28),
                      patch_size=(7, 7)).eval()
    cs = cc.hf_clip_to_cs(hf.state_dict())
    vit.load_state_dict({k.removeprefix("image_model."): v for k, v in cs.items()})
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        out = hf(pixel_values=pixels, output_hidden_states=True)
        for layer in range(3):
            diff = (vit.extract_features(pixels, layer) - out.hidden_states[layer + 1]).abs().max()
            assert diff <= TOL, (layer, diff)
        final = hf.vision_model.post_layernorm(out.last_hidden_state)
        assert (vit.extract_features(pixels, None) - final).abs().max() <= TOL


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_text_model_matches_llama_for_causal_lm(num_kv_heads):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**LLAMA, num_key_value_heads=num_kv_heads)).eval()
    randomize_(hf)
    llava = M.LlavaModel(model_section(num_kv_heads)).eval()
    cs = cc.hf_llama_to_cs(hf.state_dict(), num_heads=4, num_kv_heads=num_kv_heads)
    text_state = {k.removeprefix("text_model."): v for k, v in cs.items() if k.startswith("text_model.")}
    llava.model.text_model.load_state_dict(text_state)
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 40))
    with torch.no_grad():
        ours = llava.model.text_model(ids)
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max() <= TOL


# HF vision_feature_layer k counts hidden_states, whose entry 0 is the embedding output: k > 0 is our k - 1.
@pytest.mark.parametrize("hf_layer,select_layer", [(-2, -2), (-1, -1), (2, 1)])
def test_full_model_matches_llava_for_conditional_generation(hf_layer, select_layer):
    torch.manual_seed(0)
    image_token = LLAMA["vocab_size"] - 1
    config = LlavaConfig(vision_config=CLIPVisionConfig(**VIT), text_config=LlamaConfig(**LLAMA),
                         image_token_index=image_token, vision_feature_layer=hf_layer,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu", image_seq_length=16)
    hf = LlavaForConditionalGeneration(config).eval()
    randomize_(hf)
    ours = M.LlavaModel(model_section(select_layer=select_layer)).eval()
    ours.model.load_state_dict(cc.llava_hf_to_cs(hf.state_dict(), num_heads=4))

    num_patches, start, seq = 16, 3, 40
    ids = torch.randint(1, image_token, (2, seq), dtype=torch.int32)
    hf_ids = ids.clone().long()
    hf_ids[:, start:start + num_patches] = image_token
    pixels = torch.randn(2, 3, 28, 28)
    batch = {"image_data": pixels, "text_input_ids": ids, "key_padding_mask": torch.zeros_like(ids)}
    with torch.no_grad():
        theirs = hf(input_ids=hf_ids, pixel_values=pixels).logits
        mine = ours.logits(batch)
    assert (mine - theirs).abs().max() <= TOL
