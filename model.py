"""LlavaModel: builds modeling_llava.Llava from the yaml `model:` section, computes the loss, freezes.

The `model:` grammar is Cerebras ModelZoo's (image_model / text_model / projector sub-sections with Cerebras
key names), so the four Cerebras LLaVA configs load unchanged. Keys Cerebras accepts that have no effect here
are accepted and reported once as ignored; unknown keys fail with the valid ones and the closest match.

    python model.py configs/params_llava_tiny_phase1.yaml     # build, print parameter counts, one fwd/bwd
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
import sys
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import modeling_llava as ml

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config value or key is wrong; the message says which and what to change."""


# ----------------------------------------------------------------------------------------------
# Config dataclasses. IGNORED lists keys Cerebras accepts that have no effect in this implementation.


@dataclass
class ImageModelConfig:
    name: str = "ViTModel"  # Cerebras model name; only ViTModel (CLIP-style ViT) is implemented
    hidden_size: int = 1024  # width of the ViT
    num_hidden_layers: int = 24  # encoder layers
    num_heads: int = 16  # attention heads
    filter_size: int = 4096  # FFN inner width
    image_size: List[int] = field(default_factory=lambda: [336, 336])  # [H, W] input resolution
    patch_size: List[int] = field(default_factory=lambda: [14, 14])  # [h, w] conv patch size
    num_channels: int = 3  # image channels
    nonlinearity: str = "quick_gelu"  # FFN activation (CLIP quick_gelu, SigLIP gelu_pytorch_tanh)
    layer_norm_epsilon: float = 1e-5  # LayerNorm eps
    position_embedding_type: str = "learned"  # only learned position embeddings are implemented
    use_post_embed_layer_norm: bool = True  # LayerNorm after the embeddings (CLIP pre_layrnorm)
    use_embed_proj_bias: bool = False  # bias on the conv patch projection
    use_projection_bias_in_attention: bool = True  # bias on q/k/v projections
    use_ffn_bias_in_attention: bool = True  # bias on the attention output projection
    use_ffn_bias: bool = True  # biases in the FFN
    embedding_dropout_rate: float = 0.0  # dropout after the embeddings
    dropout_rate: float = 0.0  # residual dropout
    attention_dropout_rate: float = 0.0  # attention-probability dropout
    initializer_range: float = 0.02  # std of the normal init (training from scratch only)
    norm_first: bool = True  # pre-LN blocks; post-LN is not implemented
    prepend_cls_token: bool = True  # CLS token at index 0 (CLIP); false for SigLIP
    use_conv_patchified_embedding: bool = True  # conv patchify; required
    use_encoder_pooler_layer: bool = False  # pooler head; not implemented (LLaVA does not use it)

    IGNORED = ("attention_softmax_fp32", "fp16_type", "mixed_precision", "num_classes", "image_layer_norm_epsilon",
               "layer_norm_type", "default_initializer", "pooler_nonlinearity", "projection_initializer",
               "position_embedding_initializer", "cls_token_initializer", "attention_initializer", "ffn_initializer",
               "norm_first_sandwich_initializer")
    # ModelZoo keys accepted only at the value that makes them a no-op for a CLIP ViT (other values: an error)
    NO_OP_VALUES = {"attention_module": ("aiayn_attention",), "extra_attention_params": ({}, None),
                    "use_bias_in_output": (False,), "use_final_layer_norm": (True,),
                    "interpolate_position_embedding": (None, False), "stochastic_depth_drop_prob": (0.0,),
                    "layerscale_value": (None,), "use_masked_patches": (False,), "image_layer_idx": (None,),
                    "attention_type": ("scaled_dot_product",)}
    REQUIRED_VALUES = {"position_embedding_type": "learned", "norm_first": True,
                       "use_conv_patchified_embedding": True, "use_encoder_pooler_layer": False}


@dataclass
class TextModelConfig:
    name: str = "LlamaModel"  # Cerebras model name; a Llama-style decoder is implemented
    vocab_size: int = 32000  # embedding and lm_head rows
    hidden_size: int = 4096  # model width
    num_hidden_layers: int = 32  # decoder layers
    num_heads: int = 32  # query heads
    filter_size: int = 11008  # SwiGLU inner width
    nonlinearity: str = "swiglu"  # FFN activation
    layer_norm_epsilon: float = 1e-5  # RMSNorm eps
    norm_type: str = "rmsnorm"  # only rmsnorm is implemented
    position_embedding_type: str = "rotary"  # only rotary is implemented
    rotary_dim: Optional[int] = None  # rotated channels per head (default: head_dim)
    rope_theta: float = 10000.0  # RoPE base (Llama-2 1e4, Llama-3 5e5, Qwen2.5 / Mistral-v0.3 1e6)
    pos_scaling_factor: float = 1.0  # RoPE scaling factor (linear: positions / factor; llama3: its `factor`)
    pos_scaling_type: str = "linear"  # "linear" or "llama3" (Llama-3.1 frequency scaling)
    pos_scaling_extra_args: Optional[dict] = None  # llama3: low_freq_factor, high_freq_factor,
    #                                                original_max_position_embeddings
    max_position_embeddings: int = 2048  # longest sequence the model is meant for
    share_embedding_weights: bool = False  # tie lm_head to the word embeddings
    attention_module: str = "aiayn_attention"  # "aiayn_attention" (MHA) or "multiquery_attention" (GQA)
    extra_attention_params: dict = field(default_factory=dict)  # {num_kv_groups: N} for multiquery_attention
    use_projection_bias_in_attention: bool = False  # biases on the q/k/v projections (Qwen2/2.5: true)
    use_ffn_bias_in_attention: bool = False  # bias on the attention output projection (Qwen2: false)
    attention_inner_dim: Optional[int] = None  # q width = num_heads x head_dim (default hidden_size; Qwen3 differs)
    attention_qk_norm_layer: Optional[str] = None  # "rmsnorm": per-head RMSNorm on q and k (Qwen3)
    attention_qk_norm_eps: float = 1e-5  # eps of the q/k norms (Qwen3: its rms_norm_eps, 1e-6)
    attention_sliding_window_length: Optional[int] = None  # Mistral-v0.1's window; must be >= the data's MSL
    use_ffn_bias: bool = False  # biases in the FFN
    use_bias_in_output: bool = False  # bias on lm_head
    embd_pdrop: float = 0.0  # embedding dropout (Cerebras' GPT2 default is 0.1: set it explicitly)
    dropout_rate: float = 0.0  # residual dropout
    attention_dropout_rate: float = 0.0  # attention-probability dropout
    initializer_range: float = 0.02  # std of the normal init (training from scratch only)
    norm_first: bool = True  # pre-norm blocks; required

    IGNORED = ("attention_softmax_fp32", "fp16_type", "mixed_precision", "attention_kernel", "layer_norm_type",
               "loss_scaling", "loss_weight", "fold_rope_consts", "initializer", "embedding_initializer",
               "output_layer_initializer", "lr_adjustment_groups")
    ALIASES = {"embedding_dropout_rate": "embd_pdrop"}  # ModelZoo's newer spelling -> the field here
    # ModelZoo keys accepted only at the value that makes them a no-op for a Llama decoder (other values: an error)
    NO_OP_VALUES = {"attention_type": ("scaled_dot_product",), "embedding_layer_norm": (False,),
                    "use_ff_layer1_dropout": (False,), "use_position_embedding": (True,),
                    "embeddings_scale": (1.0,), "output_logits_scale": (None, 1.0), "scale_qk_dot_by_d": (None, False),
                    "scale_qk_dot_by_layer_idx": (False,), "attention_logits_alpha": (None, 1.0),
                    "attention_logit_softcapping": (None,), "final_logit_softcapping": (None,),
                    "sliding_window_every_other_decoder_layer": (False,), "fixed_sparse_attention": (None,),
                    "attention_sink_tokens": (None,), "alibi_trainable_slopes": (False,),
                    "use_untied_rotary": (False,), "rel_distance_mode": ("default",), "pad_rope": (False,),
                    "position_embedding_offset": (0,), "constant_pos_embedding": (None,),
                    "norm_first_sandwich": (False,), "cross_attention_layers": ([], None), "memory_tokens": (None,),
                    "moe": (None, {}), "label_smoothing": (0.0,), "z_loss_eps": (0.0,)}
    REQUIRED_VALUES = {"norm_type": "rmsnorm", "position_embedding_type": "rotary", "norm_first": True}


@dataclass
class ProjectorConfig:
    name: str = "FeedForwardNetwork"  # "FeedForwardNetwork" or "MLP" (the same module in Cerebras)
    input_unit: int = 1024  # image feature width (image_model.hidden_size)
    layers_units: List[int] = field(default_factory=lambda: [4096, 4096])  # output width of each layer
    layers_activation: List[Optional[str]] = field(default_factory=lambda: ["gelu", None])  # per layer
    use_bias: bool = True  # biases on every layer
    dropout_rate: float = 0.0  # dropout between layers

    IGNORED = ("kernel_initializer", "bias_initializer", "output_layer_initializer", "fp16_type",
               "mixed_precision")
    NO_OP_VALUES = {"layers_dropout_rates": (None,)}
    REQUIRED_VALUES = {}


@dataclass
class LlavaModelConfig:
    image_model: ImageModelConfig = field(default_factory=ImageModelConfig)  # vision tower
    text_model: TextModelConfig = field(default_factory=TextModelConfig)  # language model
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)  # `projector: {image_model: ...}`
    freeze: List[str] = field(default_factory=list)  # regexes over module/parameter names to freeze
    image_feature_select_layer_idx: Optional[int] = -1  # ViT layer whose output is used; negative from the end
    image_feature_select_mode: str = "patch"  # "patch" drops CLS, "cls_patch" keeps it
    image_start_idx: int = 1  # first placeholder position (1 phase 1, 35 phase 2 vicuna_v1)
    loss_scaling: str = "num_tokens"  # "num_tokens": mean over loss tokens; "batch_size": sum / batch size
    loss_weight: float = 1.0  # multiplier (batch_size scaling only)
    activation_checkpointing: bool = False  # recompute transformer layers in backward to save memory

    IGNORED = ("name", "mixed_precision", "fp16_type", "boundary_casting", "compute_eval_metrics")
    # ModelZoo keys accepted only at their no-op value. label_smoothing / z_loss_eps: ModelZoo's converter writes
    # them but its LLaVA loss never reads them (plain masked cross-entropy), so 0.0 is the only honest value.
    NO_OP_VALUES = {"label_smoothing": (0.0,), "z_loss_eps": (0.0,), "projector_text_model": (None,),
                    "image_layer_idx": (None,), "lora_params": (None, [], {})}
    REQUIRED_VALUES = {}


def _parse_section(cls, values: Any, where: str, ignored: list):
    """Fill dataclass `cls` from a yaml dict; unknown keys fail with the valid ones and the closest match.

    Per class: IGNORED keys have no effect here at any value; NO_OP_VALUES keys (ModelZoo features this model does
    not have) are accepted at the value that turns them off and are an error at any other; ALIASES map another
    spelling onto a field. Accepted-but-unused keys are appended to `ignored` (reported once by the caller)."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(values).__name__}: {values!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    aliases = getattr(cls, "ALIASES", {})
    no_ops = getattr(cls, "NO_OP_VALUES", {})
    kwargs = {}
    for key, value in values.items():
        if key in aliases:
            target = aliases[key]
            if target in values and values[target] != value:
                raise ConfigError(f"{where}.{key} ({value!r}) and {where}.{target} ({values[target]!r}) are the same "
                                  "setting with different values; keep one of them")
            kwargs[target] = value
        elif key in names:
            kwargs[key] = value
        elif key in no_ops:
            if value not in no_ops[key]:
                allowed = " or ".join(repr(v) for v in no_ops[key])
                raise ConfigError(f"{where}.{key}: {value!r} is not supported by this implementation; set it to "
                                  f"{allowed} or remove it")
            ignored.append(f"{where}.{key}")
        elif key in cls.IGNORED:
            ignored.append(f"{where}.{key}")
        else:
            known = names + list(cls.IGNORED) + list(no_ops) + list(aliases)
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"Unknown key {where}.{key}.{hint} Valid keys: {', '.join(names)}")
    cfg = cls(**kwargs)
    for key, required in cls.REQUIRED_VALUES.items():
        if getattr(cfg, key) != required:
            raise ConfigError(f"{where}.{key}: {getattr(cfg, key)!r} is not supported; set it to {required!r}")
    return cfg


def parse_model_config(model_section: dict) -> LlavaModelConfig:
    """Parse the yaml `model:` section (Cerebras grammar) into a LlavaModelConfig; validate cross-field rules."""
    ignored: list = []
    raw = dict(model_section or {})
    sub = {}
    sub["image_model"] = _parse_section(ImageModelConfig, raw.pop("image_model", None), "model.image_model", ignored)
    sub["text_model"] = _parse_section(TextModelConfig, raw.pop("text_model", None), "model.text_model", ignored)
    projector = raw.pop("projector", None) or {}
    if not isinstance(projector, dict) or set(projector) - {"image_model", "text_model"}:
        raise ConfigError("model.projector must be a mapping with an `image_model` entry "
                          f"(and optionally `text_model: null`); got {projector!r}")
    if projector.get("text_model"):
        raise ConfigError("model.projector.text_model is not supported; remove it (LLaVA projects images only)")
    sub["projector"] = _parse_section(ProjectorConfig, projector.get("image_model"), "model.projector.image_model",
                                      ignored)
    cfg = _parse_section(LlavaModelConfig, raw, "model", ignored)
    cfg = dataclasses.replace(cfg, **sub)
    if ignored:
        log.info("Ignored config keys (accepted for Cerebras compatibility, no effect here): %s", ", ".join(ignored))
    cfg.ignored_keys = ignored
    _validate(cfg)
    return cfg


def _validate(cfg: LlavaModelConfig) -> None:
    im, tm, pj = cfg.image_model, cfg.text_model, cfg.projector
    cfg.loss_scaling = str(cfg.loss_scaling).lower()
    if cfg.loss_scaling not in ("num_tokens", "batch_size"):
        raise ConfigError(f"model.loss_scaling: {cfg.loss_scaling!r}; use 'num_tokens' or 'batch_size'")
    if cfg.loss_scaling == "num_tokens" and cfg.loss_weight != 1.0:
        raise ConfigError(f"model.loss_weight: {cfg.loss_weight} needs loss_scaling 'batch_size' "
                          "(with 'num_tokens' it must be 1.0)")
    if cfg.image_feature_select_mode not in ("patch", "cls_patch"):
        raise ConfigError(f"model.image_feature_select_mode: {cfg.image_feature_select_mode!r}; "
                          "use 'patch' or 'cls_patch'")
    idx = cfg.image_feature_select_layer_idx
    if idx is not None and not -im.num_hidden_layers <= idx < im.num_hidden_layers:
        raise ConfigError(f"model.image_feature_select_layer_idx: {idx} is outside the "
                          f"{im.num_hidden_layers} image_model layers")
    if pj.name not in ("FeedForwardNetwork", "MLP"):
        raise ConfigError(f"model.projector.image_model.name: {pj.name!r}; use 'FeedForwardNetwork'")
    if pj.input_unit != im.hidden_size:
        raise ConfigError(f"model.projector.image_model.input_unit ({pj.input_unit}) must equal "
                          f"model.image_model.hidden_size ({im.hidden_size})")
    if pj.layers_units[-1] != tm.hidden_size:
        raise ConfigError(f"model.projector.image_model.layers_units[-1] ({pj.layers_units[-1]}) must equal "
                          f"model.text_model.hidden_size ({tm.hidden_size})")
    if im.hidden_size % im.num_heads:
        raise ConfigError(f"model.image_model.hidden_size {im.hidden_size} is not divisible by num_heads "
                          f"{im.num_heads}")
    if tm.attention_module not in ("aiayn_attention", "multiquery_attention"):
        raise ConfigError(f"model.text_model.attention_module: {tm.attention_module!r}; "
                          "use 'aiayn_attention' or 'multiquery_attention'")
    _validate_text_family(tm)
    if tm.nonlinearity != "swiglu":
        raise ConfigError(f"model.text_model.nonlinearity: {tm.nonlinearity!r}; only 'swiglu' (Llama) is supported")
    for i, pattern in enumerate(cfg.freeze or []):
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"model.freeze[{i}]: {pattern!r} is not a valid regex ({e})") from None
    image_tokens = (im.image_size[0] // im.patch_size[0]) * (im.image_size[1] // im.patch_size[1])
    image_tokens += cfg.image_feature_select_mode == "cls_patch" and im.prepend_cls_token
    if cfg.image_start_idx < 0 or cfg.image_start_idx + image_tokens > tm.max_position_embeddings:
        raise ConfigError(f"model.image_start_idx {cfg.image_start_idx} + {image_tokens} image tokens does not fit "
                          f"max_position_embeddings {tm.max_position_embeddings}")


LLAMA3_SCALING_KEYS = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _validate_text_family(tm: TextModelConfig) -> None:
    """The Llama-3 / Mistral / Qwen options: RoPE scaling, q/k norm, attention width, sliding window."""
    tm.pos_scaling_type = str(tm.pos_scaling_type).lower()
    if tm.pos_scaling_type not in ("linear", "llama3"):
        raise ConfigError(f"model.text_model.pos_scaling_type: {tm.pos_scaling_type!r} is not implemented; use "
                          "'linear' or 'llama3'")
    if tm.pos_scaling_type == "llama3":
        extra = tm.pos_scaling_extra_args or {}
        missing = [k for k in LLAMA3_SCALING_KEYS if k not in extra]
        if missing or set(extra) - set(LLAMA3_SCALING_KEYS):
            raise ConfigError(f"model.text_model.pos_scaling_extra_args: {extra!r}; pos_scaling_type llama3 needs "
                              f"exactly {list(LLAMA3_SCALING_KEYS)} (Llama-3.1: 1.0, 4.0, 8192)")
        if extra["high_freq_factor"] <= extra["low_freq_factor"]:
            raise ConfigError("model.text_model.pos_scaling_extra_args: high_freq_factor must exceed "
                              "low_freq_factor")
    elif tm.pos_scaling_extra_args:
        raise ConfigError("model.text_model.pos_scaling_extra_args is only read with pos_scaling_type: llama3; "
                          "remove it")
    if tm.attention_qk_norm_layer not in (None, "rmsnorm"):
        raise ConfigError(f"model.text_model.attention_qk_norm_layer: {tm.attention_qk_norm_layer!r}; use "
                          "'rmsnorm' (Qwen3) or leave it out")
    inner = tm.attention_inner_dim or tm.hidden_size
    if inner % tm.num_heads or (inner // tm.num_heads) % 2:
        raise ConfigError(f"model.text_model.attention_inner_dim {inner} must be num_heads ({tm.num_heads}) x an "
                          "even head size")
    window = tm.attention_sliding_window_length
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ConfigError(f"model.text_model.attention_sliding_window_length: {window!r}; a whole number of "
                          "tokens, or leave it out")


def num_kv_heads(tm: TextModelConfig) -> int:
    """Key/value heads: Cerebras spells grouped-query attention as multiquery_attention + num_kv_groups."""
    if tm.attention_module == "multiquery_attention":
        groups = (tm.extra_attention_params or {}).get("num_kv_groups")
        if not groups or tm.num_heads % groups:
            raise ConfigError("model.text_model.extra_attention_params.num_kv_groups must be set and divide "
                              f"num_heads {tm.num_heads} for multiquery_attention; got {groups!r}")
        return groups
    return tm.num_heads


def build_llava(cfg: LlavaModelConfig) -> ml.Llava:
    """Instantiate the nn.Modules (on the current default device, e.g. under `torch.device('meta')`)."""
    im, tm, pj = cfg.image_model, cfg.text_model, cfg.projector
    image_model = ml.ViTModel(
        hidden_size=im.hidden_size, num_hidden_layers=im.num_hidden_layers, num_heads=im.num_heads,
        filter_size=im.filter_size, image_size=im.image_size, patch_size=im.patch_size, num_channels=im.num_channels,
        nonlinearity=im.nonlinearity, layer_norm_epsilon=im.layer_norm_epsilon,
        use_embed_proj_bias=im.use_embed_proj_bias, use_post_embed_layer_norm=im.use_post_embed_layer_norm,
        use_projection_bias_in_attention=im.use_projection_bias_in_attention,
        use_ffn_bias_in_attention=im.use_ffn_bias_in_attention, use_ffn_bias=im.use_ffn_bias,
        embedding_dropout_rate=im.embedding_dropout_rate, dropout_rate=im.dropout_rate,
        attention_dropout_rate=im.attention_dropout_rate, prepend_cls_token=im.prepend_cls_token)
    text_model = ml.LlamaLMModel(
        vocab_size=tm.vocab_size, hidden_size=tm.hidden_size, num_hidden_layers=tm.num_hidden_layers,
        num_heads=tm.num_heads, num_kv_heads=num_kv_heads(tm), filter_size=tm.filter_size,
        nonlinearity=tm.nonlinearity, layer_norm_epsilon=tm.layer_norm_epsilon, rotary_dim=tm.rotary_dim,
        rope_theta=tm.rope_theta, pos_scaling_factor=tm.pos_scaling_factor if tm.pos_scaling_type == "linear" else 1.0,
        share_embedding_weights=tm.share_embedding_weights,
        use_projection_bias_in_attention=tm.use_projection_bias_in_attention, use_ffn_bias=tm.use_ffn_bias,
        use_bias_in_output=tm.use_bias_in_output, embd_pdrop=tm.embd_pdrop, dropout_rate=tm.dropout_rate,
        attention_dropout_rate=tm.attention_dropout_rate, use_ffn_bias_in_attention=tm.use_ffn_bias_in_attention,
        attention_inner_dim=tm.attention_inner_dim,
        qk_norm_eps=tm.attention_qk_norm_eps if tm.attention_qk_norm_layer == "rmsnorm" else None,
        llama3_scaling=({"factor": tm.pos_scaling_factor, **tm.pos_scaling_extra_args}
                        if tm.pos_scaling_type == "llama3" else None))
    projector = ml.FeedForwardNetwork(pj.input_unit, pj.layers_units, pj.layers_activation, pj.use_bias,
                                      pj.dropout_rate)
    llava = ml.Llava(image_model, text_model, projector, cfg.image_feature_select_layer_idx,
                     cfg.image_feature_select_mode, cfg.image_start_idx)
    if not any(p.is_meta for p in llava.parameters()):
        ml.init_weights(image_model, im.initializer_range)
        ml.init_weights(text_model, tm.initializer_range)
        ml.projector_init_(projector)
    for stack in (image_model.encoder.transformer_encoder, text_model.transformer_decoder):
        stack.activation_checkpointing = cfg.activation_checkpointing
    return llava


def freeze_modules(module: nn.Module, patterns: List[str]) -> None:
    """Freeze every leaf module and parameter whose name matches a regex (re.search); unmatched regex = error."""
    for pattern in patterns or []:
        regex = re.compile(pattern)
        leaves = [m for name, m in module.named_modules() if regex.search(name) and not list(m.children())]
        params = [p for name, p in module.named_parameters() if regex.search(name)]
        if not leaves and not params:
            examples = ", ".join(name for name, _ in list(module.named_children()))
            raise ConfigError(f"model.freeze pattern {pattern!r} matches no module or parameter; "
                              f"top-level modules are: {examples}")
        for m in leaves:
            m.eval()
            m.requires_grad_(False)
        for p in params:
            p.requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Optimizer parameter groups, as Cerebras ModelZoo builds them (common/optim_utils.configure_param_groups), so
# optimizer states line up with ModelZoo's in both directions: the trainable parameters split into a weight-decay
# group and a no-decay group (biases: "bias" in the name; norm weights: parameters of a norm module), in that
# order, each in named_parameters() order. Both groups exist even when weight_decay is 0.0 (the LLaVA configs).

NO_DECAY_MODULES = (nn.LayerNorm, ml.RMSNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.SyncBatchNorm)


def param_group_names(module: nn.Module) -> list:
    """[decay names, no-decay names] of the trainable parameters of `module` (ModelZoo's membership and order)."""
    norm_params = {id(p) for m in module.modules() if isinstance(m, NO_DECAY_MODULES)
                   for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if "bias" in name or id(p) in norm_params else decay).append(name)
    return [decay, no_decay]


def optimizer_param_groups(module: nn.Module, weight_decay: float) -> list:
    """torch/cstorch optimizer param groups: [{params, weight_decay}, {params, weight_decay: 0.0}]."""
    params = dict(module.named_parameters())
    decay, no_decay = param_group_names(module)
    return [{"params": [params[n] for n in decay], "weight_decay": weight_decay},
            {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]


FEATURES = ("image_data", "text_input_ids", "loss_mask", "labels", "key_padding_mask")
# Packed rows (train_input.packing) add these, int32: position and segment ids per token, which image slots
# hold an image, and how many samples the row holds (create_hdf5_dataset.pack_row builds them).
PACKED_FEATURES = ("position_ids", "segment_ids", "image_valid", "num_samples")


class LlavaModel(nn.Module):
    """Llava + loss. forward(batch) -> loss; `self.model` is the Llava, so checkpoints carry `model.` keys."""

    def __init__(self, model_section: dict | LlavaModelConfig, sparse_logits: bool = True):
        super().__init__()
        self.config = model_section if isinstance(model_section, LlavaModelConfig) else parse_model_config(
            model_section)
        self.model = build_llava(self.config)
        freeze_modules(self.model, self.config.freeze)
        # lm_head only at loss positions (a dynamic shape): big saving in phase 1, where ~30 of 2048 positions
        # carry loss. Set False for fixed-shape backends (CSX): full [B, S, V] logits, no data-dependent branches.
        self.sparse_logits = sparse_logits

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen modules stay in eval mode (matters only if they had dropout).
        for m in self.model.modules():
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()
        return self

    def parameter_counts(self) -> dict:
        trainable, frozen = ml.count_parameters(self)
        return {"trainable": trainable, "frozen": frozen, "total": trainable + frozen}

    def check_batch(self, batch: dict) -> None:
        missing = [k for k in FEATURES if k not in batch]
        if missing:
            raise KeyError(f"batch is missing features {missing}; expected {list(FEATURES)}")
        for k in FEATURES[1:] + (PACKED_FEATURES if "segment_ids" in batch else ()):
            if batch[k].dtype != torch.int32:
                raise TypeError(f"batch[{k!r}] must be int32 (the H5 feature dtype), got {batch[k].dtype}")

    def packed_args(self, batch: dict) -> Optional[dict]:
        """The packing features for Llava.forward, or None for ordinary rows."""
        if "segment_ids" not in batch:
            return None
        return {"position_ids": batch["position_ids"], "segment_ids": batch["segment_ids"],
                "image_valid": batch["image_valid"], "dynamic": self.sparse_logits}

    @staticmethod
    def num_samples(batch: dict) -> int | torch.Tensor:
        """Samples in the batch: rows, or the samples packed into them."""
        return batch["num_samples"].sum() if "num_samples" in batch else batch["loss_mask"].shape[0]

    def logits(self, batch: dict) -> torch.Tensor:
        """Full logits [B, S, V] (evaluation, parity tests)."""
        return self.model(batch["image_data"], batch["text_input_ids"], batch.get("key_padding_mask"),
                          batch.get("image_start_idx"), packed=self.packed_args(batch))

    def forward(self, batch: dict, output_logits: bool = False, loss_normalizer: Optional[float] = None):
        """Loss as Cerebras' GPTLMHeadModelLoss: CE at loss_mask positions, scaled by tokens or batch size.

        loss_normalizer replaces this batch's own denominator (token count, or batch size / loss_weight): the
        training loop passes the global batch's, so micro-batches and ranks add up to one big batch exactly.
        With output_logits, returns (loss, logits[B, S, V])."""
        self.check_batch(batch)
        loss_mask = batch["loss_mask"]
        labels = batch["labels"].long()
        key_padding_mask = batch["key_padding_mask"]
        packed = self.packed_args(batch)
        if packed is not None:
            key_padding_mask = None  # the segment ids carry it
        elif self.sparse_logits and bool((key_padding_mask[:, 1:] >= key_padding_mask[:, :-1]).all()):
            # Only right padding (every phase-1 row, most phase-2 rows): a real position never sees a later key,
            # so the causal mask alone gives the same outputs at real positions, and SDPA takes its fused path.
            key_padding_mask = None
        args = (batch["image_data"], batch["text_input_ids"], key_padding_mask, batch.get("image_start_idx"))
        if self.sparse_logits and not output_logits:
            positions = loss_mask.reshape(-1).nonzero().squeeze(-1)
            logits = self.model(*args, output_positions=positions, packed=packed)
            token_loss = F.cross_entropy(logits.float(), labels.reshape(-1).index_select(0, positions),
                                         reduction="sum")
        else:
            logits = self.model(*args, packed=packed)
            per_token = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                        reduction="none")
            token_loss = (per_token * loss_mask.reshape(-1).to(per_token.dtype)).sum()
        if loss_normalizer is not None:
            loss = token_loss / loss_normalizer
        elif self.config.loss_scaling == "num_tokens":
            loss = token_loss / loss_mask.sum().clamp(min=1).to(token_loss.dtype)
        else:
            loss = token_loss / self.num_samples(batch) * self.config.loss_weight
        loss = loss.to(logits.dtype)
        return (loss, logits) if output_logits else loss


def load_model_section(path: str) -> dict:
    import yaml

    with open(path) as f:
        params = yaml.safe_load(f)
    if not isinstance(params, dict) or "model" not in params:
        raise ConfigError(f"{path}: no top-level `model:` section")
    return params["model"]


def random_batch(cfg: LlavaModelConfig, batch_size: int, seq_len: int, generator=None) -> dict:
    """A synthetic batch in the H5 feature format (smoke runs, benchmarks)."""
    im, tm = cfg.image_model, cfg.text_model
    g = generator or torch.Generator().manual_seed(0)
    ids = torch.randint(3, tm.vocab_size, (batch_size, seq_len), generator=g, dtype=torch.int32)
    loss_mask = torch.zeros(batch_size, seq_len, dtype=torch.int32)
    loss_mask[:, -max(1, seq_len // 8):] = 1
    return {
        "image_data": torch.randn(batch_size, im.num_channels, *im.image_size, generator=g),
        "text_input_ids": ids,
        "loss_mask": loss_mask,
        "labels": torch.roll(ids, -1, dims=1),
        "key_padding_mask": torch.zeros(batch_size, seq_len, dtype=torch.int32),
    }


def main(argv: list) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if len(argv) != 1:
        sys.exit(__doc__)
    model = LlavaModel(load_model_section(argv[0]))
    counts = model.parameter_counts()
    print(f"parameters: total {counts['total']:,}  trainable {counts['trainable']:,}  frozen {counts['frozen']:,}")
    seq = model.config.image_start_idx + model.model.num_image_tokens + 32
    loss = model(random_batch(model.config, 2, seq))
    loss.backward()
    print(f"smoke forward/backward on a random batch: loss {loss.item():.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
