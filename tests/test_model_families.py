"""Today's language models as configurations of the text model: Llama-3.x, Mistral, Qwen2/2.5, Qwen3.

Numerical parity with transformers' own models (tiny random configs, fp32, max abs diff <= 1e-4), the weights
going through convert_checkpoint.py's HF -> CS mapping; parameter counts of the real configs on the meta device
against transformers' models built from the same configs.
"""

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

import convert_checkpoint as cc
import model as M
from test_parity import randomize_

TOL = 1e-4
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)


def text_section(**extra) -> dict:
    """Our text_model section for TINY (grouped-query: 4 heads, 2 kv heads)."""
    return dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_heads=4, filter_size=96,
                max_position_embeddings=128, attention_module="multiquery_attention",
                extra_attention_params={"num_kv_groups": 2}, **extra)


def our_text_model(text: dict):
    section = {"image_model": dict(hidden_size=32, num_hidden_layers=2, num_heads=4, filter_size=64,
                                   image_size=[28, 28], patch_size=[7, 7]),
               "text_model": text,
               "projector": {"image_model": dict(input_unit=32, layers_units=[64, text["hidden_size"]],
                                                 layers_activation=["gelu", None])}}
    return M.LlavaModel(section).model.text_model.eval()


FAMILIES = {
    "llama3": (LlamaForCausalLM, LlamaConfig(**TINY, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
        text_section(rope_theta=500000.0, pos_scaling_type="llama3", pos_scaling_factor=4.0,
                     pos_scaling_extra_args={"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 16})),
    "mistral": (MistralForCausalLM, MistralConfig(**TINY, rope_theta=1e6, sliding_window=None),
                text_section(rope_theta=1e6)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**TINY, rope_theta=1e6, tie_word_embeddings=False),
              text_section(rope_theta=1e6, use_projection_bias_in_attention=True)),
    "qwen2_tied": (Qwen2ForCausalLM, Qwen2Config(**TINY, rope_theta=1e6, tie_word_embeddings=True),
                   text_section(rope_theta=1e6, use_projection_bias_in_attention=True,
                                share_embedding_weights=True)),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(**TINY, head_dim=24, rope_theta=1e6, tie_word_embeddings=False),
              text_section(rope_theta=1e6, attention_inner_dim=96, attention_qk_norm_layer="rmsnorm",
                           attention_qk_norm_eps=1e-5)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_text_model_matches_transformers(family):
    hf_cls, config, text = FAMILIES[family]
    torch.manual_seed(0)
    hf = hf_cls(config).eval()
    randomize_(hf)
    ours = our_text_model(text)
    cs = cc.hf_llama_to_cs(hf.state_dict(), num_heads=4, num_kv_heads=2)
    ours.load_state_dict({k.removeprefix("text_model."): v for k, v in cs.items() if k.startswith("text_model.")})
    ids = torch.randint(0, 128, (2, 48))  # longer than llama3's original_max_position_embeddings (16)
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= TOL
    back = cc.cs_llama_to_hf(cs, num_heads=4, num_kv_heads=2)  # and the mapping round-trips exactly
    expected = {k: v for k, v in hf.state_dict().items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    assert {k for k in back if k in expected} == set(expected)
    assert all(torch.equal(back[k], expected[k]) for k in expected)


# Real configs (their published config.json values); parameters counted on the meta device.
REAL = {
    "Llama-3.1-8B": (LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                                 rope_theta=500000.0, tie_word_embeddings=False, rope_scaling={
                                     "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
                     LlamaForCausalLM,
                     dict(vocab_size=128256, hidden_size=4096, filter_size=14336, num_hidden_layers=32, num_heads=32,
                          attention_module="multiquery_attention", extra_attention_params={"num_kv_groups": 8},
                          max_position_embeddings=131072, rope_theta=500000.0, pos_scaling_type="llama3",
                          pos_scaling_factor=8.0, pos_scaling_extra_args={
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192})),
    "Qwen2.5-7B": (Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                               num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                               rope_theta=1e6, tie_word_embeddings=False),
                   Qwen2ForCausalLM,
                   dict(vocab_size=152064, hidden_size=3584, filter_size=18944, num_hidden_layers=28, num_heads=28,
                        attention_module="multiquery_attention", extra_attention_params={"num_kv_groups": 4},
                        max_position_embeddings=32768, rope_theta=1e6, use_projection_bias_in_attention=True)),
    "Mistral-7B-v0.3": (MistralConfig(vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                      max_position_embeddings=32768, rope_theta=1e6, sliding_window=None),
                        MistralForCausalLM,
                        dict(vocab_size=32768, hidden_size=4096, filter_size=14336, num_hidden_layers=32, num_heads=32,
                             attention_module="multiquery_attention", extra_attention_params={"num_kv_groups": 8},
                             max_position_embeddings=32768, rope_theta=1e6)),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_parameter_counts_equal_transformers_for_the_real_configs(name):
    config, hf_cls, text = REAL[name]
    with torch.device("meta"):
        hf = hf_cls(config)
        ours = our_text_model(text)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("bad,message", [
    (dict(pos_scaling_type="yarn"), r"pos_scaling_type: 'yarn' is not implemented"),
    (dict(pos_scaling_type="llama3", pos_scaling_extra_args={"low_freq_factor": 1.0}), r"needs exactly"),
    (dict(pos_scaling_extra_args={"low_freq_factor": 1.0}), r"only read with pos_scaling_type: llama3"),
    (dict(attention_qk_norm_layer="layernorm"), r"attention_qk_norm_layer: 'layernorm'"),
    (dict(attention_inner_dim=90), r"attention_inner_dim 90 must be num_heads"),
    (dict(attention_sliding_window_length=0), r"attention_sliding_window_length: 0"),
])
def test_family_options_with_bad_values_say_what_to_change(bad, message):
    with pytest.raises(M.ConfigError, match=message):
        our_text_model(text_section(**bad))


def test_a_sliding_window_shorter_than_the_data_is_refused():
    from types import SimpleNamespace

    import run

    cfg = M.parse_model_config({"text_model": text_section(attention_sliding_window_length=32), **{
        k: v for k, v in {"image_model": dict(hidden_size=32, num_hidden_layers=2, num_heads=4, filter_size=64,
                                              image_size=[28, 28], patch_size=[7, 7]),
                          "projector": {"image_model": dict(input_unit=32, layers_units=[64, 64],
                                                            layers_activation=["gelu", None])}}.items()}})
    long = SimpleNamespace(data_params=None, max_sequence_length=64)
    with pytest.raises(SystemExit, match=r"attention_sliding_window_length 32 is shorter than the sequence length 64"):
        run.check_data_against_model(long, cfg, "data/h5")
    run.check_data_against_model(SimpleNamespace(data_params=None, max_sequence_length=32), cfg, "data/h5")


# ----------------------------------------------------------------------------------------------
# SigLIP vision towers, and whole LLaVA models with the new towers and LMs

from transformers import (CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,  # noqa: E402
                          SiglipVisionConfig, SiglipVisionModel)

import modeling_llava as ml  # noqa: E402

SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
              patch_size=7, layer_norm_eps=1e-6, vision_use_head=False)
SIGLIP_OURS = dict(hidden_size=32, num_hidden_layers=3, num_heads=4, filter_size=64, image_size=[28, 28],
                   patch_size=[7, 7], prepend_cls_token=False, use_embed_proj_bias=True,
                   use_post_embed_layer_norm=False, nonlinearity="gelu_pytorch_tanh", layer_norm_epsilon=1e-6)


def test_vit_matches_siglip_vision_model_at_every_layer():
    torch.manual_seed(0)
    hf = SiglipVisionModel(SiglipVisionConfig(**SIGLIP)).eval()
    randomize_(hf)
    vit = ml.ViTModel(**{**SIGLIP_OURS, "image_size": (28, 28), "patch_size": (7, 7)}).eval()
    cs = cc.hf_siglip_to_cs(hf.state_dict())
    vit.load_state_dict({k.removeprefix("image_model."): v for k, v in cs.items()})
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        out = hf(pixel_values=pixels, output_hidden_states=True)
        for layer in range(3):
            assert (vit.extract_features(pixels, layer) - out.hidden_states[layer + 1]).abs().max() <= TOL, layer
        assert (vit.extract_features(pixels, None) - out.last_hidden_state).abs().max() <= TOL
    assert vit.num_patches == 16 and not vit.has_cls
    back = cc.cs_siglip_to_hf(cs)
    assert back.keys() == hf.state_dict().keys() and all(torch.equal(back[k], v) for k, v in hf.state_dict().items())


def test_siglip_so400m_parameter_count_equals_transformers():
    config = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                num_attention_heads=16, image_size=384, patch_size=14, vision_use_head=False)
    with torch.device("meta"):
        hf = SiglipVisionModel(config)
        ours = ml.ViTModel(hidden_size=1152, num_hidden_layers=27, num_heads=16, filter_size=4304,
                           image_size=(384, 384), patch_size=(14, 14), prepend_cls_token=False,
                           use_embed_proj_bias=True, use_post_embed_layer_norm=False,
                           nonlinearity="gelu_pytorch_tanh")
    assert ours.num_patches == 729  # 384 / 14 = 27 per side
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())


def llava_pair(vision: str, text_family: str):
    """(transformers LlavaForConditionalGeneration, our LlavaModel) with the same random weights."""
    _, text_config, text = FAMILIES[text_family]
    image_token = 127
    if vision == "siglip":
        vision_config, image = SiglipVisionConfig(**SIGLIP), dict(SIGLIP_OURS)
        strategy, hf_layer, our_layer = "full", -1, -1
    else:
        vision_config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, image_size=28, patch_size=7, hidden_act="quick_gelu")
        image = dict(hidden_size=32, num_hidden_layers=3, num_heads=4, filter_size=64, image_size=[28, 28],
                     patch_size=[7, 7])
        strategy, hf_layer, our_layer = "default", -2, -2
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=image_token,
                         vision_feature_layer=hf_layer, vision_feature_select_strategy=strategy,
                         projector_hidden_act="gelu", image_seq_length=16)
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(config).eval()
    randomize_(hf)
    section = {"image_model": image, "text_model": text, "image_feature_select_layer_idx": our_layer,
               "image_start_idx": 3,
               "projector": {"image_model": dict(input_unit=32, layers_units=[64, 64],
                                                 layers_activation=["gelu", None])}}
    ours = M.LlavaModel(section).eval()
    ours.model.load_state_dict(cc.llava_hf_to_cs(hf.state_dict(), num_heads=4, num_kv_heads=2, vision=vision))
    return hf, ours, image_token


@pytest.mark.parametrize("vision,text_family", [("siglip", "qwen2"), ("clip", "llama3"), ("siglip", "qwen3")])
def test_full_model_matches_llava_for_conditional_generation(vision, text_family):
    hf, ours, image_token = llava_pair(vision, text_family)
    start, seq = 3, 40
    ids = torch.randint(1, image_token, (2, seq), dtype=torch.int32)
    hf_ids = ids.clone().long()
    hf_ids[:, start:start + 16] = image_token
    pixels = torch.randn(2, 3, 28, 28)
    batch = {"image_data": pixels, "text_input_ids": ids, "key_padding_mask": torch.zeros_like(ids)}
    with torch.no_grad():
        assert (ours.logits(batch) - hf(input_ids=hf_ids, pixel_values=pixels).logits).abs().max() <= TOL
