"""convert_checkpoint.py weights: key tables, transforms, hf and llava-hf folders <-> cs-2.2, CLI errors.

Tiny random transformers models (CLIPVisionModel / CLIPModel, LlamaForCausalLM + projector,
LlavaForConditionalGeneration) are built in the test; everything runs offline on CPU in seconds.
"""

import json
import pickle
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                          LlamaForCausalLM)

import convert_checkpoint as cc
import model as M

TOL = 1e-4
VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
           patch_size=7, hidden_act="quick_gelu", layer_norm_eps=1e-5)
NUM_PATCHES = 16
LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)
LLAVA_FIELDS = dict(model_type="llava", architectures=["LlavaLlamaForCausalLM"], mm_hidden_size=32,
                    mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                    mm_use_im_start_end=False, mm_use_im_patch_token=False, tune_mm_mlp_adapter=False,
                    mm_vision_tower="openai/clip-vit-large-patch14-336")


def randomize_(module, seed=1):
    """Non-trivial norms and biases, so a mapping mistake on them cannot hide behind ones/zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or "layernorm" in name or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return module


def tiny_clip(seed=0):
    torch.manual_seed(seed)
    return randomize_(CLIPVisionModel(CLIPVisionConfig(**VIT)).eval())


def tiny_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    return randomize_(LlamaForCausalLM(LlamaConfig(**dict(LLAMA, **overrides))).eval())


def tiny_projector(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"model.mm_projector.0.weight": torch.randn(64, 32, generator=g) * 0.1,
            "model.mm_projector.0.bias": torch.randn(64, generator=g) * 0.1,
            "model.mm_projector.2.weight": torch.randn(64, 64, generator=g) * 0.1,
            "model.mm_projector.2.bias": torch.randn(64, generator=g) * 0.1}


def write_shards(folder: Path, state: dict, shards: int, safetensors=False):
    """An HF-style sharded checkpoint written independently of the converter's writer."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    per = -(-len(keys) // shards)
    ext, stem = ("safetensors", "model") if safetensors else ("bin", "pytorch_model")
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: state[k].clone().contiguous() for k in keys[i * per:(i + 1) * per]}
        if safetensors:
            from safetensors.torch import save_file
            save_file(part, str(folder / name))
        else:
            torch.save(part, folder / name)
        weight_map.update({k: name for k in part})
    (folder / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def make_hf_dir(root: Path, clip=None, llama=None, projector=None, text_shards=2, full_clip_model=False,
                text_safetensors=False, dtype=None, **llama_overrides):
    """The LLaVA-repo layout: root/image_model (CLIP) + root/text_model (LLaVA config.json, sharded weights)."""
    clip = clip or tiny_clip()
    llama = llama or tiny_llama(**llama_overrides)
    if full_clip_model:  # a whole CLIPModel: text tower and projections must be dropped
        torch.manual_seed(3)
        full = CLIPModel(CLIPConfig(text_config=CLIPTextConfig(hidden_size=16, intermediate_size=32,
                                                               num_hidden_layers=1, num_attention_heads=2,
                                                               vocab_size=50).to_dict(),
                                    vision_config=CLIPVisionConfig(**VIT).to_dict(), projection_dim=8))
        full.vision_model.load_state_dict(clip.vision_model.state_dict())
        full.save_pretrained(root / "image_model")
    else:
        clip.save_pretrained(root / "image_model")
    state = dict(llama.state_dict())
    if projector is not None:
        state.update(projector)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    write_shards(root / "text_model", state, text_shards, text_safetensors)
    config = dict(llama.config.to_dict(), **LLAVA_FIELDS)
    (root / "text_model" / "config.json").write_text(json.dumps(config))
    (root / "text_model" / "config_lmsys.json").write_text(json.dumps(llama.config.to_dict()))
    return root


def run_cli(*args):
    return cc.main([str(a) for a in args])


def hf_to_cs(src: Path, out: Path, *extra):
    assert run_cli("convert", "--model", "llava", "--src-fmt", "hf", "--tgt-fmt", "cs-2.2", "--config", src,
                   "--output-dir", out, "--no-progress-bar", *extra, src) == 0
    ckpt = torch.load(out / "pytorch_model_to_cs-2.2.mdl", weights_only=True)
    section = yaml.safe_load((out / "config_to_cs-2.2.yaml").read_text())["model"]
    return ckpt, section


def read_hf_folder(folder: Path) -> dict:
    state = {}
    for f in cc.find_weight_files(folder):
        state.update(cc.load_weight_file(f))
    return state


def reference_logits(clip, llama, projector, pixels, ids, start, layer=-2):
    """LLaVA's forward written with the HF modules: CLIP hidden_states[layer] without CLS -> mlp2x_gelu ->
    replaces the placeholder embeddings -> LlamaForCausalLM."""
    feats = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[layer][:, 1:]
    h = F.linear(F.gelu(F.linear(feats, projector["model.mm_projector.0.weight"],
                                 projector["model.mm_projector.0.bias"])),
                 projector["model.mm_projector.2.weight"], projector["model.mm_projector.2.bias"])
    emb = llama.model.embed_tokens(ids.long()).clone()
    emb[:, start:start + h.shape[1]] = h
    return llama(inputs_embeds=emb).logits


def our_logits(section, cs_state, pixels, ids):
    ours = M.LlavaModel(section).eval()
    ours.model.load_state_dict(cs_state)  # strict: every key present, none extra
    batch = {"image_data": pixels, "text_input_ids": ids, "key_padding_mask": torch.zeros_like(ids)}
    with torch.no_grad():
        return ours.logits(batch)


def inputs(seed=0, seq=40, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 28, 28, generator=g), torch.randint(1, vocab, (2, seq), generator=g, dtype=torch.int32)


# ----------------------------------------------------------------------------------------------
# Pure mapping functions


@pytest.mark.parametrize("heads,kv", [(4, 4), (4, 2), (4, 1)])
def test_llama_mapping_round_trips_exactly_and_permutes_q_k_rows(heads, kv):
    llama = tiny_llama(num_key_value_heads=kv)
    hf = dict(llama.state_dict(), **tiny_projector())
    cs = cc.hf_llama_to_cs(hf, heads, kv)
    assert cs["text_model.ln_f.weight"] is cs["text_model.transformer_decoder.norm.weight"]
    q_hf, q_cs = hf["model.layers.0.self_attn.q_proj.weight"], cs[
        "text_model.transformer_decoder.layers.0.self_attn.proj_q_dense_layer.weight"]
    d = 64 // heads
    assert torch.equal(q_cs[2], q_hf[1]) and torch.equal(q_cs[3], q_hf[1 + d // 2])  # row 2j <- j, 2j+1 <- j+d/2
    k_cs = cs["text_model.transformer_decoder.layers.0.self_attn.proj_k_dense_layer.weight"]
    assert k_cs.shape[0] == kv * d
    last = (kv - 1) * d  # first row of the last kv head: the permutation is per head
    assert torch.equal(k_cs[last + 1], hf["model.layers.0.self_attn.k_proj.weight"][last + d // 2])
    back = cc.cs_llama_to_hf(cs, heads, kv)
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_clip_mapping_rotates_the_cls_position_row_and_round_trips():
    hf = tiny_clip().state_dict()
    cs = cc.hf_clip_to_cs(hf)
    pos_hf = hf["vision_model.embeddings.position_embedding.weight"]
    pos_cs = cs["image_model.embedding_layer.position_embeddings.weight"]
    assert torch.equal(pos_cs[-1], pos_hf[0]) and torch.equal(pos_cs[:-1], pos_hf[1:])
    back = cc.cs_clip_to_hf(cs)
    assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)


def test_full_clip_model_state_drops_the_text_side_and_buffers():
    clip = tiny_clip()
    torch.manual_seed(3)
    full = CLIPModel(CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, vocab_size=50),
                                vision_config=CLIPVisionConfig(**VIT).to_dict(), projection_dim=8))
    full.vision_model.load_state_dict(clip.vision_model.state_dict())
    state = dict(full.state_dict(), **{"vision_model.embeddings.position_ids": torch.arange(17)[None]})
    assert any(k.startswith("text_model.") for k in state) and "logit_scale" in state
    cs = cc.hf_clip_to_cs(state)
    assert cs.keys() == cc.hf_clip_to_cs(clip.state_dict()).keys()


def test_llava_training_output_drops_its_vision_tower_copy_and_old_rope_buffers():
    hf = dict(tiny_llama().state_dict(), **tiny_projector())
    extra = {"model.vision_tower.vision_tower.vision_model.post_layernorm.weight": torch.ones(32),
             "model.layers.1.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    assert cc.hf_llama_to_cs(dict(hf, **extra), 4).keys() == cc.hf_llama_to_cs(hf, 4).keys()


def test_unknown_missing_and_misshaped_keys_raise_with_their_names():
    hf = dict(tiny_llama().state_dict())
    with pytest.raises(cc.ConversionError, match=r"model\.layers\.0\.self_attn\.q_proj\.lora_A"):
        cc.hf_llama_to_cs(dict(hf, **{"model.layers.0.self_attn.q_proj.lora_A": torch.zeros(2)}), 4)
    del hf["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(cc.ConversionError, match=r"missing: model\.layers\.1\.mlp\.down_proj\.weight"):
        cc.hf_llama_to_cs(hf, 4)
    hf = dict(tiny_llama().state_dict())
    with pytest.raises(cc.ConversionError, match=r"q_proj\.weight: 64 rows cannot be split into 3 heads"):
        cc.hf_llama_to_cs(hf, 3)
    proj = tiny_projector()
    del proj["model.mm_projector.2.bias"]
    with pytest.raises(cc.ConversionError, match=r"model\.mm_projector\.2\.bias"):  # partial projector
        cc.hf_llama_to_cs(dict(tiny_llama().state_dict(), **proj), 4)
    cs = cc.hf_llama_to_cs(dict(tiny_llama().state_dict()), 4)
    cs["text_model.ln_f.weight"] = cs["text_model.ln_f.weight"] + 1
    with pytest.raises(cc.ConversionError, match="final norm"):
        cc.cs_llama_to_hf(cs, 4)


def test_llava_hf_mapping_accepts_in_memory_names_and_emits_the_on_disk_layout(tmp_path):
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(LlavaConfig(vision_config=CLIPVisionConfig(**VIT),
                                                   text_config=LlamaConfig(**LLAMA, num_key_value_heads=2),
                                                   image_token_index=127))
    hf.save_pretrained(tmp_path)
    on_disk = read_hf_folder(tmp_path)
    memory = hf.state_dict()
    assert "lm_head.weight" in memory and "language_model.lm_head.weight" in on_disk
    cs = cc.llava_hf_to_cs(memory, 4, 2)
    assert cs.keys() == cc.llava_hf_to_cs(on_disk, 4, 2).keys()
    back = cc.cs_llava_to_hf(cs, 4, 2)
    assert back.keys() == on_disk.keys() and all(torch.equal(back[k], on_disk[k]) for k in on_disk)


# ----------------------------------------------------------------------------------------------
# hf layout (LLaVA repo): folders -> cs-2.2 -> folders


def test_hf_llava_folder_to_cs_gives_the_same_logits_and_converts_back_exactly(tmp_path):
    clip, llama, projector = tiny_clip(), tiny_llama(), tiny_projector()
    src = make_hf_dir(tmp_path / "hf", clip, llama, projector, full_clip_model=True)
    (src / "text_model" / "tokenizer.model").write_bytes(b"stand-in tokenizer bytes")
    ckpt, section = hf_to_cs(src, tmp_path / "cs")
    assert set(ckpt) == {"model"} and not any(k.startswith("model.") for k in ckpt["model"])
    pixels, ids = inputs()
    with torch.no_grad():
        theirs = reference_logits(clip, llama, projector, pixels, ids, start=section["image_start_idx"])
    assert (our_logits(section, ckpt["model"], pixels, ids) - theirs).abs().max() <= TOL

    out = tmp_path / "back"
    assert run_cli("convert", "--model", "llava", "--src-fmt", "cs-2.2", "--tgt-fmt", "hf", "--config",
                   tmp_path / "cs" / "config_to_cs-2.2.yaml", "--output-dir", out, "--hf-shard-size", "20KB",
                   "--tokenizer-dir", src / "text_model", "--no-progress-bar",
                   tmp_path / "cs" / "pytorch_model_to_cs-2.2.mdl") == 0
    image, text = read_hf_folder(out / "image_model"), read_hf_folder(out / "text_model")
    expected_text = dict(llama.state_dict(), **projector)
    assert image.keys() == clip.state_dict().keys() and text.keys() == expected_text.keys()
    assert all(torch.equal(image[k], v) for k, v in clip.state_dict().items())
    assert all(torch.equal(text[k], v) for k, v in expected_text.items())
    index = json.loads((out / "text_model" / "pytorch_model.bin.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # sharded by --hf-shard-size
    text_config = json.loads((out / "text_model" / "config.json").read_text())
    assert text_config["mm_vision_tower"] == str((out / "image_model").resolve())
    assert cc.hf_configs_to_cs(json.loads((out / "image_model" / "config.json").read_text()), text_config) == section
    assert (out / "text_model" / "tokenizer.model").read_bytes() == b"stand-in tokenizer bytes"
    assert run_cli("diff", src / "text_model", out / "text_model") == 0  # all shards of both folders
    assert run_cli("diff", src, out) == 1  # the source image_model is a full CLIPModel (text tower too)
    assert run_cli("diff", out / "text_model" / "pytorch_model-00001-of-00004.bin",
                   out / "text_model" / "pytorch_model-00002-of-00004.bin") == 1


def test_gqa_bf16_safetensors_round_trip_keeps_dtype_unless_dtype_is_given(tmp_path):
    src = make_hf_dir(tmp_path / "hf", projector=tiny_projector(), num_key_value_heads=2, text_safetensors=True,
                      dtype=torch.bfloat16)
    ckpt, section = hf_to_cs(src, tmp_path / "cs")
    assert section["text_model"]["extra_attention_params"] == {"num_kv_groups": 2}
    text = ckpt["model"]["text_model.transformer_decoder.layers.0.self_attn.proj_k_dense_layer.weight"]
    assert text.dtype == torch.bfloat16 and text.shape == (32, 64)
    assert ckpt["model"]["image_model.embedding_layer.cls_embedding"].dtype == torch.float32  # CLIP was fp32
    for extra, dtype in (((), torch.bfloat16), (("--dtype", "float32"), torch.float32)):
        out = tmp_path / f"back-{dtype}"
        assert run_cli("convert", "--model", "llava", "--src-fmt", "cs-2.2", "--tgt-fmt", "hf", "--config",
                       tmp_path / "cs" / "config_to_cs-2.2.yaml", "--output-dir", out, "--export-safetensors",
                       "--no-progress-bar", *extra, tmp_path / "cs" / "pytorch_model_to_cs-2.2.mdl") == 0
        assert (out / "text_model" / "model.safetensors").is_file()
        text = read_hf_folder(out / "text_model")
        original = read_hf_folder(src / "text_model")
        assert all(text[k].dtype == dtype and torch.equal(text[k], original[k].to(dtype)) for k in original)
        assert json.loads((out / "text_model" / "config.json").read_text())["num_key_value_heads"] == 2


def test_plain_vicuna_gets_a_fresh_uniform_projector(tmp_path, capsys):
    src = make_hf_dir(tmp_path / "hf", projector=None)
    ckpt, section = hf_to_cs(src, tmp_path / "cs", "--seed", "7")
    assert "creating a fresh projector" in capsys.readouterr().err
    w0 = ckpt["model"]["projector_image_model.ffn.0.linear_layer.weight"]
    b1 = ckpt["model"]["projector_image_model.ffn.1.linear_layer.bias"]
    assert w0.shape == (64, 32) and b1.shape == (64,)
    assert w0.abs().max() <= 32 ** -0.5 and b1.abs().max() <= 64 ** -0.5 and b1.abs().max() > 0.5 * 64 ** -0.5
    M.LlavaModel(section).model.load_state_dict(ckpt["model"])
    again, _ = hf_to_cs(src, tmp_path / "cs2", "--seed", "7")  # deterministic for a seed
    assert torch.equal(again["model"]["projector_image_model.ffn.0.linear_layer.weight"], w0)


def test_stage1_mm_projector_bin_beside_vicuna_weights_is_used(tmp_path):
    projector = tiny_projector(seed=5)
    src = make_hf_dir(tmp_path / "hf", projector=None)
    torch.save(projector, src / "text_model" / "mm_projector.bin")
    ckpt, _ = hf_to_cs(src, tmp_path / "cs")
    assert torch.equal(ckpt["model"]["projector_image_model.ffn.1.linear_layer.weight"],
                       projector["model.mm_projector.2.weight"])


def test_sharded_input_is_streamed_one_shard_at_a_time(tmp_path, monkeypatch):
    src = make_hf_dir(tmp_path / "hf", projector=tiny_projector(), text_shards=4)
    loaded = []
    real = cc.load_weight_file

    def tracking(path):
        assert all(not state for state in loaded), "an earlier shard was still held when the next was loaded"
        loaded.append(real(path))
        return loaded[-1]

    monkeypatch.setattr(cc, "load_weight_file", tracking)
    hf_to_cs(src, tmp_path / "cs")
    assert len(loaded) == 5  # image_model (1 file) + 4 text shards


def test_training_checkpoint_with_model_prefix_and_optimizer_state_converts(tmp_path):
    src = make_hf_dir(tmp_path / "hf", projector=tiny_projector())
    ckpt, section = hf_to_cs(src, tmp_path / "cs")
    model = M.LlavaModel(section)
    model.model.load_state_dict(ckpt["model"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(M.random_batch(model.config, 1, 40)).backward()
    opt.step()
    params = {"model": section, "optimizer": {"optimizer_type": "AdamW"}}
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "global_step": 1,
                "__metadata__": [{"version": "ours", "model_name": "LlavaModel", "params": params}]},
               tmp_path / "checkpoint_1.mdl")
    assert next(iter(model.state_dict())).startswith("model.")
    out = tmp_path / "back"  # no --config: the params come from __metadata__
    assert run_cli("convert", "--model", "llava", "--src-fmt", "cs-2.2", "--tgt-fmt", "hf", "--output-dir", out,
                   "--no-progress-bar", tmp_path / "checkpoint_1.mdl") == 0
    text = read_hf_folder(out / "text_model")
    trained = model.state_dict()["model.projector_image_model.ffn.0.linear_layer.weight"]
    assert torch.equal(text["model.mm_projector.0.weight"], trained)
    # cs -> cs: the weights alone, without the prefix, cast on request (what run.py's HDF5 message points to)
    assert run_cli("convert", "--model", "llava", "--src-fmt", "cs-2.2", "--tgt-fmt", "cs-2.2", "--dtype",
                   "bfloat16", "--output-dir", tmp_path / "cs2", tmp_path / "checkpoint_1.mdl") == 0
    again = torch.load(tmp_path / "cs2" / "pytorch_model_to_cs-2.2.mdl", weights_only=True)
    assert set(again) == {"model"} and list(again["model"]) == [k[len("model."):] for k in model.state_dict()]
    assert torch.equal(again["model"]["projector_image_model.ffn.0.linear_layer.weight"], trained.bfloat16())


def test_tied_embeddings_are_stored_once_on_the_hf_side(tmp_path):
    src = make_hf_dir(tmp_path / "hf", projector=tiny_projector(), tie_word_embeddings=True)
    index = json.loads((src / "text_model" / "pytorch_model.bin.index.json").read_text())
    assert "lm_head.weight" in index["weight_map"]  # state_dict() of a tied model still lists it
    ckpt, section = hf_to_cs(src, tmp_path / "cs")
    assert section["text_model"]["share_embedding_weights"] is True
    assert torch.equal(ckpt["model"]["text_model.lm_head.weight"],
                       ckpt["model"]["text_model.embedding_layer.word_embeddings.weight"])
    out = tmp_path / "back"
    assert run_cli("convert", "--model", "llava", "--src-fmt", "cs-2.2", "--tgt-fmt", "hf", "--config",
                   tmp_path / "cs" / "config_to_cs-2.2.yaml", "--output-dir", out, "--export-safetensors",
                   "--no-progress-bar", tmp_path / "cs" / "pytorch_model_to_cs-2.2.mdl") == 0
    text = read_hf_folder(out / "text_model")
    assert "lm_head.weight" not in text
    reloaded = LlamaForCausalLM.from_pretrained(out / "text_model")  # re-ties lm_head to the embeddings
    assert torch.equal(reloaded.lm_head.weight, text["model.embed_tokens.weight"])
    image = read_hf_folder(out / "image_model")  # and transformers reads the image tower as written
    loaded = CLIPVisionModel.from_pretrained(out / "image_model").state_dict()
    assert loaded.keys() == image.keys() and all(torch.equal(loaded[k], image[k]) for k in image)


# ----------------------------------------------------------------------------------------------
# Errors a user meets


def test_config_that_does_not_match_the_weights_names_key_and_shapes(tmp_path, capsys):
    src = make_hf_dir(tmp_path / "hf", projector=tiny_projector())
    config = json.loads((src / "text_model" / "config.json").read_text())
    (src / "text_model" / "config.json").write_text(json.dumps(dict(config, intermediate_size=80)))
    assert run_cli("convert", "--model", "llava", "--src-fmt", "hf", "--tgt-fmt", "cs-2.2", "--output-dir",
                   tmp_path / "cs", "--no-progress-bar", src) == 1
    err = capsys.readouterr().err
    assert "the config does not match the weights" in err
    mapped = "model.layers.0.mlp.up_proj.weight -> text_model.transformer_decoder.layers.0.ffn.ffn.0.linear_layer"
    assert f"{mapped}.weight has shape [96, 64]" in err and "[80, 64]" in err


def test_cs_checkpoint_against_a_different_config_lists_the_problems(tmp_path, capsys):
    src = make_hf_dir(tmp_path / "hf", projector=tiny_projector())
    _, section = hf_to_cs(src, tmp_path / "cs")
    section["text_model"]["num_hidden_layers"] = 3
    (tmp_path / "other.yaml").write_text(yaml.safe_dump({"model": section}))
    assert run_cli("convert", "--model", "llava", "--src-fmt", "cs-2.2", "--tgt-fmt", "hf", "--config",
                   tmp_path / "other.yaml", "--output-dir", tmp_path / "back",
                   tmp_path / "cs" / "pytorch_model_to_cs-2.2.mdl") == 1
    err = capsys.readouterr().err
    assert "parameter(s) missing: text_model.transformer_decoder.layers.2." in err


def test_unknown_key_in_a_shard_fails_unless_dropping_is_asked_for(tmp_path, capsys):
    src = make_hf_dir(tmp_path / "hf", projector=tiny_projector(), text_shards=1)
    state = torch.load(src / "text_model" / "pytorch_model-00001-of-00001.bin", weights_only=True)
    state["model.layers.0.self_attn.extra_scale.weight"] = torch.ones(16)
    torch.save(state, src / "text_model" / "pytorch_model-00001-of-00001.bin")
    args = ["convert", "--model", "llava", "--src-fmt", "hf", "--tgt-fmt", "cs-2.2", "--no-progress-bar",
            "--output-dir", tmp_path / "cs", src]
    assert run_cli(*args) == 1
    assert "model.layers.0.self_attn.extra_scale.weight" in capsys.readouterr().err
    assert run_cli(*args, "--drop-unmatched-keys") == 0
    assert "Dropping 1 unmatched key(s)" in capsys.readouterr().err


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_pickle_that_runs_code_is_refused(tmp_path, capsys):
    src = make_hf_dir(tmp_path / "hf", projector=tiny_projector(), text_shards=1)
    with open(src / "text_model" / "pytorch_model-00001-of-00001.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": Evil()}, f, protocol=2)
    assert run_cli("convert", "--model", "llava", "--src-fmt", "hf", "--tgt-fmt", "cs-2.2", "--no-progress-bar",
                   "--output-dir", tmp_path / "cs", src) == 1
    out = capsys.readouterr()
    assert "refused to load" in out.err and "pwned" not in out.out


def test_wrong_src_fmt_missing_folder_and_hdf5_get_clear_messages(tmp_path, capsys, monkeypatch):
    src = make_hf_dir(tmp_path / "hf", projector=tiny_projector())
    hf_to_cs(src, tmp_path / "cs")
    mdl = tmp_path / "cs" / "pytorch_model_to_cs-2.2.mdl"
    common = ["--model", "llava", "--output-dir", tmp_path / "x", "--no-progress-bar"]
    cases = [
        (["--src-fmt", "hf", "--tgt-fmt", "cs-2.2", mdl], "is a file; --src-fmt hf expects a folder"),
        (["--src-fmt", "cs-2.2", "--tgt-fmt", "hf", "--config", tmp_path / "cs" / "config_to_cs-2.2.yaml", src],
         "is a folder; --src-fmt cs-2.2 expects a .mdl file (a folder is --src-fmt hf)"),
        (["--src-fmt", "hf", "--tgt-fmt", "cs-2.2", tmp_path / "nowhere"], "nowhere: not found"),
        (["--src-fmt", "hf", "--tgt-fmt", "cs-2.2", src / "text_model"], "image_model/ not found"),
        (["--src-fmt", "hf", "--tgt-fmt", "llava-hf", src], "not supported"),
    ]
    for args, message in cases:
        assert run_cli("convert", *common, *args) == 1
        assert message in capsys.readouterr().err, message
    import h5py

    monkeypatch.setitem(sys.modules, "cerebras.pytorch", None)  # as in an environment without it
    with h5py.File(tmp_path / "cerebras.mdl", "w") as f:
        f["model.image_model.embedding_layer.cls_embedding"] = [0.0]
    assert run_cli("convert", *common, "--src-fmt", "cs-2.2", "--tgt-fmt", "hf", "--config",
                   tmp_path / "cs" / "config_to_cs-2.2.yaml", tmp_path / "cerebras.mdl") == 1
    assert "Cerebras HDF5 checkpoint" in capsys.readouterr().err


def test_cerebras_hdf5_checkpoint_converts_where_cerebras_pytorch_is_installed(tmp_path):
    cstorch = pytest.importorskip("cerebras.pytorch", reason="cerebras.pytorch is only in the Cerebras environment")
    src = make_hf_dir(tmp_path / "hf", projector=tiny_projector())
    ckpt, _ = hf_to_cs(src, tmp_path / "cs")
    cstorch.save({"model": {f"model.{k}": v for k, v in ckpt["model"].items()}}, str(tmp_path / "h5.mdl"))
    args = ["--model", "llava", "--src-fmt", "cs-2.2", "--config", tmp_path / "cs" / "config_to_cs-2.2.yaml",
            "--no-progress-bar"]
    assert run_cli("convert", *args, "--tgt-fmt", "cs-2.2", "--output-dir", tmp_path / "plain",
                   tmp_path / "h5.mdl") == 0
    plain = torch.load(tmp_path / "plain" / "pytorch_model_to_cs-2.2.mdl", weights_only=True)["model"]
    assert plain.keys() == ckpt["model"].keys() and all(torch.equal(plain[k], ckpt["model"][k]) for k in plain)
    assert run_cli("convert", *args, "--tgt-fmt", "hf", "--export-safetensors", "--output-dir", tmp_path / "back",
                   tmp_path / "h5.mdl") == 0
    assert run_cli("diff", src / "text_model", tmp_path / "back" / "text_model") == 0


def test_existing_weights_in_the_output_folder_are_not_overwritten(tmp_path, capsys):
    src = make_hf_dir(tmp_path / "hf", projector=tiny_projector())
    hf_to_cs(src, tmp_path / "cs")
    # Default --output-dir for cs -> hf is the checkpoint's folder; pointing it at the hf source must not clobber.
    assert run_cli("convert", "--model", "llava", "--src-fmt", "cs-2.2", "--tgt-fmt", "hf", "--config",
                   tmp_path / "cs" / "config_to_cs-2.2.yaml", "--output-dir", src, "--no-progress-bar",
                   tmp_path / "cs" / "pytorch_model_to_cs-2.2.mdl") == 1
    assert "already holds weights" in capsys.readouterr().err


def test_shard_size_parsing():
    assert cc.parse_size("10GB") == 10 * 10**9 and cc.parse_size("2GiB") == 2 * 2**30
    assert cc.parse_size("500MB") == 500 * 10**6 and cc.parse_size(1024) == 1024
    with pytest.raises(cc.ConversionError, match="--hf-shard-size"):
        cc.parse_size("ten gigs")


def test_list_and_help_run_without_heavy_imports():
    import subprocess
    import sys

    code = ("import sys, convert_checkpoint as c; c.main(['list']); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert "llava-hf" in out.stdout and "hf" in out.stdout
