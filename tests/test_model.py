"""Model foundation: config parsing, sizes of the real configs, masks, loss, freezing (CPU, seconds)."""

from pathlib import Path

import pytest
import torch
import yaml

import model as M
import modeling_llava as ml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def load_model_section(name):
    return yaml.safe_load((CONFIGS / name).read_text())["model"]


def tiny_section(**overrides):
    section = load_model_section("params_llava_tiny_phase2.yaml")
    section.update(overrides)
    return section


def tiny_batch(model, batch_size=2, seq_len=None, seed=0):
    cfg = model.config
    seq_len = seq_len or cfg.image_start_idx + model.model.num_image_tokens + 24
    return M.random_batch(cfg, batch_size, seq_len, torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# Real configs on the meta device


@pytest.mark.parametrize("size,expected_text,hidden", [("7b", 6.738e9, 4096), ("13b", 13.016e9, 5120)])
@pytest.mark.parametrize("phase", [1, 2])
def test_cerebras_configs_build_with_expected_parameter_counts(size, expected_text, hidden, phase):
    section = load_model_section(f"params_llava_v1p5_pretrain_{size}_phase{phase}_MSL2K.yaml")
    with torch.device("meta"):
        llava = M.LlavaModel(section)
    counts = llava.parameter_counts()
    vit = sum(p.numel() for p in llava.model.image_model.parameters())
    text = sum(p.numel() for p in llava.model.text_model.parameters())
    projector = sum(p.numel() for p in llava.model.projector_image_model.parameters())
    assert vit == pytest.approx(3.035e8, rel=2e-3)  # CLIP ViT-L/14-336 vision tower
    assert text == pytest.approx(expected_text, rel=2e-3)  # Vicuna-7B / 13B
    assert projector == 1024 * hidden + hidden + hidden * hidden + hidden
    assert counts["total"] == vit + text + projector
    if size == "7b":
        assert counts["total"] == pytest.approx(7.06e9, rel=2e-3)  # LLaVA-1.5-7B
    if phase == 1:
        assert counts["trainable"] == projector
    else:
        assert counts["trainable"] == text + projector


def test_cerebras_configs_parse_with_image_start_idx_and_freeze():
    p1 = M.parse_model_config(load_model_section("params_llava_v1p5_pretrain_7b_phase1_MSL2K.yaml"))
    p2 = M.parse_model_config(load_model_section("params_llava_v1p5_pretrain_7b_phase2_MSL2K.yaml"))
    assert (p1.image_start_idx, p2.image_start_idx) == (1, 35)
    assert p1.freeze == ["^image_model", "^text_model"] and p2.freeze == ["^image_model"]
    assert p1.image_feature_select_layer_idx == -2
    assert "model.image_model.attention_softmax_fp32" in p1.ignored_keys


def test_state_dict_names_follow_cerebras_layout():
    llava = M.LlavaModel(tiny_section())
    keys = set(llava.model.state_dict())
    for key in [
        "image_model.embedding_layer.linear_proj.weight",
        "image_model.embedding_layer.cls_embedding",
        "image_model.embedding_layer.position_embeddings.weight",
        "image_model.embedding_layer.post_embed_ln.weight",
        "image_model.encoder.transformer_encoder.layers.1.self_attn.proj_q_dense_layer.bias",
        "image_model.encoder.transformer_encoder.layers.0.self_attn.proj_output_dense_layer.weight",
        "image_model.encoder.transformer_encoder.layers.0.ffn.ffn.1.linear_layer.bias",
        "image_model.encoder.transformer_encoder.layers.0.norm2.weight",
        "image_model.encoder.transformer_encoder.norm.bias",
        "text_model.embedding_layer.word_embeddings.weight",
        "text_model.transformer_decoder.layers.1.self_attn.proj_k_dense_layer.weight",
        "text_model.transformer_decoder.layers.0.norm3.weight",
        "text_model.transformer_decoder.layers.0.ffn.ffn.0.linear_layer_for_glu.weight",
        "text_model.transformer_decoder.norm.weight",
        "text_model.ln_f.weight",
        "text_model.lm_head.weight",
        "projector_image_model.ffn.1.linear_layer.bias",
    ]:
        assert key in keys, key
    assert "text_model.transformer_decoder.layers.0.self_attn.proj_q_dense_layer.bias" not in keys
    assert "image_model.embedding_layer.linear_proj.bias" not in keys
    # one position row per patch plus the CLS row (stored last)
    im = llava.config.image_model
    patches = (im.image_size[0] // im.patch_size[0]) * (im.image_size[1] // im.patch_size[1])
    assert llava.model.state_dict()["image_model.embedding_layer.position_embeddings.weight"].shape[0] == patches + 1


def test_tied_embeddings_share_one_tensor():
    section = tiny_section()
    section["text_model"] = dict(section["text_model"], share_embedding_weights=True)
    llava = M.LlavaModel(section)
    tm = llava.model.text_model
    assert tm.lm_head.weight is tm.embedding_layer.word_embeddings.weight


# ----------------------------------------------------------------------------------------------
# Config errors


def test_unknown_key_lists_valid_keys_and_closest_match():
    section = tiny_section()
    section["text_model"] = dict(section["text_model"], num_head=4)
    with pytest.raises(M.ConfigError, match=r"model\.text_model\.num_head.*Did you mean 'num_heads'.*Valid keys"):
        M.LlavaModel(section)


def test_unknown_top_level_key_fails():
    with pytest.raises(M.ConfigError, match=r"Unknown key model\.image_startidx.*image_start_idx"):
        M.LlavaModel(tiny_section(image_startidx=3))


@pytest.mark.parametrize("override,message", [
    ({"loss_scaling": "per_token"}, "loss_scaling"),
    ({"loss_weight": 0.5}, "loss_weight"),
    ({"image_feature_select_mode": "cls"}, "image_feature_select_mode"),
    ({"image_feature_select_layer_idx": 5}, "image_feature_select_layer_idx"),
    ({"freeze": ["^vision_tower"]}, "matches no module"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(M.ConfigError, match=message):
        M.LlavaModel(tiny_section(**override))


def test_projector_width_mismatch_is_an_error():
    section = tiny_section()
    section["projector"] = {"image_model": dict(section["projector"]["image_model"], input_unit=32)}
    with pytest.raises(M.ConfigError, match="input_unit"):
        M.LlavaModel(section)


# ----------------------------------------------------------------------------------------------
# Freezing


def test_phase1_freeze_leaves_only_projector_trainable():
    llava = M.LlavaModel(tiny_section(freeze=["^image_model", "^text_model"]))
    trainable = {n for n, p in llava.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.projector_image_model.") for n in trainable)
    loss = llava(tiny_batch(llava))
    loss.backward()
    assert all(p.grad is None for n, p in llava.named_parameters() if not n.startswith("model.projector"))
    assert all(p.grad is not None for n, p in llava.named_parameters() if n.startswith("model.projector"))


def test_phase2_freeze_trains_text_and_projector_only():
    llava = M.LlavaModel(tiny_section(freeze=["^image_model"]))
    frozen = {n.split(".")[1] for n, p in llava.named_parameters() if not p.requires_grad}
    trainable = {n.split(".")[1] for n, p in llava.named_parameters() if p.requires_grad}
    assert frozen == {"image_model"} and trainable == {"text_model", "projector_image_model"}
    counts = llava.parameter_counts()
    assert counts["frozen"] == sum(p.numel() for p in llava.model.image_model.parameters())


# ----------------------------------------------------------------------------------------------
# Masks, image placement, loss


def test_key_padding_mask_hides_masked_positions():
    llava = M.LlavaModel(tiny_section()).eval()
    batch = tiny_batch(llava)
    seq = batch["text_input_ids"].shape[1]
    masked = torch.zeros_like(batch["key_padding_mask"])
    masked[:, seq - 6:] = 1  # right padding
    after_image = llava.config.image_start_idx + llava.model.num_image_tokens
    masked[1, after_image + 2:after_image + 5] = 1  # and a masked block inside sample 1
    batch["key_padding_mask"] = masked
    changed = {k: v.clone() for k, v in batch.items()}
    changed["text_input_ids"] = torch.where(masked.bool(), torch.randint_like(masked, 3, 999), batch["text_input_ids"])
    with torch.no_grad():
        a, b = llava.logits(batch), llava.logits(changed)
    keep = masked == 0
    assert torch.allclose(a[keep], b[keep], atol=1e-6)
    # ... and the mask is not a no-op: without it, the later positions do change
    for x in (batch, changed):
        x["key_padding_mask"] = torch.zeros_like(masked)
    with torch.no_grad():
        assert not torch.allclose(llava.logits(batch)[keep], llava.logits(changed)[keep], atol=1e-4)


def test_image_reaches_only_positions_after_the_image_slots():
    llava = M.LlavaModel(tiny_section()).eval()
    batch = tiny_batch(llava)
    other = dict(batch, image_data=torch.randn_like(batch["image_data"]))
    start = llava.config.image_start_idx
    with torch.no_grad():
        a, b = llava.logits(batch), llava.logits(other)
    assert torch.allclose(a[:, :start], b[:, :start], atol=1e-6)  # causal: text before the image cannot see it
    assert not torch.allclose(a[:, start:], b[:, start:], atol=1e-4)


def test_per_sample_image_start_index_matches_static_index():
    llava = M.LlavaModel(tiny_section()).eval()
    batch = tiny_batch(llava)
    start = llava.config.image_start_idx
    with torch.no_grad():
        static = llava.logits(batch)
        per_sample = llava.logits(dict(batch, image_start_idx=torch.full((2,), start, dtype=torch.int32)))
        shifted = llava.logits(dict(batch, image_start_idx=torch.tensor([start, start + 2], dtype=torch.int32)))
    assert torch.allclose(static, per_sample, atol=1e-6)
    assert torch.allclose(static[0], shifted[0], atol=1e-6) and not torch.allclose(static[1], shifted[1], atol=1e-4)


def manual_token_losses(llava, batch):
    logits = llava.logits(batch).float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].long().flatten(),
                                             reduction="none").view_as(batch["loss_mask"].float())


def test_loss_counts_only_loss_mask_positions_num_tokens():
    llava = M.LlavaModel(tiny_section()).eval()
    batch = tiny_batch(llava)
    batch["loss_mask"][0, -3:] = 0  # an uneven number of loss tokens per sample
    with torch.no_grad():
        per_token = manual_token_losses(llava, batch)
        expected = (per_token * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
        loss = llava(batch)
        # labels at positions without loss do not matter
        relabelled = dict(batch, labels=torch.where(batch["loss_mask"].bool(), batch["labels"], 7))
        assert torch.allclose(llava(relabelled), loss)
        # the full-logits path agrees with the sparse (loss positions only) path
        dense = M.LlavaModel(llava.config, sparse_logits=False).eval()
        dense.load_state_dict(llava.state_dict())
        assert torch.allclose(dense(batch), loss, atol=1e-6)
        loss2, logits = llava(batch, output_logits=True)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(loss2, expected, atol=1e-6) and logits.shape[:2] == batch["labels"].shape


def test_loss_scaling_batch_size_with_weight():
    section = tiny_section(loss_scaling="batch_size", loss_weight=0.5)
    llava = M.LlavaModel(section).eval()
    batch = tiny_batch(llava, batch_size=3)
    with torch.no_grad():
        per_token = manual_token_losses(llava, batch)
        expected = (per_token * batch["loss_mask"]).sum() / 3 * 0.5
        assert torch.allclose(llava(batch), expected, atol=1e-6)


def test_batch_features_must_be_int32():
    llava = M.LlavaModel(tiny_section())
    batch = tiny_batch(llava)
    batch["labels"] = batch["labels"].long()
    with pytest.raises(TypeError, match="labels.*int32"):
        llava(batch)


def test_cls_patch_mode_uses_one_more_image_token():
    llava = M.LlavaModel(tiny_section(image_feature_select_mode="cls_patch")).eval()
    assert llava.model.num_image_tokens == llava.model.image_model.num_patches + 1
    loss = llava(tiny_batch(llava))
    assert torch.isfinite(loss)


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = M.LlavaModel(tiny_section())
    ckpt = M.LlavaModel(tiny_section(activation_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    batch = tiny_batch(plain)
    plain(batch).backward()
    ckpt(batch).backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-6), n


def test_rmsnorm_computes_in_fp32():
    norm = ml.RMSNorm(8, 1e-5).to(torch.bfloat16)
    x = (torch.randn(4, 8) * 300).to(torch.bfloat16).float()
    out = norm(x.to(torch.bfloat16))
    ref = (x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
