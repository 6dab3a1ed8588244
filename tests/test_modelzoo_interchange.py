"""Interchange with Cerebras ModelZoo: its converted yamls, its checkpoint metadata and its optimizer layout.

Fixtures are built here in ModelZoo's formats (the keys its LLaVA converter writes at 2.2 and 2.5+/2.10, a
checkpoint with its `__metadata__`, two-group cstorch AdamW state and scheduler state), and resumed with all
states; the next steps must match an uninterrupted run bitwise on CPU.
"""

import copy

import pytest
import torch
from packaging.version import Version

import model as M
import run
from test_run import PHASE1, PHASE2, cli, data, losses, overrides, weights  # noqa: F401  (data: fixture)

# ----------------------------------------------------------------------------------------------
# Converted yamls: the keys and values ModelZoo's `convert_checkpoint.py --model llava --tgt-fmt cs-2.x` writes
# (sizes shrunk to the tiny config's, so the model is the tiny one).


def tiny_model_section():
    return run.load_params(PHASE2, [])["model"]


def modelzoo_converted_section(version: str) -> dict:
    tiny = tiny_model_section()
    im, tm = tiny["image_model"], tiny["text_model"]
    image = {
        "name": "ViTModel", "hidden_size": im["hidden_size"], "num_hidden_layers": im["num_hidden_layers"],
        "num_heads": im["num_heads"], "filter_size": im["filter_size"], "nonlinearity": "quick_gelu",
        "layer_norm_epsilon": 1.0e-05, "attention_dropout_rate": 0.0, "initializer_range": im.get("initializer_range", 0.02),
        "image_size": im["image_size"], "patch_size": im["patch_size"], "num_channels": 3,
        "use_conv_patchified_embedding": True, "prepend_cls_token": True, "use_post_embed_layer_norm": True,
        "dropout_rate": 0.0, "use_embed_proj_bias": False, "attention_type": "scaled_dot_product",
        "use_encoder_pooler_layer": False, "position_embedding_type": "learned", "norm_first": True,
        "use_projection_bias_in_attention": True, "use_ffn_bias_in_attention": True, "use_ffn_bias": True,
    }
    text = {
        "name": "LlamaModel", "vocab_size": tm["vocab_size"], "hidden_size": tm["hidden_size"],
        "num_hidden_layers": tm["num_hidden_layers"], "num_heads": tm["num_heads"], "filter_size": tm["filter_size"],
        "nonlinearity": "swiglu", "layer_norm_epsilon": 1.0e-05, "max_position_embeddings": tm["max_position_embeddings"],
        "initializer_range": tm["initializer_range"], "share_embedding_weights": False, "pos_scaling_factor": 1.0,
        "attention_module": "aiayn_attention", "rotary_dim": tm["hidden_size"] // tm["num_heads"],
        "position_embedding_type": "rotary", "embedding_dropout_rate": 0.0, "embedding_layer_norm": False,
        "attention_type": "scaled_dot_product", "use_projection_bias_in_attention": False,
        "use_ffn_bias_in_attention": False, "use_ffn_bias": False, "attention_dropout_rate": 0.0, "dropout_rate": 0.0,
        "use_bias_in_output": False, "norm_first": True, "use_ff_layer1_dropout": False, "norm_type": "rmsnorm",
    }
    section = {
        "loss_weight": 1.0, "loss_scaling": "num_tokens", "label_smoothing": 0.0, "z_loss_eps": 0.0,
        "image_start_idx": tiny["image_start_idx"], "image_feature_select_mode": "patch",
        "image_feature_select_layer_idx": tiny["image_feature_select_layer_idx"], "freeze": ["^image_model"],
        "image_model": image, "text_model": text,
        "projector": {"image_model": {"name": "FeedForwardNetwork", "input_unit": im["hidden_size"],
                                      "layers_units": [tm["hidden_size"]] * 2, "layers_activation": ["gelu", None],
                                      "use_bias": True}},
    }
    if version == "2.2":
        section["mixed_precision"] = True
    else:  # newer converters keep the classifier keys of the ViT and name the model
        image.update(num_classes=768, use_bias_in_output=False)
        section["name"] = "llava"
    return section


def shapes(cfg):
    return {k: tuple(v.shape) for k, v in M.LlavaModel(cfg).state_dict().items()}


@pytest.mark.parametrize("version", ["2.2", "2.10"])
def test_modelzoo_converted_yaml_is_accepted_and_builds_the_same_model(version):
    cfg = M.parse_model_config(modelzoo_converted_section(version))
    assert "model.text_model.embedding_layer_norm" in cfg.ignored_keys
    assert "model.label_smoothing" in cfg.ignored_keys and "model.z_loss_eps" in cfg.ignored_keys
    if version == "2.10":
        assert "model.image_model.num_classes" in cfg.ignored_keys
    reference = M.parse_model_config(tiny_model_section())
    assert shapes(cfg) == shapes(reference)
    assert cfg.text_model == reference.text_model and cfg.image_model == reference.image_model


@pytest.mark.parametrize("section, key, value", [
    ("text_model", "embedding_layer_norm", True),
    ("text_model", "use_ff_layer1_dropout", True),
    ("text_model", "attention_logit_softcapping", 30.0),
    ("image_model", "use_bias_in_output", True),
    (None, "label_smoothing", 0.1),
    (None, "z_loss_eps", 1.0e-4),
])
def test_modelzoo_keys_with_an_effect_name_the_key_and_value(section, key, value):
    cfg = modelzoo_converted_section("2.10")
    (cfg[section] if section else cfg)[key] = value
    where = f"model.{section}.{key}" if section else f"model.{key}"
    with pytest.raises(M.ConfigError, match=rf"{where}: {value!r} is not supported"):
        M.parse_model_config(cfg)


def test_embedding_dropout_alias_sets_embd_pdrop_and_conflicts_are_refused():
    cfg = modelzoo_converted_section("2.10")
    cfg["text_model"]["embedding_dropout_rate"] = 0.25
    assert M.parse_model_config(copy.deepcopy(cfg)).text_model.embd_pdrop == 0.25
    cfg["text_model"]["embd_pdrop"] = 0.0
    with pytest.raises(M.ConfigError, match="embedding_dropout_rate.*embd_pdrop.*same setting"):
        M.parse_model_config(cfg)


# ----------------------------------------------------------------------------------------------
# Checkpoints: metadata, parameter groups, resuming ModelZoo-shaped and older states


def test_parameter_groups_are_modelzoo_s_decay_and_no_decay_split():
    llava = M.LlavaModel(tiny_model_section())
    decay, no_decay = M.param_group_names(llava)
    trainable = [n for n, p in llava.named_parameters() if p.requires_grad]
    # ModelZoo: biases and the weights of norm modules (here RMSNorm norm1/norm3/final norm) take no decay
    expected_no_decay = [n for n in trainable if "bias" in n or ".norm" in n]
    assert no_decay == expected_no_decay
    assert decay == [n for n in trainable if n not in expected_no_decay]
    assert (len(decay), len(no_decay)) == (18, 7)  # the small phase-2 model of the ModelZoo report


def test_checkpoint_metadata_and_optimizer_state_are_modelzoo_shaped(data, tmp_path):
    run.main(cli("CPU", "train", PHASE2, tmp_path, data, 2, steps=2))
    ckpt = weights(tmp_path / "checkpoint_2.mdl")
    meta = ckpt["__metadata__"][-1]
    Version(meta["version"])  # ModelZoo's compatibility check and cs-auto parse it as PEP 440
    assert meta["model_name"] == "LlavaModel" and meta["llava_pipeline"]["writer"] == "run.py"
    groups = ckpt["optimizer"]["param_groups"]
    assert [len(g["params"]) for g in groups] == [18, 7] and groups[1]["weight_decay"] == 0.0
    assert {"lr", "betas", "eps", "weight_decay", "correct_bias", "amsgrad", "l2_regularization_rate"} <= set(groups[0])
    # the scheduler position also in cstorch's form (SequentialLR: warm-up 2 steps, then the cosine)
    scheduler = ckpt["lr_scheduler"]
    assert int(scheduler["last_epoch"]) == 2 and [int(s["last_epoch"]) for s in scheduler["_schedulers"]] == [2, 0]
    b1, b2 = groups[0]["betas"]
    for s in ckpt["optimizer"]["state"].values():  # cstorch's beta powers after 2 steps: beta^(2+1)
        assert torch.isclose(s["beta1_power"], torch.tensor(b1 ** 3)) and torch.isclose(s["beta2_power"],
                                                                                       torch.tensor(b2 ** 3))


def to_modelzoo(ckpt: dict) -> dict:
    """One of our checkpoints as ModelZoo's Trainer writes it: plain version, no `step`, lr tensors, cstorch
    scheduler state under `schedulers`."""
    out = copy.deepcopy(ckpt)
    out["__metadata__"] = [{"version": "2.10.0", "model_name": "LlavaModel", "params": ckpt["__metadata__"][-1]["params"]}]
    out["optimizer"]["state"] = {i: {k: v for k, v in s.items() if k != "step"} for i, s in out["optimizer"]["state"].items()}
    for g in out["optimizer"]["param_groups"]:
        g["lr"] = torch.tensor(g["lr"])
    scheduler = out.pop("lr_scheduler")
    step = scheduler.pop("last_step")
    out["schedulers"] = [{**scheduler, "_step_count": step + 1, "_milestones": [2]}]
    return out


def to_single_group(ckpt: dict, legacy_order: list, grouped_order: list) -> dict:
    """One of our checkpoints as this project wrote it before the grouping: one group, named_parameters order."""
    out = copy.deepcopy(ckpt)
    out["__metadata__"] = [{"version": "llava-torch-2.13.0+cpu", "model_name": "LlavaModel",
                            "params": ckpt["__metadata__"][-1]["params"]}]
    new_index = {n: i for i, n in enumerate(grouped_order)}
    state = out["optimizer"]["state"]
    out["optimizer"]["state"] = {old: {k: v for k, v in state[new_index[n]].items() if "power" not in k}
                                 for old, n in enumerate(legacy_order)}
    group = dict(out["optimizer"]["param_groups"][0], params=list(range(len(legacy_order))))
    out["optimizer"]["param_groups"] = [group]
    return out


@pytest.mark.parametrize("shape", ["modelzoo", "single_group"])
def test_resume_from_other_optimizer_layouts_matches_an_uninterrupted_run(data, tmp_path, shape):
    straight = tmp_path / "straight"
    run.main(cli("CPU", "train", PHASE2, straight, data, 2, steps=4, **{"runconfig.checkpoint_steps": 2}))
    ckpt = weights(straight / "checkpoint_2.mdl")
    if shape == "modelzoo":
        other = to_modelzoo(ckpt)
    else:
        llava = M.LlavaModel(run.apply_overrides(run.load_params(PHASE2, []), overrides(data, 2))["model"])
        legacy = [n for n, p in llava.named_parameters() if p.requires_grad]
        other = to_single_group(ckpt, legacy, [n for g in M.param_group_names(llava) for n in g])
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    torch.save(other, resumed / "checkpoint_2.mdl")
    run.main(cli("CPU", "train", PHASE2, resumed, data, 2, steps=4, **{"runconfig.checkpoint_steps": 2}))
    a, b = weights(straight / "checkpoint_4.mdl"), weights(resumed / "checkpoint_4.mdl")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["optimizer"]["state"][i]["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"])
               for i in a["optimizer"]["state"])
    assert a["lr_scheduler"] == b["lr_scheduler"] and a["dataloader"] == b["dataloader"]
    la, lb = losses(straight), losses(resumed)
    assert la[3] == lb[3] and la[4] == lb[4]


def test_optimizer_groups_that_do_not_line_up_name_both_sides(data, tmp_path):
    run.main(cli("CPU", "train", PHASE1, tmp_path / "p1", data, 1, steps=1))
    with pytest.raises(SystemExit, match=r"(?s)\[2, 2\].*\[18, 7\].*load_checkpoint_states: model"):
        run.main(cli("CPU", "train", PHASE2, tmp_path / "p2", data, 2, "--checkpoint_path",
                     str(tmp_path / "p1" / "checkpoint_1.mdl"), "--load_checkpoint_states",
                     "model,optimizer", steps=1))


def test_converter_reads_a_modelzoo_converted_pair(tmp_path):
    """`convert_checkpoint.py --src-fmt cs-2.2` on ModelZoo's own converted pair (its yaml keys, unprefixed weights)."""
    import yaml

    import convert_checkpoint as cc

    section = modelzoo_converted_section("2.10")
    config = tmp_path / "config_to_cs-2.2.yaml"
    config.write_text(yaml.safe_dump({"model": section}))
    torch.manual_seed(0)
    inner = M.LlavaModel(section).model.state_dict()
    torch.save({"model": inner}, tmp_path / "pytorch_model_to_cs-2.2.mdl")
    out = tmp_path / "hf"
    assert cc.main(["convert", "--model", "llava", "--src-fmt", "cs-2.2", "--tgt-fmt", "hf", "--config", str(config),
                    "--output-dir", str(out), "--no-progress-bar", str(tmp_path / "pytorch_model_to_cs-2.2.mdl")]) == 0
    assert (out / "image_model" / "config.json").is_file() and (out / "text_model" / "config.json").is_file()
