"""Convert LLaVA checkpoints and configs between formats: hf (LLaVA repo layout), llava-hf, cs-2.2.

Formats
  hf        the LLaVA source-repo layout: DIR/image_model/ (HF CLIP vision tower) + DIR/text_model/ (LLaVA or
            Vicuna Llama weights with LLaVA's config.json; a plain Vicuna gets a fresh projector).
  cs-2.2    our (= run.py's = Cerebras ModelZoo's) state-dict names: a torch.save `.mdl` holding {"model": ...}
            plus the yaml `model:` section. cs-2.3 ... cs-2.9 and cs-current are accepted as the same format.
  llava-hf  a folder that transformers' LlavaForConditionalGeneration and AutoProcessor load offline.

Commands (Steps 5 and 8 of the documented pipeline, written exactly as Cerebras documents them):
  python convert_checkpoint.py list
  python convert_checkpoint.py convert --model llava --src-fmt hf --tgt-fmt cs-2.2 \
      --config llava_hf_dir --output-dir cs_out llava_hf_dir
  python convert_checkpoint.py convert --model llava --src-fmt cs-2.2 --tgt-fmt hf \
      --config cs_out/config_to_cs-2.2.yaml --output-dir hf_out [--hf-shard-size 10GB] [--export-safetensors] \
      [--tokenizer-dir vicuna_dir] [--vision-tower PATH_OR_HUB_ID] model_dir/checkpoint_5197.mdl
  python convert_checkpoint.py convert --model llava --src-fmt llava-hf --tgt-fmt cs-2.2 \
      --config llava-1.5-7b-hf --output-dir cs_out llava-1.5-7b-hf
  python convert_checkpoint.py convert --model llava --src-fmt cs-2.2 --tgt-fmt llava-hf \
      --config params.yaml --tokenizer-dir vicuna_dir --output-dir llava_hf_out [--chat-template auto] checkpoint.mdl
  python convert_checkpoint.py convert-config --model llava --src-fmt hf --tgt-fmt cs-2.2 --output-dir out DIR
  python convert_checkpoint.py diff left.mdl right.mdl [--tensor_comparison_op allclose]

Guarantees: every source key is mapped or listed in a DROPPED table; unknown keys, missing keys and shape
mismatches raise with the key names; dtype is kept unless --dtype says otherwise; sharded inputs are read one
shard at a time; pickles are read with torch.load(weights_only=True) (code in a pickle is refused); a truncated
or damaged weight file fails with its name; the output appears only when the whole conversion succeeded (it is
written into a hidden folder inside --output-dir and moved into place at the end).

llava-hf output: CLIP or SigLIP towers with Llama(-3), Mistral, Qwen2 or Qwen3 text models. The tokenizer gets
<image> (and <pad> only when it has no pad token); text_config and generation_config.json take its bos/eos/pad ids.
--chat-template picks the processor's template: auto (default) = the tokenizer's own chat_template, else vicuna_v1
(LLaVA-1.5's format); tokenizer = its own (an error when it has none); llama3 / qwen2 / mistral = the templates
create_hdf5_dataset.py builds phase-2 data with. Pick the one the phase-2 data used; a Jinja template gets a prelude
so [{"type": "image"}, {"type": "text", ...}] contents render as "<image>\\nQ", the training layout.

hf / llava-hf image processor: it reproduces the config's eval_input (else train_input) transforms, from --config or
else the checkpoint's own params (TRANSFORM_STAGES); transforms it cannot express are an error naming them, and
--ignore-transforms writes the tower's default CLIP/SigLIP processor instead (pixels then differ from training's).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

# torch, yaml, transformers and model.py are imported inside the functions that need them, so --help is instant.


class ConversionError(Exception):
    """A user-facing problem: names the file/key, the value found and what to change."""


# ==============================================================================================
# 1. Key tables. `{}` stands for a layer index. HF patterns on the left, CS patterns on the right.
# ==============================================================================================

# HF CLIPVisionModel (after "vision_model.") -> CS ViTModel (after "image_model."), spec 6.3.
CLIP_KEYS = {
    "embeddings.class_embedding": "embedding_layer.cls_embedding",
    "embeddings.patch_embedding.weight": "embedding_layer.linear_proj.weight",
    "embeddings.position_embedding.weight": "embedding_layer.position_embeddings.weight",
    "pre_layrnorm.weight": "embedding_layer.post_embed_ln.weight",
    "pre_layrnorm.bias": "embedding_layer.post_embed_ln.bias",
    "post_layernorm.weight": "encoder.transformer_encoder.norm.weight",
    "post_layernorm.bias": "encoder.transformer_encoder.norm.bias",
}
CLIP_LAYER = ("encoder.layers.{}.", "encoder.transformer_encoder.layers.{}.")  # per-layer prefixes of the table:
CLIP_LAYER_KEYS = {
    "self_attn.q_proj.weight": "self_attn.proj_q_dense_layer.weight",
    "self_attn.q_proj.bias": "self_attn.proj_q_dense_layer.bias",
    "self_attn.k_proj.weight": "self_attn.proj_k_dense_layer.weight",
    "self_attn.k_proj.bias": "self_attn.proj_k_dense_layer.bias",
    "self_attn.v_proj.weight": "self_attn.proj_v_dense_layer.weight",
    "self_attn.v_proj.bias": "self_attn.proj_v_dense_layer.bias",
    "self_attn.out_proj.weight": "self_attn.proj_output_dense_layer.weight",
    "self_attn.out_proj.bias": "self_attn.proj_output_dense_layer.bias",
    "layer_norm1.weight": "norm1.weight",
    "layer_norm1.bias": "norm1.bias",
    "layer_norm2.weight": "norm2.weight",
    "layer_norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "ffn.ffn.0.linear_layer.weight",
    "mlp.fc1.bias": "ffn.ffn.0.linear_layer.bias",
    "mlp.fc2.weight": "ffn.ffn.1.linear_layer.weight",
    "mlp.fc2.bias": "ffn.ffn.1.linear_layer.bias",
}
CLIP_HF_PREFIX, CLIP_CS_PREFIX = "vision_model.", "image_model."

# HF SiglipVisionModel -> CS image model: no CLS (so no position-row move), a bias on the patch conv, no
# pre-layernorm; the encoder layers are named as CLIP's (CLIP_LAYER_KEYS). Its pooling head is dropped.
SIGLIP_KEYS = {
    "embeddings.patch_embedding.weight": "embedding_layer.linear_proj.weight",
    "embeddings.patch_embedding.bias": "embedding_layer.linear_proj.bias",
    "embeddings.position_embedding.weight": "embedding_layer.position_embeddings.weight",
    "post_layernorm.weight": "encoder.transformer_encoder.norm.weight",
    "post_layernorm.bias": "encoder.transformer_encoder.norm.bias",
}

# HF LlamaForCausalLM / LLaVA-Llama -> CS text model, spec 6.4. A tuple maps one HF key to several CS keys:
# Cerebras registers the final norm twice, so both names are written and must agree on the way back.
LLAMA_KEYS = {
    "model.embed_tokens.weight": "text_model.embedding_layer.word_embeddings.weight",
    "model.norm.weight": ("text_model.transformer_decoder.norm.weight", "text_model.ln_f.weight"),
    "lm_head.weight": "text_model.lm_head.weight",
}
LLAMA_LAYER = ("model.layers.{}.", "text_model.transformer_decoder.layers.{}.")  # per-layer prefixes of the table:
LLAMA_LAYER_KEYS = {
    "self_attn.q_proj.weight": "self_attn.proj_q_dense_layer.weight",  # rows permuted (rope_q)
    "self_attn.k_proj.weight": "self_attn.proj_k_dense_layer.weight",  # rows permuted (rope_k)
    "self_attn.v_proj.weight": "self_attn.proj_v_dense_layer.weight",
    "self_attn.o_proj.weight": "self_attn.proj_output_dense_layer.weight",
    "self_attn.q_proj.bias": "self_attn.proj_q_dense_layer.bias",  # Qwen2; permuted (rope_q)
    "self_attn.k_proj.bias": "self_attn.proj_k_dense_layer.bias",  # Qwen2; permuted (rope_k)
    "self_attn.v_proj.bias": "self_attn.proj_v_dense_layer.bias",  # Qwen2
    "self_attn.o_proj.bias": "self_attn.proj_output_dense_layer.bias",  # Llama attention_bias: true
    "self_attn.q_norm.weight": "self_attn.q_norm.weight",  # Qwen3; channels permuted within the head (rope_head)
    "self_attn.k_norm.weight": "self_attn.k_norm.weight",  # Qwen3; (rope_head)
    "input_layernorm.weight": "norm1.weight",
    "post_attention_layernorm.weight": "norm3.weight",
    "mlp.up_proj.weight": "ffn.ffn.0.linear_layer.weight",
    "mlp.gate_proj.weight": "ffn.ffn.0.linear_layer_for_glu.weight",
    "mlp.down_proj.weight": "ffn.ffn.1.linear_layer.weight",
}
# Keys that may be absent on either side (a tied lm_head is not stored by HF's save_pretrained), and the
# per-layer keys that only some model families have (attention biases, Qwen3's q/k norms): the target model's
# own key set decides whether they must be there.
OPTIONAL_KEYS = {"lm_head.weight"}
FAMILY_LAYER_KEYS = {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
                     "self_attn.o_proj.bias", "self_attn.q_norm.weight", "self_attn.k_norm.weight"}

# LLaVA's mm_projector is nn.Sequential(Linear, GELU, Linear, ...): HF index = 2 * CS index.
PROJECTOR_KEYS = {
    "model.mm_projector.{}.weight": "projector_image_model.ffn.{}.linear_layer.weight",
    "model.mm_projector.{}.bias": "projector_image_model.ffn.{}.linear_layer.bias",
}
PROJECTOR_INDEX_STEP = 2

# Source keys deliberately not converted (regexes over the full HF key), with the reason.
DROPPED_HF_KEYS = {
    r"vision_model\.embeddings\.position_ids": "HF buffer (positions 0..N-1), rebuilt by the model",
    r"text_model\..*": "CLIP text tower of a full CLIPModel (LLaVA uses the vision tower only)",
    r"logit_scale": "CLIP contrastive temperature (unused by LLaVA)",
    r"visual_projection\..*": "CLIP contrastive projection (unused by LLaVA)",
    r"text_projection\..*": "CLIP contrastive projection (unused by LLaVA)",
    r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq": "RoPE buffer of transformers<4.32, recomputed",
    r"model\.vision_tower\..*": "vision tower copy saved by LLaVA training; LLaVA reloads it from mm_vision_tower",
    r"vision_model\.head\..*": "SigLIP's attention-pooling head (LLaVA reads the patch features, not the pooled one)",
}

# llava-hf names -> hf (LLaVA repo) names: on disk (every transformers version) and in memory (>= 4.52).
LLAVA_HF_DISK_PREFIXES = {
    "vision_tower.vision_model.": "vision_model.",
    "multi_modal_projector.linear_1.": "model.mm_projector.0.",
    "multi_modal_projector.linear_2.": "model.mm_projector.2.",
    "language_model.model.": "model.",
    "language_model.lm_head.": "lm_head.",
}
LLAVA_HF_MEMORY_PREFIXES = {
    "model.vision_tower.vision_model.": "vision_model.",
    "model.multi_modal_projector.linear_1.": "model.mm_projector.0.",
    "model.multi_modal_projector.linear_2.": "model.mm_projector.2.",
    "model.language_model.": "model.",
    "lm_head.": "lm_head.",
}
LLAVA_HF_PREFIXES = {**LLAVA_HF_DISK_PREFIXES, **LLAVA_HF_MEMORY_PREFIXES}  # no prefix is shared by the two


# ==============================================================================================
# 2. Per-tensor transforms
# ==============================================================================================


def cls_row_last(w):
    """HF CLIP stores the CLS position row first, Cerebras last: rotate rows up by one."""
    import torch

    return torch.cat((w[1:], w[:1]))


def cls_row_first(w):
    import torch

    return torch.cat((w[-1:], w[:-1]))


def _rope_rows(w, heads: int, key: str, to_interleaved: bool):
    """Permute q/k projection rows between HF rotate_half and Cerebras' interleaved RoPE (spec 6.4).

    Per head, HF pairs channel j with j + d/2; Cerebras pairs 2j with 2j+1. HF->CS: new row 2j = old row j,
    new row 2j+1 = old row j + d/2. The same permutation on q and k leaves every q.k product unchanged."""
    rows = w.shape[0]
    if heads <= 0 or rows % heads or (rows // heads) % 2:
        raise ConversionError(f"{key}: {rows} rows cannot be split into {heads} heads of even size; "
                              "check num_attention_heads / num_key_value_heads in the config")
    d = rows // heads
    rest = tuple(w.shape[1:])
    split = (heads, 2, d // 2) if to_interleaved else (heads, d // 2, 2)
    return w.reshape(*split, *rest).transpose(1, 2).reshape(rows, *rest)


@dataclass(frozen=True)
class Heads:
    """What the q/k permutation needs: query heads and key/value heads of the text model."""

    num_heads: int
    num_kv_heads: int


# transform name -> (HF->CS function, CS->HF function); functions take (tensor, heads, key).
TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "cls_row": (lambda w, h, k: cls_row_last(w), lambda w, h, k: cls_row_first(w)),
    "rope_q": (lambda w, h, k: _rope_rows(w, h.num_heads, k, True),
               lambda w, h, k: _rope_rows(w, h.num_heads, k, False)),
    "rope_k": (lambda w, h, k: _rope_rows(w, h.num_kv_heads, k, True),
               lambda w, h, k: _rope_rows(w, h.num_kv_heads, k, False)),
    "rope_head": (lambda w, h, k: _rope_rows(w, 1, k, True), lambda w, h, k: _rope_rows(w, 1, k, False)),
}
KEY_TRANSFORMS = {  # full HF key pattern -> transform name
    "vision_model.embeddings.position_embedding.weight": "cls_row",
    "model.layers.{}.self_attn.q_proj.weight": "rope_q",
    "model.layers.{}.self_attn.k_proj.weight": "rope_k",
    "model.layers.{}.self_attn.q_proj.bias": "rope_q",
    "model.layers.{}.self_attn.k_proj.bias": "rope_k",
    "model.layers.{}.self_attn.q_norm.weight": "rope_head",
    "model.layers.{}.self_attn.k_norm.weight": "rope_head",
}


# ==============================================================================================
# 3. The key mapper: compiles the tables, converts one key at a time, checks completeness at the end
# ==============================================================================================


@dataclass(frozen=True)
class Rule:
    group: str  # "clip", "llama" or "projector": completeness is checked per group
    hf: str  # full HF key pattern
    cs: tuple  # full CS key pattern(s)
    transform: Optional[str]
    index_step: int = 1  # HF layer index = CS layer index * index_step


def _rules() -> list[Rule]:
    """All tables as full-key rules."""
    rules = []
    clip = dict(CLIP_KEYS, **{CLIP_LAYER[0] + hf: CLIP_LAYER[1] + cs for hf, cs in CLIP_LAYER_KEYS.items()})
    for hf, cs in clip.items():
        hf_key = CLIP_HF_PREFIX + hf
        rules.append(Rule("clip", hf_key, (CLIP_CS_PREFIX + cs,), KEY_TRANSFORMS.get(hf_key)))
    siglip = dict(SIGLIP_KEYS, **{CLIP_LAYER[0] + hf: CLIP_LAYER[1] + cs for hf, cs in CLIP_LAYER_KEYS.items()})
    for hf, cs in siglip.items():  # the same HF names as CLIP's: a mapper holds one of the two groups
        rules.append(Rule("siglip", CLIP_HF_PREFIX + hf, (CLIP_CS_PREFIX + cs,), None))
    llama = dict(LLAMA_KEYS, **{LLAMA_LAYER[0] + hf: LLAMA_LAYER[1] + cs for hf, cs in LLAMA_LAYER_KEYS.items()})
    for hf, cs in llama.items():
        rules.append(Rule("llama", hf, cs if isinstance(cs, tuple) else (cs,), KEY_TRANSFORMS.get(hf)))
    for hf, cs in PROJECTOR_KEYS.items():
        rules.append(Rule("projector", hf, (cs,), None, PROJECTOR_INDEX_STEP))
    return rules


RULES = _rules()


def _pattern_regex(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{\}", r"(\d+)") + "$")


_HF_INDEX = [(_pattern_regex(r.hf), r) for r in RULES]
_CS_INDEX = [(_pattern_regex(cs), r) for r in RULES for cs in r.cs]
_DROPPED = [(re.compile("^" + p + "$"), why) for p, why in DROPPED_HF_KEYS.items()]


def dropped_reason(hf_key: str) -> Optional[str]:
    for regex, why in _DROPPED:
        if regex.match(hf_key):
            return why
    return None


def _fill(pattern: str, index: Optional[int]) -> str:
    return pattern if index is None else pattern.replace("{}", str(index))


class KeyMapper:
    """Converts a state dict key by key (so sharded checkpoints stream), in one direction.

    `convert(key, tensor)` returns [(new_key, new_tensor), ...] ([] for a dropped key) and raises on an unknown
    key; `finish()` raises on missing keys. Two source keys that map to the same target (the doubly registered
    final norm) must hold equal tensors; the target is emitted once."""

    def __init__(self, to_cs: bool, heads: Optional[Heads] = None, groups: tuple = ("clip", "llama", "projector"),
                 rename: Optional[Mapping[str, str]] = None, strict: bool = True):
        self.to_cs = to_cs
        self.heads = heads
        self.groups = groups
        # source-prefix table applied first (llava-hf names -> hf names), longest prefix first
        self.rename = None if rename is None else sorted(rename.items(), key=lambda kv: -len(kv[0]))
        self.strict = strict
        self.seen: dict[str, dict[tuple, set]] = {g: {} for g in groups}  # group -> rule -> indices
        # target key -> None, or the tensor where two source keys legitimately share a target (CS's doubly
        # registered final norm); other tensors are not kept, so they are freed once written
        self.emitted: dict[str, object] = {}
        self.unknown: list[str] = []
        self.dropped: list[str] = []

    def _lookup(self, key: str):
        table = _HF_INDEX if self.to_cs else _CS_INDEX
        for regex, rule in table:
            m = regex.match(key)
            if m and rule.group in self.groups:
                return rule, (int(m.group(1)) if m.groups() else None)
        return None, None

    def _renamed(self, key: str) -> Optional[str]:
        if self.rename is None:
            return key
        for old, new in self.rename:
            if key.startswith(old):
                return new + key[len(old):]
        return None

    def convert(self, key: str, tensor) -> list:
        src = self._renamed(key)
        rule, index = self._lookup(src) if src is not None else (None, None)
        if rule is None:
            if self.to_cs and src is not None and dropped_reason(src):
                self.dropped.append(key)
                return []
            self.unknown.append(key)
            return []
        if self.to_cs and rule.index_step > 1 and index is not None:
            if index % rule.index_step:
                self.unknown.append(key)
                return []
            index //= rule.index_step
        self.seen[rule.group].setdefault((rule.hf, rule.cs), set()).add(index)
        if rule.transform:
            fn = TRANSFORMS[rule.transform][0 if self.to_cs else 1]
            if rule.transform.startswith("rope") and self.heads is None:
                raise ConversionError(f"{key}: the q/k permutation needs num_heads (and num_kv_heads)")
            tensor = fn(tensor, self.heads, key)
        if self.to_cs:
            targets = [_fill(cs, index) for cs in rule.cs]
        else:
            targets = [_fill(rule.hf, None if index is None else index * rule.index_step)]
        out = []
        for target in targets:
            if target in self.emitted:
                kept = self.emitted[target]
                if kept is None:
                    raise ConversionError(f"{key}: another source key already mapped to {target}; the checkpoint "
                                          "holds the same weight twice under two names")
                if not _same(kept, tensor):
                    raise ConversionError(f"{key} and another source key both map to {target} but hold different "
                                          "values (for the final norm: text_model.ln_f and "
                                          "text_model.transformer_decoder.norm must be the same tensor)")
                continue
            self.emitted[target] = tensor if (not self.to_cs and len(rule.cs) > 1) else None
            out.append((target, tensor))
        return out

    def check_unknown(self, where: str = "state dict") -> None:
        """Raise on unknown keys (or report them when not strict); call after each shard."""
        if not self.unknown:
            return
        names = ", ".join(self.unknown[:20]) + (f" ... ({len(self.unknown)} in all)" if len(self.unknown) > 20 else "")
        if self.strict:
            raise ConversionError(f"{where}: {len(self.unknown)} key(s) map to nothing: {names}. They are neither "
                                  "in the mapping tables nor in DROPPED_HF_KEYS; check --src-fmt, or pass "
                                  "--drop-unmatched-keys to drop them")
        print(f"Dropping {len(self.unknown)} unmatched key(s) from {where}: {names}", file=sys.stderr)
        self.unknown.clear()

    def finish(self, required: tuple = ()) -> None:
        """Raise on missing keys: every group in `required` must be present, and every present group complete."""
        self.check_unknown()
        missing = []
        for group in self.groups:
            seen = self.seen[group]
            if not seen:
                if group in required:
                    missing.append(f"all {group} keys")
                continue
            indices = set().union(*(s for s in seen.values() if s != {None}))
            for rule in (r for r in RULES if r.group == group):
                pattern = rule.cs[0] if self.to_cs else rule.hf
                src_pattern = rule.hf if self.to_cs else rule.cs[0]
                if rule.hf in OPTIONAL_KEYS:
                    continue
                got = seen.get((rule.hf, rule.cs), set())
                if not got and rule.hf.split("{}.")[-1] in FAMILY_LAYER_KEYS:
                    continue  # a key this model family does not have; present in one layer = in every layer
                want = indices if "{}" in pattern else {None}
                step = rule.index_step if self.to_cs else 1
                for i in sorted(want - got):
                    missing.append(_fill(src_pattern, None if i is None else i * step))
            if indices and sorted(indices) != list(range(len(indices))):
                missing.append(f"{group} layers {sorted(set(range(max(indices) + 1)) - indices)}")
        if missing:
            raise ConversionError(f"{len(missing)} source key(s) missing: {', '.join(missing[:20])}"
                                  + (" ..." if len(missing) > 20 else ""))


def _same(a, b) -> bool:
    import torch

    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def _convert_all(state: Mapping, mapper: KeyMapper, required: tuple) -> dict:
    out = {}
    for key, tensor in state.items():
        for new_key, new_tensor in mapper.convert(key, tensor):
            out[new_key] = new_tensor
    mapper.finish(required)
    return out


def _heads(num_heads: Optional[int], num_kv_heads: Optional[int]) -> Heads:
    return Heads(num_heads, num_kv_heads or num_heads)


# ---- public pure functions (no I/O). The model parity tests import these.


def hf_clip_to_cs(hf_state: Mapping) -> dict:
    """CLIPVisionModel (or full CLIPModel) state dict "vision_model.*" -> "image_model.*" (CLS row moved last)."""
    return _convert_all(hf_state, KeyMapper(True, groups=("clip",)), ("clip",))


def cs_clip_to_hf(cs_state: Mapping) -> dict:
    """Inverse of hf_clip_to_cs: "image_model.*" -> "vision_model.*"."""
    return _convert_all(cs_state, KeyMapper(False, groups=("clip",)), ("clip",))


def hf_siglip_to_cs(hf_state: Mapping) -> dict:
    """SiglipVisionModel state dict "vision_model.*" -> "image_model.*" (the pooling head dropped)."""
    return _convert_all(hf_state, KeyMapper(True, groups=("siglip",)), ("siglip",))


def cs_siglip_to_hf(cs_state: Mapping) -> dict:
    """Inverse of hf_siglip_to_cs."""
    return _convert_all(cs_state, KeyMapper(False, groups=("siglip",)), ("siglip",))


def hf_llama_to_cs(hf_state: Mapping, num_heads: int, num_kv_heads: Optional[int] = None) -> dict:
    """LlamaForCausalLM / LLaVA-repo text state dict ("model.*", "lm_head.weight", "model.mm_projector.{0,2}.*")
    -> "text_model.*" (q/k rows interleaved) + "projector_image_model.*" (when present)."""
    mapper = KeyMapper(True, _heads(num_heads, num_kv_heads), groups=("llama", "projector"))
    return _convert_all(hf_state, mapper, ("llama",))


def cs_llama_to_hf(cs_state: Mapping, num_heads: int, num_kv_heads: Optional[int] = None) -> dict:
    """Inverse of hf_llama_to_cs."""
    mapper = KeyMapper(False, _heads(num_heads, num_kv_heads), groups=("llama", "projector"))
    return _convert_all(cs_state, mapper, ("llama",))


def llava_hf_to_cs(hf_state: Mapping, num_heads: int, num_kv_heads: Optional[int] = None,
                   vision: str = "clip") -> dict:
    """llava-hf state dict (on-disk "vision_tower.vision_model.*", "multi_modal_projector.linear_{1,2}.*",
    "language_model.model.*", "language_model.lm_head.weight", or the >=4.52 in-memory "model.*" names) -> CS.
    vision: "clip" or "siglip", the vision tower's family."""
    groups = (vision, "llama", "projector")
    mapper = KeyMapper(True, _heads(num_heads, num_kv_heads), groups=groups, rename=LLAVA_HF_PREFIXES)
    return _convert_all(hf_state, mapper, groups)


def hf_to_llava_hf_key(hf_key: str) -> str:
    """hf (LLaVA repo) name -> on-disk llava-hf name."""
    for disk, hf in sorted(LLAVA_HF_DISK_PREFIXES.items(), key=lambda kv: -len(kv[1])):
        if hf_key.startswith(hf):
            return disk + hf_key[len(hf):]
    raise ConversionError(f"{hf_key} has no llava-hf name (only a 2-layer projector, mlp2x_gelu, exists there)")


def cs_llava_to_hf(cs_state: Mapping, num_heads: int, num_kv_heads: Optional[int] = None) -> dict:
    """CS state dict -> on-disk llava-hf layout (loadable by LlavaForConditionalGeneration.from_pretrained)."""
    mapper = KeyMapper(False, _heads(num_heads, num_kv_heads))
    hf = _convert_all(cs_state, mapper, ("clip", "llama", "projector"))
    return {hf_to_llava_hf_key(k): v for k, v in hf.items()}


def cs_to_hf_components(cs_state: Mapping, num_heads: int, num_kv_heads: Optional[int] = None) -> tuple:
    """CS state dict -> (image_model state "vision_model.*", text_model state "model.*" incl. mm_projector)."""
    mapper = KeyMapper(False, _heads(num_heads, num_kv_heads))
    hf = _convert_all(cs_state, mapper, ("clip", "llama", "projector"))
    image = {k: v for k, v in hf.items() if k.startswith(CLIP_HF_PREFIX)}
    return image, {k: v for k, v in hf.items() if not k.startswith(CLIP_HF_PREFIX)}


def strip_model_prefix(state: Mapping) -> dict:
    """run.py checkpoints carry `model.` (LlavaModel wraps Llava as .model); converted ones do not."""
    keys = list(state)
    if keys and all(k.startswith("model.") for k in keys):
        return {k[len("model."):]: v for k, v in state.items()}
    return dict(state)


# ==============================================================================================
# 4. Config mapping (spec 6.5). HF side: plain dicts as in config.json; CS side: the yaml `model:` section.
# ==============================================================================================

# What transformers assumes for keys a config.json leaves out (CLIPVisionConfig / LlamaConfig defaults; the
# llava-hf and CLIPModel configs rely on them). A test checks these against transformers itself.
HF_CLIP_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
                    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0,
                    "initializer_range": 0.02}
HF_SIGLIP_DEFAULTS = {"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "patch_size": 16}
HF_LLAMA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu",
                     "max_position_embeddings": 2048, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
                     "tie_word_embeddings": False, "rope_theta": 10000.0, "rope_scaling": None,
                     "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0}
# LLaVA-repo fields assumed when absent (spec 6.5).
LLAVA_DEFAULTS = {"mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
                  "mm_projector_type": "mlp2x_gelu", "tune_mm_mlp_adapter": False,
                  "mm_use_im_start_end": False, "mm_use_im_patch_token": False}
# transformers' LlavaConfig defaults (llava-hf).
LLAVA_HF_DEFAULTS = {"vision_feature_layer": -2, "vision_feature_select_strategy": "default",
                     "image_token_index": 32000, "projector_hidden_act": "gelu", "multimodal_projector_bias": True}
# The vision_config LlavaConfig builds when none is given: CLIP ViT-L/14-336.
LLAVA_HF_VISION_DEFAULTS = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                            "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "projection_dim": 768}

# Fixed values of a CLIP ViT / Llama in Cerebras' grammar (spec 6.5 "Fixed CS values").
CS_VIT_FIXED = {"position_embedding_type": "learned", "embedding_dropout_rate": 0.0, "use_post_embed_layer_norm": True,
                "use_embed_proj_bias": False, "attention_type": "scaled_dot_product", "attention_softmax_fp32": True,
                "dropout_rate": 0.0, "use_projection_bias_in_attention": True, "use_ffn_bias_in_attention": True,
                "use_ffn_bias": True, "norm_first": True, "use_conv_patchified_embedding": True,
                "use_encoder_pooler_layer": False, "prepend_cls_token": True}
CS_SIGLIP_FIXED = {"use_post_embed_layer_norm": False, "use_embed_proj_bias": True, "prepend_cls_token": False}
CS_LLAMA_FIXED = {"position_embedding_type": "rotary", "embd_pdrop": 0.0, "dropout_rate": 0.0, "norm_type": "rmsnorm",
                  "attention_type": "scaled_dot_product", "use_projection_bias_in_attention": False,
                  "use_ffn_bias_in_attention": False, "nonlinearity": "swiglu", "use_ffn_bias": False,
                  "use_bias_in_output": False}
# Model-level values the converted yaml carries (spec 6.5 "CS model-level defaults"); loss_weight etc. are not
# in an HF checkpoint. image_start_idx 1 fits phase 1 data; phase 2 (vicuna_v1) data needs 35.
CS_MODEL_DEFAULTS = {"loss_scaling": "num_tokens", "loss_weight": 1.0, "image_start_idx": 1,
                     "mixed_precision": True, "fp16_type": "bfloat16"}
# Cerebras spells the key order of the shipped yamls this way; the converted yaml follows it.
CS_VIT_ORDER = ("name", "position_embedding_type", "embedding_dropout_rate", "hidden_size", "use_post_embed_layer_norm",
                "use_embed_proj_bias", "num_hidden_layers", "layer_norm_epsilon", "num_heads", "attention_type",
                "attention_softmax_fp32", "dropout_rate", "nonlinearity", "attention_dropout_rate",
                "use_projection_bias_in_attention", "use_ffn_bias_in_attention", "filter_size", "use_ffn_bias",
                "initializer_range", "norm_first", "image_size", "num_channels", "patch_size",
                "use_conv_patchified_embedding", "use_encoder_pooler_layer", "prepend_cls_token")
CS_LLAMA_ORDER = ("name", "vocab_size", "hidden_size", "position_embedding_type", "rotary_dim",
                  "share_embedding_weights", "max_position_embeddings", "embd_pdrop", "num_hidden_layers",
                  "dropout_rate", "layer_norm_epsilon", "norm_type", "num_heads", "attention_type",
                  "attention_dropout_rate", "use_projection_bias_in_attention", "use_ffn_bias_in_attention",
                  "filter_size", "nonlinearity", "use_ffn_bias", "use_bias_in_output", "rope_theta",
                  "pos_scaling_factor", "initializer_range", "attention_module", "extra_attention_params")

FEATURE_MODES = {"patch": "patch", "cls_patch": "cls_patch"}  # LLaVA mm_vision_select_feature -> CS mode
LLAVA_HF_STRATEGIES = {"default": "patch", "full": "cls_patch"}  # llava-hf strategy -> CS mode
PROJECTOR_TYPE = re.compile(r"^mlp(\d+)x_gelu$")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _ordered(d: dict, order: tuple) -> dict:
    return {k: d[k] for k in order if k in d} | {k: v for k, v in d.items() if k not in order}


def _square(value, what: str) -> int:
    """CS sizes are [h, w]; HF CLIP only knows square sizes."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConversionError(f"{what} {list(value)} is not square; HF CLIP configs need a square size")
        return int(value[0])
    return int(value)


def _select_layer_to_cs(layer, where: str) -> int:
    """HF hidden_states index (0 = embeddings) -> CS layer index (run layers 0..k); negatives are the same."""
    if isinstance(layer, list):
        raise ConversionError(f"{where} = {layer}: several feature layers are not supported; use one index")
    layer = int(layer)
    if layer == 0:
        raise ConversionError(f"{where} = 0 selects the embeddings, which the CS model cannot; use -2")
    return layer if layer < 0 else layer - 1


def _select_layer_to_hf(idx) -> int:
    if idx is None:
        raise ConversionError("model.image_feature_select_layer_idx is null (all layers + final norm); HF LLaVA "
                              "cannot express this; set an index such as -2")
    return idx if idx < 0 else idx + 1


def vision_family_of_config(vision: Mapping) -> str:
    """"siglip" for a SiglipVisionConfig (or a SiglipConfig), else "clip": which key table the weights use."""
    vision = vision.get("vision_config") or vision.get("vision_config_dict") or vision
    return "siglip" if "siglip" in str(vision.get("model_type", "")) else "clip"


def vision_family(cfg) -> str:
    """The tower family of a parsed CS config: SigLIP has no CLS token."""
    return "clip" if cfg.image_model.prepend_cls_token else "siglip"


def hf_clip_config_to_cs(vision: Mapping) -> dict:
    """CLIPVisionConfig or SiglipVisionConfig (or a CLIPModel / SiglipModel config with `vision_config`) -> CS
    `image_model` section."""
    # A CLIPModel config nests the vision part (older files spell it vision_config_dict).
    family = vision_family_of_config(vision)
    vision = vision.get("vision_config") or vision.get("vision_config_dict") or vision
    c = {**HF_CLIP_DEFAULTS, **(HF_SIGLIP_DEFAULTS if family == "siglip" else {}),
         **{k: v for k, v in vision.items() if v is not None}}
    acts = ("gelu_pytorch_tanh", "gelu_new") if family == "siglip" else ("quick_gelu", "gelu")
    if c["hidden_act"] not in acts:
        raise ConversionError(f"{family} hidden_act {c['hidden_act']!r} is not supported; use one of {acts}")
    out = dict(CS_VIT_FIXED, **(CS_SIGLIP_FIXED if family == "siglip" else {}))
    out.update(name="ViTModel", hidden_size=c["hidden_size"], num_hidden_layers=c["num_hidden_layers"],
               layer_norm_epsilon=c["layer_norm_eps"], num_heads=c["num_attention_heads"],
               filter_size=c["intermediate_size"], nonlinearity=c["hidden_act"],
               attention_dropout_rate=c["attention_dropout"], initializer_range=c["initializer_range"],
               image_size=[c["image_size"]] * 2 if not isinstance(c["image_size"], list) else c["image_size"],
               num_channels=c["num_channels"],
               patch_size=[c["patch_size"]] * 2 if not isinstance(c["patch_size"], list) else c["patch_size"])
    return _ordered(out, CS_VIT_ORDER)


# Text families: HF model_type -> family; family -> (HF architecture, model_type) and the LLaVA-repo class that
# wraps it (LLaVA-1.5 has LlavaLlama / LlavaMistral; LLaVA-NeXT adds LlavaQwen; Qwen3 follows its naming).
TEXT_FAMILIES = {"llama": "llama", "llava": "llama", "llava_llama": "llama", "mistral": "mistral",
                 "llava_mistral": "mistral", "qwen2": "qwen2", "llava_qwen": "qwen2", "qwen3": "qwen3",
                 "llava_qwen3": "qwen3"}
HF_TEXT_CLASSES = {"llama": ("LlamaForCausalLM", "llama"), "mistral": ("MistralForCausalLM", "mistral"),
                   "qwen2": ("Qwen2ForCausalLM", "qwen2"), "qwen3": ("Qwen3ForCausalLM", "qwen3")}
LLAVA_REPO_CLASSES = {"llama": ("LlavaLlamaForCausalLM", "llava"), "mistral": ("LlavaMistralForCausalLM", "llava_mistral"),
                      "qwen2": ("LlavaQwenForCausalLM", "llava_qwen"), "qwen3": ("LlavaQwen3ForCausalLM", "llava_qwen3")}


def text_family_of_config(text: Mapping) -> str:
    model_type = str(text.get("model_type") or "llama")
    if model_type not in TEXT_FAMILIES:
        raise ConversionError(f"text model_type {model_type!r} is not supported; supported: "
                              f"{sorted(set(TEXT_FAMILIES))}")
    return TEXT_FAMILIES[model_type]


def text_family(cfg) -> str:
    """The HF family a parsed CS text model converts to: its options decide (Qwen3: q/k norm; Qwen2: q/k/v
    biases only; Mistral: a sliding window; else Llama)."""
    tm = cfg.text_model
    if tm.attention_qk_norm_layer:
        return "qwen3"
    if tm.use_projection_bias_in_attention and not tm.use_ffn_bias_in_attention:
        return "qwen2"
    return "mistral" if tm.attention_sliding_window_length else "llama"


def _rope_scaling_to_cs(scaling: Optional[Mapping]) -> dict:
    import model as M

    if not scaling:
        return {"pos_scaling_factor": 1.0}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return {"pos_scaling_factor": float(scaling["factor"])}
    if kind == "llama3":
        return {"pos_scaling_type": "llama3", "pos_scaling_factor": float(scaling["factor"]),
                "pos_scaling_extra_args": {k: scaling[k] for k in M.LLAMA3_SCALING_KEYS}}
    raise ConversionError(f"rope_scaling {dict(scaling)}: only linear and llama3 scaling are supported")


def hf_llama_config_to_cs(text: Mapping) -> dict:
    """The text fields of an HF config (LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config; a LLaVA
    config.json or a llava-hf text_config) -> CS `text_model` section."""
    family = text_family_of_config(text)
    c = {**HF_LLAMA_DEFAULTS, **{k: v for k, v in text.items() if v is not None or k == "rope_scaling"}}
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"] or c["num_attention_heads"]
    if c["hidden_act"] != "silu":
        raise ConversionError(f"text hidden_act {c['hidden_act']!r}: only silu (SwiGLU) is supported")
    if c["mlp_bias"]:
        raise ConversionError("text mlp_bias true is not supported (the Llama family has no MLP biases)")
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    out = dict(CS_LLAMA_FIXED)
    out.update(name="LlamaModel", vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
               rotary_dim=head_dim, share_embedding_weights=bool(c["tie_word_embeddings"]),
               max_position_embeddings=c["max_position_embeddings"], num_hidden_layers=c["num_hidden_layers"],
               layer_norm_epsilon=c["rms_norm_eps"], num_heads=heads, attention_dropout_rate=c["attention_dropout"],
               filter_size=c["intermediate_size"], rope_theta=float(c["rope_theta"]),
               initializer_range=c["initializer_range"], **_rope_scaling_to_cs(c["rope_scaling"]))
    if family == "qwen2":  # biases on q/k/v, none on the output projection
        out.update(use_projection_bias_in_attention=True, use_ffn_bias_in_attention=False)
    elif c["attention_bias"]:
        out.update(use_projection_bias_in_attention=True, use_ffn_bias_in_attention=True)
    if head_dim * heads != c["hidden_size"]:
        out["attention_inner_dim"] = head_dim * heads
    if family == "qwen3":
        out.update(attention_qk_norm_layer="rmsnorm", attention_qk_norm_eps=c["rms_norm_eps"])
    window = c.get("sliding_window") if (family == "mistral" or c.get("use_sliding_window")) else None
    if window:
        out["attention_sliding_window_length"] = int(window)
    if kv != heads:  # grouped-query attention, in Cerebras' spelling
        out.update(attention_module="multiquery_attention", extra_attention_params={"num_kv_groups": kv})
    return _ordered(out, CS_LLAMA_ORDER)


def _projector_section(input_unit: int, hidden: int, layers: int, use_bias: bool = True) -> dict:
    return {"image_model": {"name": "FeedForwardNetwork", "input_unit": input_unit, "layers_units": [hidden] * layers,
                            "layers_activation": ["gelu"] * (layers - 1) + [None], "use_bias": use_bias}}


def _model_section(image: dict, text: dict, projector: dict, freeze: list, select_idx: int, mode: str) -> dict:
    return {"image_model": image, "text_model": text, "projector": projector,
            "loss_scaling": CS_MODEL_DEFAULTS["loss_scaling"], "loss_weight": CS_MODEL_DEFAULTS["loss_weight"],
            "freeze": freeze, "image_feature_select_layer_idx": select_idx,
            "image_start_idx": CS_MODEL_DEFAULTS["image_start_idx"], "image_feature_select_mode": mode,
            "mixed_precision": CS_MODEL_DEFAULTS["mixed_precision"], "fp16_type": CS_MODEL_DEFAULTS["fp16_type"]}


def hf_configs_to_cs(image_config: Mapping, text_config: Mapping) -> dict:
    """hf layout: image_model/config.json + text_model/config.json (LLaVA fields) -> CS yaml `model:` section."""
    image = hf_clip_config_to_cs(image_config)
    text = hf_llama_config_to_cs(text_config)
    llava = {**LLAVA_DEFAULTS, **{k: v for k, v in text_config.items() if k in LLAVA_DEFAULTS and v is not None}}
    m = PROJECTOR_TYPE.match(str(llava["mm_projector_type"]))
    if not m:
        raise ConversionError(f"text_model/config.json mm_projector_type {llava['mm_projector_type']!r}: only "
                              "mlp<N>x_gelu projectors are supported (e.g. mlp2x_gelu)")
    mm_hidden = text_config.get("mm_hidden_size") or image["hidden_size"]
    if mm_hidden != image["hidden_size"]:
        raise ConversionError(f"text_model/config.json mm_hidden_size {mm_hidden} != image_model hidden_size "
                              f"{image['hidden_size']}: the configs belong to different models")
    for flag in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if llava[flag]:
            raise ConversionError(f"text_model/config.json {flag}: true is not supported (LLaVA-1.5 uses false)")
    mode = llava["mm_vision_select_feature"]
    if mode not in FEATURE_MODES:
        raise ConversionError(f"mm_vision_select_feature {mode!r}: use one of {list(FEATURE_MODES)}")
    freeze = ["^image_model", "^text_model"] if llava["tune_mm_mlp_adapter"] else ["^image_model"]
    projector = _projector_section(mm_hidden, text["hidden_size"], int(m.group(1)))
    select = _select_layer_to_cs(llava["mm_vision_select_layer"], "mm_vision_select_layer")
    return _model_section(image, text, projector, freeze, select, FEATURE_MODES[mode])


def llava_hf_config_to_cs(config: Mapping) -> dict:
    """llava-hf config.json (LlavaConfig) -> CS yaml `model:` section."""
    c = {**LLAVA_HF_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    vision = config.get("vision_config") or LLAVA_HF_VISION_DEFAULTS
    image = hf_clip_config_to_cs(vision)
    text_cfg = dict(config.get("text_config") or {})
    text_cfg.setdefault("tie_word_embeddings", False)
    text = hf_llama_config_to_cs(text_cfg)
    if c["projector_hidden_act"] != "gelu":
        raise ConversionError(f"projector_hidden_act {c['projector_hidden_act']!r}: only gelu is supported")
    strategy = c["vision_feature_select_strategy"]
    if strategy not in LLAVA_HF_STRATEGIES:
        raise ConversionError(f"vision_feature_select_strategy {strategy!r}: use one of {list(LLAVA_HF_STRATEGIES)}")
    if not image["prepend_cls_token"] and strategy != "full":
        raise ConversionError(f"vision_feature_select_strategy {strategy!r} with a {vision_family_of_config(vision)} "
                              "tower (no CLS token) drops its first patch feature, which our model cannot express; "
                              "LLaVA models with such towers use \"full\" (every patch)")
    mode = "patch" if not image["prepend_cls_token"] else LLAVA_HF_STRATEGIES[strategy]  # no CLS: nothing to drop
    projector = _projector_section(image["hidden_size"], text["hidden_size"], 2, bool(c["multimodal_projector_bias"]))
    select = _select_layer_to_cs(c["vision_feature_layer"], "vision_feature_layer")
    return _model_section(image, text, projector, ["^image_model"], select, mode)


def parse_cs_config(model_section: Mapping):
    """The CS `model:` section as model.py's LlavaModelConfig (defaults filled, validated)."""
    import model as model_py

    try:
        return model_py.parse_model_config(dict(model_section))
    except model_py.ConfigError as e:
        raise ConversionError(str(e)) from None


def num_kv_heads_of(cfg) -> int:
    import model as model_py

    return model_py.num_kv_heads(cfg.text_model)


def _projector_layers(cfg) -> int:
    """Number of projector layers, checking it is an mlp<N>x_gelu (the only kind LLaVA configs can express)."""
    pj, tm = cfg.projector, cfg.text_model
    n = len(pj.layers_units)
    if list(pj.layers_activation) != ["gelu"] * (n - 1) + [None] or any(u != tm.hidden_size for u in pj.layers_units):
        raise ConversionError(f"model.projector.image_model {pj.layers_units} / {pj.layers_activation}: only "
                              f"mlp<N>x_gelu (all units = text hidden_size, gelu between layers) converts to HF")
    if not pj.use_bias:
        raise ConversionError("model.projector.image_model.use_bias false: LLaVA's mm_projector has biases")
    return n


def _hf_vit_fields(im) -> dict:
    """The fields CLIPVisionConfig and SiglipVisionConfig share, from a CS image_model."""
    return {"hidden_size": im.hidden_size, "intermediate_size": im.filter_size,
            "num_hidden_layers": im.num_hidden_layers, "num_attention_heads": im.num_heads,
            "num_channels": im.num_channels, "image_size": _square(im.image_size, "model.image_model.image_size"),
            "patch_size": _square(im.patch_size, "model.image_model.patch_size"), "hidden_act": im.nonlinearity,
            "layer_norm_eps": im.layer_norm_epsilon, "attention_dropout": im.attention_dropout_rate}


def cs_to_hf_siglip_config(cfg, dtype: str = "float32") -> dict:
    """CS image_model without CLS -> SiglipVisionConfig dict (no pooling head) for image_model/config.json."""
    im = cfg.image_model
    if not im.use_embed_proj_bias or im.use_post_embed_layer_norm or not im.use_ffn_bias:
        raise ConversionError("model.image_model: HF SigLIP needs use_embed_proj_bias true, use_post_embed_layer_norm "
                              "false and use_ffn_bias true")
    return {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model", **_hf_vit_fields(im),
            "vision_use_head": False, "torch_dtype": dtype}


def cs_to_hf_vision_config(cfg, dtype: str = "float32") -> dict:
    return cs_to_hf_clip_config(cfg, dtype) if vision_family(cfg) == "clip" else cs_to_hf_siglip_config(cfg, dtype)


def cs_to_hf_clip_config(cfg, dtype: str = "float32") -> dict:
    """CS image_model -> CLIPVisionConfig dict for image_model/config.json."""
    im = cfg.image_model
    if im.use_embed_proj_bias or not im.use_post_embed_layer_norm or not im.use_ffn_bias:
        raise ConversionError("model.image_model: HF CLIP needs use_embed_proj_bias false, use_post_embed_layer_norm "
                              "true and use_ffn_bias true")
    return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", **_hf_vit_fields(im),
            "dropout": 0.0, "initializer_range": im.initializer_range, "initializer_factor": 1.0,
            "projection_dim": 768, "torch_dtype": dtype}


def _rope_scaling_to_hf(tm) -> Optional[dict]:
    if tm.pos_scaling_type == "llama3":
        return {"rope_type": "llama3", "factor": tm.pos_scaling_factor, **tm.pos_scaling_extra_args}
    return None if tm.pos_scaling_factor == 1.0 else {"type": "linear", "factor": tm.pos_scaling_factor}


def cs_to_hf_llama_config(cfg, dtype: str = "float32") -> dict:
    """CS text_model -> the text fields of the HF config of its family (text_family): Llama, Mistral, Qwen2 or
    Qwen3, with model_type (the LLaVA-repo layout replaces it with its own class)."""
    tm = cfg.text_model
    family = text_family(cfg)
    head_dim = (tm.attention_inner_dim or tm.hidden_size) // tm.num_heads
    if tm.rotary_dim not in (None, head_dim):
        raise ConversionError(f"model.text_model.rotary_dim {tm.rotary_dim} != head size {head_dim}: HF Llama "
                              "rotates whole heads")
    if tm.use_ffn_bias or tm.use_bias_in_output:
        raise ConversionError("model.text_model: use_ffn_bias / use_bias_in_output are not supported by the HF "
                              "Llama-family conversion")
    if family != "qwen2" and tm.use_projection_bias_in_attention != tm.use_ffn_bias_in_attention:
        raise ConversionError("model.text_model: q/k/v biases without an output bias exist only in Qwen2; set "
                              "use_projection_bias_in_attention and use_ffn_bias_in_attention alike")
    out = {"architectures": [HF_TEXT_CLASSES[family][0]], "model_type": HF_TEXT_CLASSES[family][1],
           "vocab_size": tm.vocab_size, "hidden_size": tm.hidden_size, "intermediate_size": tm.filter_size,
           "num_hidden_layers": tm.num_hidden_layers, "num_attention_heads": tm.num_heads,
           "num_key_value_heads": num_kv_heads_of(cfg), "hidden_act": "silu",
           "max_position_embeddings": tm.max_position_embeddings, "rms_norm_eps": tm.layer_norm_epsilon,
           "initializer_range": tm.initializer_range, "tie_word_embeddings": tm.share_embedding_weights,
           "rope_theta": tm.rope_theta, "rope_scaling": _rope_scaling_to_hf(tm),
           "attention_dropout": tm.attention_dropout_rate, "torch_dtype": dtype}
    if family in ("llama", "qwen3"):
        out.update(attention_bias=tm.use_projection_bias_in_attention, mlp_bias=False)
    if family in ("qwen3",) or tm.attention_inner_dim:
        out["head_dim"] = head_dim
    if family == "mistral":
        out["sliding_window"] = tm.attention_sliding_window_length
    if family == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None)
    return out


def cs_to_hf_text_config(cfg, vision_tower: str, dtype: str = "float32") -> dict:
    """CS model -> LLaVA text_model/config.json (Llama fields + mm_* fields), spec 6.5."""
    text = cs_to_hf_llama_config(cfg, dtype)
    layers = _projector_layers(cfg)
    tune_adapter = any("text_model" in p for p in (cfg.freeze or []))
    architecture, model_type = LLAVA_REPO_CLASSES[text_family(cfg)]
    llava = {"architectures": [architecture], "model_type": model_type, "bos_token_id": 1,
             "eos_token_id": 2, "pad_token_id": 0, "use_cache": True,
             "mm_vision_tower": vision_tower, "mm_hidden_size": cfg.image_model.hidden_size,
             "mm_projector_type": f"mlp{layers}x_gelu",
             "mm_vision_select_layer": _select_layer_to_hf(cfg.image_feature_select_layer_idx),
             "mm_vision_select_feature": cfg.image_feature_select_mode,
             "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat",
             "image_aspect_ratio": "pad", "use_mm_proj": True, "tune_mm_mlp_adapter": tune_adapter,
             "freeze_mm_mlp_adapter": False, "tune_mm_vision_resampler": False, "freeze_mm_vision_resampler": False,
             "unfreeze_mm_vision_tower": False}
    return {**text, **llava}


def llava_hf_strategy(cfg) -> str:
    """vision_feature_select_strategy of a CS model. llava-hf's "default" drops the first feature (CLIP's CLS), so
    a tower without CLS (SigLIP), whose every feature our model keeps in either mode, needs "full"."""
    if vision_family(cfg) == "siglip":
        return "full"
    return {v: k for k, v in LLAVA_HF_STRATEGIES.items()}[cfg.image_feature_select_mode]


def image_tokens_of(cfg) -> int:
    """Image features (= <image> tokens) per image: the patches, plus CLS when the model keeps it."""
    im = cfg.image_model
    patches = (im.image_size[0] // im.patch_size[0]) * (im.image_size[1] // im.patch_size[1])
    return patches + (im.prepend_cls_token and cfg.image_feature_select_mode == "cls_patch")


def cs_to_llava_hf_config(cfg, image_token_index: int, pad_token_id: Optional[int], dtype: str = "float32",
                          token_ids: Optional[Mapping] = None) -> dict:
    """CS model -> llava-hf config.json (LlavaConfig). token_ids: the tokenizer's bos/eos/pad_token_id, written
    into text_config (left to the family's defaults when None)."""
    if _projector_layers(cfg) != 2:
        raise ConversionError("llava-hf has a 2-layer projector (linear_1, gelu, linear_2); this config has "
                              f"{len(cfg.projector.layers_units)} layers")
    vision = cs_to_hf_vision_config(cfg, dtype)
    vision.pop("architectures")
    text = dict(cs_to_hf_llama_config(cfg, dtype), **(token_ids or {}))
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "image_token_index": image_token_index, "pad_token_id": pad_token_id, "ignore_index": -100,
            "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
            "vision_feature_layer": _select_layer_to_hf(cfg.image_feature_select_layer_idx),
            "vision_feature_select_strategy": llava_hf_strategy(cfg), "image_seq_length": image_tokens_of(cfg),
            "tie_word_embeddings": cfg.text_model.share_embedding_weights, "torch_dtype": dtype,
            "text_config": text, "vision_config": vision}


def preprocessor_config(cfg, settings: Optional[dict] = None) -> dict:
    """image_model/preprocessor_config.json for the hf layout: CLIPImageProcessor's fields. `settings` (from
    image_processor_settings) reproduce the training transforms; None = spec 6.2's CLIP defaults at the model's size.
    CLIPImageProcessor cannot pad: the LLaVA repo pads itself when text_model's image_aspect_ratio is "pad" (in the
    colour int(255 * image_mean), as LlavaImageProcessor does), see hf_image_aspect_ratio."""
    if settings is not None:
        fields = {k: v for k, v in settings.items() if k != "do_pad"}
        return {**fields, "feature_extractor_type": "CLIPFeatureExtractor",
                "image_processor_type": "CLIPImageProcessor"}
    size = _square(cfg.image_model.image_size, "model.image_model.image_size")
    return {"crop_size": {"height": size, "width": size}, "do_center_crop": True, "do_normalize": True,
            "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD, "resample": 3, "size": size}


def hf_image_aspect_ratio(settings: Optional[dict]) -> str:
    """text_model's image_aspect_ratio: "pad" makes the LLaVA repo pad to a square before its image processor;
    "square" hands it the image as it is (transforms without expand_to_square)."""
    return "pad" if settings is None or settings["do_pad"] else "square"


# ---- The exported image processor from the training transforms (create_hdf5_dataset.build_transforms).
# LlavaImageProcessor runs fixed stages in this order: pad to a square, resize, center crop, rescale, normalize.
# Each training transform becomes one stage through TRANSFORM_STAGES; transforms that stage order, those options or
# those colours cannot follow are an error naming the transform (--ignore-transforms keeps the tower's default).
# Both sides resize with Pillow on uint8 images, so the pixels match to float rounding.

IGNORE_HINT = ("or pass --ignore-transforms to write the tower's default CLIP/SigLIP processor (its pixels then "
               "differ from what training fed the model)")


def _pad_stage(spec: dict, where: str) -> dict:
    colour = [int(c) for c in spec.get("background_color", (0, 0, 0))]
    if len(colour) != 3:
        raise ConversionError(f"{where}: background_color {colour} must be 3 values (R, G, B)")
    return {"do_pad": True, "pad_colour": colour}


def _resize_stage(spec: dict, where: str) -> dict:
    import create_hdf5_dataset as hd

    size = hd._size_hw(spec["size"])  # the same parsing training uses: int = shortest edge, [h, w] = exact
    if spec.get("max_size") is not None and not isinstance(size, tuple):  # training ignores it for [h, w]
        raise ConversionError(f"{where}: max_size {spec['max_size']} has no image-processor equivalent (it cannot cap "
                              f"the longer edge of a shortest-edge resize); {IGNORE_HINT[3:]}")
    # antialias is not read: training resizes with Pillow, which always antialiases, as the processor does.
    return {"do_resize": True, "resample": hd.INTERPOLATIONS[str(spec.get("interpolation", "bilinear")).lower()],
            "size": {"height": size[0], "width": size[1]} if isinstance(size, tuple) else {"shortest_edge": size}}


def _crop_stage(spec: dict, where: str) -> dict:
    import create_hdf5_dataset as hd

    size = hd._size_hw(spec["size"])
    h, w = size if isinstance(size, tuple) else (size, size)
    return {"do_center_crop": True, "crop_size": {"height": h, "width": w}}


def _rescale_stage(spec: dict, where: str) -> dict:
    return {"do_rescale": True, "rescale_factor": 1 / 255}


def _normalize_stage(spec: dict, where: str) -> dict:
    out = {}
    for key in ("mean", "std"):
        value = spec[key]
        values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]
        if len(values) not in (1, 3):
            raise ConversionError(f"{where}: {key} {values} must hold 1 or 3 values")
        out[key] = values * 3 if len(values) == 1 else values  # one value broadcasts over R, G, B in training
    return {"do_normalize": True, "image_mean": out["mean"], "image_std": out["std"]}


# training transform name -> (its stage in LlavaImageProcessor, the processor settings of one spec)
TRANSFORM_STAGES = {
    "expand_to_square": ("pad", _pad_stage),
    "resize": ("resize", _resize_stage),
    "center_crop": ("center crop", _crop_stage),
    "to_tensor": ("rescale", _rescale_stage),
    "normalize": ("normalize", _normalize_stage),
}
STAGE_ORDER = ("pad", "resize", "center crop", "rescale", "normalize")


def image_processor_settings(specs: list, where: str) -> dict:
    """A training `transforms` list -> LlavaImageProcessor keyword arguments that give the same pixel values.
    `where` names the list in errors (e.g. "params.yaml eval_input.transforms")."""
    import create_hdf5_dataset as hd

    try:
        hd.build_transforms(specs)  # the checks training makes: known names, valid arguments
    except ValueError as e:
        raise ConversionError(f"{where}: {e}") from None
    if not any(spec["name"] == "to_tensor" for spec in specs):
        specs = [*specs, {"name": "to_tensor"}]  # build_transforms appends one too
    settings = {"do_convert_rgb": True, "do_pad": False, "do_resize": False, "do_center_crop": False,
                "do_rescale": False, "do_normalize": False}
    previous = None
    for i, spec in enumerate(specs):
        here = f"{where}[{i}] ({spec['name']})"
        if spec["name"] not in TRANSFORM_STAGES:
            raise ConversionError(f"{here} has no image-processor equivalent (it can express: "
                                  f"{', '.join(TRANSFORM_STAGES)}); remove it from the transforms, {IGNORE_HINT}")
        stage, settings_of = TRANSFORM_STAGES[spec["name"]]
        if previous is not None and STAGE_ORDER.index(stage) <= STAGE_ORDER.index(previous):
            raise ConversionError(f"{here} comes after a {previous} step, but the image processor runs each step "
                                  f"once, in the order {' -> '.join(STAGE_ORDER)}; reorder the transforms, "
                                  f"{IGNORE_HINT}")
        previous = stage
        settings.update(settings_of(spec, here))
    _check_crop_never_pads(settings, where)
    return _resolve_pad_colour(settings, where)


def _check_crop_never_pads(settings: dict, where: str) -> None:
    """A center crop larger than its input pads: training puts the image at the floor of the margin, transformers at
    the ceiling (1 px apart). Only a resize to at least the crop size before it rules that out."""
    if not settings["do_center_crop"]:
        return
    crop = settings["crop_size"]
    size = settings.get("size", {}) if settings["do_resize"] else {}
    if "shortest_edge" in size:
        fits = max(crop["height"], crop["width"]) <= size["shortest_edge"]
    else:
        fits = "height" in size and crop["height"] <= size["height"] and crop["width"] <= size["width"]
    if not fits:
        raise ConversionError(f"{where}: center_crop {crop['height']}x{crop['width']} can be larger than the image "
                              f"it gets ({'resize ' + str(size) if size else 'no resize before it'}), and then the "
                              f"image processor pads 1 px differently from training; put a resize to at least the "
                              f"crop size before it, {IGNORE_HINT}")


def _resolve_pad_colour(settings: dict, where: str) -> dict:
    """LlavaImageProcessor pads in int(255 * image_mean) (the LLaVA repo's rule). With normalize, that mean is fixed
    and must give the training colour; without, image_mean is free (do_normalize is off) and is set to give it."""
    colour = settings.pop("pad_colour", None)
    if settings["do_normalize"]:
        implied = [int(m * 255) for m in settings["image_mean"]]
        if colour is not None and colour != implied:
            raise ConversionError(f"{where}: expand_to_square background_color {colour}, but the image processor "
                                  f"pads in int(255 * normalize mean) = {implied}; train with background_color "
                                  f"{implied}, {IGNORE_HINT}")
    elif colour is not None:
        settings.update(image_mean=[(c + 0.5) / 255 for c in colour], image_std=[1.0, 1.0, 1.0])
    else:
        settings.update(image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])  # unused: do_normalize is off
    return settings


def processor_output_hw(settings: dict) -> Optional[tuple]:
    """(height, width) of every image the settings produce, or None when it follows the input's shape."""
    if settings["do_center_crop"]:
        return settings["crop_size"]["height"], settings["crop_size"]["width"]
    size = settings["size"] if settings["do_resize"] else {}
    if "height" in size:
        return size["height"], size["width"]
    if "shortest_edge" in size and settings["do_pad"]:
        return size["shortest_edge"], size["shortest_edge"]
    return None


# ==============================================================================================
# 5. Checkpoint files: finding, reading (one shard at a time), writing (sharded, temporary names)
# ==============================================================================================

# Looked for in this order inside a model folder; an index lists the shards.
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_HF_WEIGHT_NAME = re.compile(r"^(pytorch_model|model)(-\d{5}-of-\d{5})?\.(bin|safetensors)(\.index\.json)?$")


def parse_size(text) -> int:
    """'10GB' -> 10**9 * 10 (decimal units as HF; KiB/MiB/GiB binary); a plain number is bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in SIZE_UNITS:
        raise ConversionError(f"--hf-shard-size {text!r}: use a size such as 10GB, 500MB or 2GiB")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def find_weight_files(folder: Path) -> list:
    """The weight files of an HF model folder, in shard order (index first, then a single file)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"{folder}: folder not found")
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            check_complete(path)
            return [path]
        weight_map = read_json(path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{path}: no `weight_map` in the index")
        shards = [folder / s for s in dict.fromkeys(weight_map.values())]
        absent = [str(s) for s in shards if not s.is_file()]
        if absent:
            raise ConversionError(f"{path} lists shards that are not there: {', '.join(absent)}")
        for shard in shards:
            check_complete(shard)
        return shards
    present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
    raise ConversionError(f"{folder}: no weights found (looked for {', '.join(WEIGHT_FILES)}; found {present})")


def damaged_file(path: Path, reader: str, error) -> ConversionError:
    """The message for a weight file that exists but cannot be read: almost always a cut-off download or copy."""
    size = Path(path).stat().st_size if Path(path).is_file() else 0
    if isinstance(error, Exception):
        first = (str(error).strip().splitlines() or [""])[0]
        error = f"{type(error).__name__}: {first.split('. ')[0]}".rstrip(": ")
    return ConversionError(f"{path} ({size:,} bytes) cannot be read by {reader} ({error}). The file is truncated or "
                           "damaged, most often by an interrupted download or copy: download or copy it again, check "
                           "that its size matches the original, and rerun the conversion")


def _safetensors_size(path: Path) -> Optional[int]:
    """The length a safetensors file has according to its header (8-byte length, JSON, data); None if unreadable."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = f.read(length) if 2 <= length <= 100 * 2**20 else b""
    try:
        entries = json.loads(header)
        ends = [entry["data_offsets"][1] for key, entry in entries.items() if key != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    return 8 + length + max(ends, default=0)


def check_complete(path: Path) -> None:
    """Before any conversion work, a cheap test that a weight file is whole: a safetensors file is as long as its
    header says; a torch zip file still has its central directory (written last). Legacy pickles are checked
    when read."""
    path = Path(path)
    reader = "safetensors" if path.suffix == ".safetensors" else "torch.load"
    with open(path, "rb") as f:
        magic = f.read(4)
    if not magic:
        raise damaged_file(path, reader, "the file is empty")
    if reader == "safetensors":
        expected = _safetensors_size(path)
        if expected is None:
            raise damaged_file(path, reader, "its header is cut off or garbled")
        if path.stat().st_size < expected:
            raise damaged_file(path, reader, f"its header describes {expected:,} bytes")
    elif magic == b"PK\x03\x04":
        try:
            zipfile.ZipFile(path).close()
        except (zipfile.BadZipFile, OSError):
            raise damaged_file(path, reader, "a zip archive without its central directory, which is written "
                               "last") from None


def torch_load(path: Path, mmap: bool = False):
    """torch.load with weights_only=True: plain tensors and containers only, a pickle that runs code is refused.

    mmap=True maps the file instead of reading it, so entries never touched (a training checkpoint's optimizer
    state) cost no memory; files in the legacy (non-zip) format fall back to a normal read."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # not a refused class or function: a cut-off or garbled pickle
            raise damaged_file(path, "torch.load", "not a complete pickle") from None
        raise ConversionError(f"{path}: refused to load: it needs more than tensors and plain containers "
                              f"(torch.load weights_only=True said: {str(e).splitlines()[0]}). Only load checkpoints "
                              "you trust; re-save it as a plain state dict or safetensors") from None
    except RuntimeError as e:
        if mmap and "mmap" in str(e):
            return torch_load(path, mmap=False)
        raise damaged_file(path, "torch.load", e) from None
    except (EOFError, IndexError, OSError, ValueError) as e:  # a legacy pickle cut short, an unreadable file
        raise damaged_file(path, "torch.load", e) from None


def load_weight_file(path: Path) -> dict:
    """One weight file (safetensors or torch pickle) -> {key: tensor}."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    with open(path, "rb") as f:
        if f.read(8) == HDF5_MAGIC:
            return _load_cerebras_h5(path)
    state = torch_load(path)
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise damaged_file(path, "safetensors", e) from None


def _load_cerebras_h5(path: Path):
    """A checkpoint written by cerebras.pytorch (HDF5). Readable only where cerebras.pytorch is installed."""
    try:
        import cerebras.pytorch as cstorch
    except ImportError:
        raise ConversionError(f"{path} is a Cerebras HDF5 checkpoint (written by cstorch.save); reading it needs "
                              "cerebras.pytorch. Run this conversion in the Cerebras environment "
                              "(requirements-csx.txt), or save it there with torch.save") from None
    try:
        return cstorch.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any reader failure is reported with the file name
        raise ConversionError(f"{path}: cerebras.pytorch could not read this HDF5 file ({type(e).__name__}: {e})")


def _plain_tensors(state: Mapping) -> dict:
    """cstorch.load gives lazily read tensor subclasses: copy them into ordinary tensors (one copy)."""
    import torch

    return {k: v if type(v) is torch.Tensor else torch.empty(v.shape, dtype=v.dtype).copy_(v)
            for k, v in state.items()}


def iter_weight_files(files: list, progress: bool, desc: str) -> Iterator:
    """Yield (path, state dict) one file at a time, so at most one shard is in memory besides the output."""
    from tqdm import tqdm

    for path in tqdm(files, desc=desc, unit="shard", disable=not progress):
        yield path, load_weight_file(path)


def load_cs_checkpoint(path: Path) -> tuple:
    """A cs-2.x checkpoint -> (state dict without the `model.` prefix, params from __metadata__ or None).

    Accepts {"model": state, ...} (run.py / Cerebras; optimizer and other entries are ignored, and thanks to
    mmap never read) or a bare state dict."""
    path = Path(path)
    if path.is_dir():
        raise ConversionError(f"{path} is a folder; --src-fmt cs-2.2 expects a .mdl file "
                              f"(a folder is --src-fmt {guess_format(path) or 'hf or llava-hf'})")
    if not path.is_file():
        raise ConversionError(f"{path}: checkpoint not found")
    with open(path, "rb") as f:
        is_h5 = f.read(8) == HDF5_MAGIC
    if not is_h5:
        check_complete(path)
    obj = _load_cerebras_h5(path) if is_h5 else torch_load(path, mmap=True)
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: expected a dict, found {type(obj).__name__}")
    params = None
    meta = obj.get("__metadata__")
    if isinstance(meta, list) and meta and isinstance(meta[-1], Mapping):
        params = meta[-1].get("params")
    if isinstance(obj.get("model"), Mapping):
        ignored = [k for k in obj if k != "model"]
        if ignored:
            print(f"Ignoring checkpoint entries {ignored} (only `model` weights are converted)", file=sys.stderr)
        state = obj["model"]
    else:
        state = obj
    bad = [k for k, v in state.items() if not hasattr(v, "shape")]
    if bad:
        raise ConversionError(f"{path}: not a state dict (non-tensor entries {bad[:5]}); expected {{'model': "
                              "state_dict}} or a state dict")
    if is_h5:
        state = _plain_tensors(state)
    return strip_model_prefix(state), params


def check_no_weights(folder: Path) -> None:
    """Never mix shards of two conversions, never overwrite someone's original weights."""
    folder = Path(folder)
    existing = sorted(p.name for p in folder.iterdir() if _HF_WEIGHT_NAME.match(p.name)) if folder.is_dir() else []
    if existing:
        raise ConversionError(f"{folder} already holds weights ({', '.join(existing[:4])}); remove them or "
                              "choose another --output-dir")


class ShardedWriter:
    """Writes tensors into HF-style shards of at most `max_bytes`, under temporary names renamed by close().

    One shard is held in memory at a time; tensors are released as soon as their shard is written."""

    def __init__(self, folder: Path, max_bytes: int, safetensors: bool):
        self.folder = Path(folder)
        check_no_weights(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.safetensors = safetensors
        self.current: dict = {}
        self.current_bytes = 0
        self.written: list = []  # (temporary path, keys)
        self.total_bytes = 0

    def add(self, key: str, tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + size > self.max_bytes:
            self._flush()
        self.current[key] = tensor
        self.current_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        if not self.current:
            return
        tmp = self.folder / f"partial-shard-{len(self.written) + 1:05d}.tmp"
        tensors = {k: _own_storage(v) for k, v in self.current.items()}
        if self.safetensors:
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata={"format": "pt"})
        else:
            import torch

            torch.save(tensors, tmp)
        self.written.append((tmp, list(tensors)))
        self.current, self.current_bytes = {}, 0

    def close(self) -> list:
        """Write the last shard, rename the shards to their HF names, write the index."""
        self._flush()
        stem, ext = ("model", "safetensors") if self.safetensors else ("pytorch_model", "bin")
        n = len(self.written)
        names = [f"{stem}.{ext}"] if n == 1 else [f"{stem}-{i:05d}-of-{n:05d}.{ext}" for i in range(1, n + 1)]
        weight_map = {}
        for (tmp, keys), name in zip(self.written, names):
            os.replace(tmp, self.folder / name)
            weight_map.update({k: name for k in keys})
        paths = [self.folder / name for name in names]
        if n > 1:
            index = self.folder / f"{stem}.{ext}.index.json"
            _write_json(index, {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
            paths.append(index)
        return paths


def _own_storage(t):
    """A contiguous tensor owning exactly its bytes (torch.save writes whole storages; safetensors wants this)."""
    t = t.contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def _write_json(path: Path, obj) -> None:
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _write_yaml(path: Path, obj) -> None:
    import yaml

    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump(obj, f, sort_keys=False, default_flow_style=None)
    os.replace(tmp, path)


def _torch_save(obj, path: Path) -> None:
    import torch

    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A fresh hidden folder inside `out` for the conversion to write into. Its files move into `out` only once the
    conversion has finished; on any failure (a damaged shard, a bad option, Ctrl-C) it is deleted instead, so `out`
    keeps exactly what it held before, and a folder this run had to create is removed again."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--output-dir {out} is a file; give a folder")
    missing = []  # deepest first
    folder = out.absolute()
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".partial-conversion-", dir=out))
    except OSError as e:
        raise ConversionError(f"--output-dir {out}: cannot write there ({e})") from None
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for folder in missing:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty
        raise
    _move_into(stage, out)


def _move_into(stage: Path, out: Path) -> None:
    """Move every file of `stage` to the same relative path in `out` (replacing a file of that name), drop `stage`."""
    for path in sorted(stage.rglob("*")):
        if not path.is_dir():
            target = out / path.relative_to(stage)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    shutil.rmtree(stage)


def read_cs_yaml(path: Path) -> dict:
    """The `model:` section of a CS params yaml (run config, converted config, or 2.10 trainer format)."""
    import create_hdf5_dataset as hd

    path = Path(path)
    if path.is_dir():
        raise ConversionError(f"--config {path} is a folder; for --src-fmt cs-2.2 pass the params yaml")
    try:
        params = hd.read_yaml_mapping(path, "--config")
    except FileNotFoundError:
        raise ConversionError(f"--config {path}: not found") from None
    if isinstance(params, dict) and "trainer" in params and "model" not in params:
        params = {"model": ((params["trainer"] or {}).get("init") or {}).get("model")}
    if not isinstance(params, dict) or not isinstance(params.get("model"), dict):
        raise ConversionError(f"--config {path}: no top-level `model:` section")
    model = dict(params["model"])
    model.pop("name", None)  # 2.10 trainer configs name the model ("llava")
    return model


def training_transforms(params, where: str) -> tuple:
    """(the transforms list, where it is) of a full params mapping, or (None, None). The section is the one run.py's
    predict and chat modes preprocess with: eval_input when the config has one (the deterministic pipeline the model
    was measured with), else train_input."""
    if not isinstance(params, Mapping):
        return None, None
    for name in ("eval_input", "train_input"):
        section = params.get(name)
        if isinstance(section, Mapping):
            specs = section.get("transforms")
            if specs is not None and not isinstance(specs, list):
                raise ConversionError(f"{where} {name}.transforms must be a list, found {type(specs).__name__}")
            return (specs, f"{where} {name}.transforms") if specs is not None else (None, None)
    return None, None


def exported_image_settings(cfg, config: Optional[Path], checkpoint_params, checkpoint: Optional[Path],
                            ignore: bool) -> Optional[dict]:
    """LlavaImageProcessor settings reproducing the training transforms: --config's when it has them, else the
    checkpoint's own config (__metadata__ params, as run.py saved it). None = the tower's default processor, when no
    transforms are found or --ignore-transforms (`ignore`) is given; both say so on stderr."""
    import create_hdf5_dataset as hd

    specs, where = None, None
    if config is not None:
        specs, where = training_transforms(hd.read_yaml_mapping(config, "--config"), str(config))
    if specs is None:
        specs, where = training_transforms(checkpoint_params, f"{checkpoint} (__metadata__ params)")
    default = f"the tower's default {vision_family(cfg).upper()} image processor"
    if specs is None:
        print(f"No train_input/eval_input transforms in the config: writing {default}", file=sys.stderr)
        return None
    if ignore:
        print(f"--ignore-transforms: writing {default}, not {where}; its pixel values differ from what training "
              f"fed the model", file=sys.stderr)
        return None
    settings = image_processor_settings(specs, where)
    size = _square(cfg.image_model.image_size, "model.image_model.image_size")
    hw = processor_output_hw(settings)
    if hw is not None and tuple(hw) != (size, size):
        raise ConversionError(f"{where} make {hw[0]}x{hw[1]} images but model.image_model.image_size is {size}; "
                              f"fix the transforms or the image_size (the model was trained on one of them)")
    return settings


def guess_format(path: Path) -> Optional[str]:
    """Which format a path looks like (for error messages): hf, llava-hf, cs-2.2 or None."""
    path = Path(path)
    if path.is_file():
        return "cs-2.2" if path.suffix in (".mdl", ".pt", ".pth", ".ckpt") else None
    if (path / "image_model").is_dir() and (path / "text_model").is_dir():
        return "hf"
    config = path / "config.json"
    if config.is_file():
        try:
            fields = read_json(config)
        except ConversionError:
            return None
        if "vision_config" in fields and "text_config" in fields:
            return "llava-hf"
    return None


# ==============================================================================================
# 6. Folder-level conversions (streaming)
# ==============================================================================================


@dataclass
class Options:
    shard_bytes: int = 10 * 10**9  # --hf-shard-size
    safetensors: bool = False  # --export-safetensors
    dtype: Optional[str] = None  # --dtype: cast floating tensors; None keeps the checkpoint's dtype
    progress: bool = True  # tqdm bars
    strict: bool = True  # False = --drop-unmatched-keys
    tokenizer_dir: Optional[Path] = None  # --tokenizer-dir: tokenizer files for the hf / llava-hf output
    seed: int = 0  # --seed for a fresh projector (plain Vicuna input)
    vision_tower: Optional[str] = None  # --vision-tower: mm_vision_tower of hf output; None = OUT/image_model
    chat_template: str = "auto"  # --chat-template: the llava-hf processor's template (CHAT_TEMPLATE_HELP)
    ignore_transforms: bool = False  # --ignore-transforms: the tower's default image processor, not the training one


DTYPES = ("float32", "bfloat16", "float16")


def _cast(t, dtype: Optional[str]):
    import torch

    return t.to(getattr(torch, dtype)) if dtype and t.is_floating_point() else t


def _dtype_name(t) -> str:
    return str(t.dtype).replace("torch.", "")


def expected_cs_shapes(cfg) -> dict:
    """{CS key: shape} of the model run.py builds from this config (built on the meta device: no memory)."""
    import torch

    import model as model_py

    with torch.device("meta"):
        llava = model_py.build_llava(cfg)
    return {k: tuple(v.shape) for k, v in llava.state_dict().items()}


def _config_mismatch(where: str, key: str, cs_key: str, shape, expected: dict, config: str) -> Optional[str]:
    if cs_key not in expected:
        return f"{where}: {key} -> {cs_key}: the model built from {config} has no such parameter"
    if tuple(shape) != expected[cs_key]:
        return (f"{where}: {key} -> {cs_key} has shape {list(shape)} but {config} gives {list(expected[cs_key])}")
    return None


def fresh_projector(cfg, dtype, seed: int) -> dict:
    """Projector weights AND biases ~ uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) (spec 6.4), for a plain Vicuna."""
    import torch

    pj = cfg.projector
    g = torch.Generator().manual_seed(seed)
    sizes = [pj.input_unit, *pj.layers_units]
    out = {}
    for i in range(len(pj.layers_units)):
        bound = 1.0 / math.sqrt(sizes[i])
        prefix = f"projector_image_model.ffn.{i}.linear_layer."
        out[prefix + "weight"] = ((torch.rand(sizes[i + 1], sizes[i], generator=g) * 2 - 1) * bound).to(dtype)
        if pj.use_bias:
            out[prefix + "bias"] = ((torch.rand(sizes[i + 1], generator=g) * 2 - 1) * bound).to(dtype)
    return out


def _stream_into(out: dict, files: list, mapper: KeyMapper, expected: dict, config: str, opts: Options,
                 desc: str) -> None:
    """Convert files shard by shard into `out`; tensors are popped from each shard as they are converted."""
    problems = []
    for path, state in iter_weight_files(files, opts.progress, desc):
        for key in list(state):
            tensor = state.pop(key)
            for cs_key, value in mapper.convert(key, tensor):
                problem = _config_mismatch(str(path), key, cs_key, value.shape, expected, config)
                if problem:
                    problems.append(problem)
                    continue
                out[cs_key] = _cast(value, opts.dtype)
        mapper.check_unknown(str(path))
        if problems:
            raise ConversionError("the config does not match the weights:\n  " + "\n  ".join(problems[:10]))


def _finish_cs(out: dict, cfg, expected: dict, config: str) -> dict:
    """Tie lm_head when the config shares embeddings, check nothing is missing, order as the model."""
    emb, head = "text_model.embedding_layer.word_embeddings.weight", "text_model.lm_head.weight"
    if cfg.text_model.share_embedding_weights and head not in out and emb in out:
        out[head] = out[emb]
    missing = [k for k in expected if k not in out]
    if missing:
        raise ConversionError(f"{len(missing)} parameter(s) of the model built from {config} are not in the "
                              f"checkpoint: {', '.join(missing[:12])}" + (" ..." if len(missing) > 12 else ""))
    return {k: out[k] for k in expected}


def _write_cs(out: dict, model_section: dict, out_dir: Path, tgt_fmt: str) -> tuple:
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / f"pytorch_model_to_{tgt_fmt}.mdl"
    cfg_path = out_dir / f"config_to_{tgt_fmt}.yaml"
    _torch_save({"model": out}, ckpt_path)
    _write_yaml(cfg_path, {"model": model_section})
    return ckpt_path, cfg_path


def _check_hf_layout(folder: Path) -> None:
    folder = Path(folder)
    if not folder.exists():
        raise ConversionError(f"{folder}: not found")
    if folder.is_file():
        raise ConversionError(f"{folder} is a file; --src-fmt hf expects the folder holding image_model/ and "
                              f"text_model/ (a file is --src-fmt {guess_format(folder) or 'cs-2.2'})")
    for sub in ("image_model", "text_model"):
        if not (folder / sub).is_dir():
            found = guess_format(folder)
            hint = f" It looks like --src-fmt {found}." if found and found != "hf" else ""
            raise ConversionError(f"{folder}/{sub}/ not found: --src-fmt hf expects {folder}/image_model/ "
                                  f"(CLIP) and {folder}/text_model/ (LLaVA config.json + Llama weights).{hint}")


def read_hf_configs(config_dir: Path) -> tuple:
    """hf layout: (image_model/config.json, text_model/config.json) as dicts."""
    _check_hf_layout(config_dir)
    config_dir = Path(config_dir)
    return read_json(config_dir / "image_model" / "config.json"), read_json(config_dir / "text_model" / "config.json")


def convert_hf_to_cs(checkpoint: Path, config_dir: Path, out_dir: Path, tgt_fmt: str = "cs-2.2",
                     opts: Options = Options()) -> tuple:
    """hf layout (image_model/ + text_model/) -> pytorch_model_to_cs-2.2.mdl + config_to_cs-2.2.yaml."""
    checkpoint, config_dir = Path(checkpoint), Path(config_dir)
    image_cfg, text_cfg = read_hf_configs(config_dir)
    _check_hf_layout(checkpoint)
    image_files = find_weight_files(checkpoint / "image_model")  # every shard checked whole before any work
    text_files = find_weight_files(checkpoint / "text_model")
    model_section = hf_configs_to_cs(image_cfg, text_cfg)
    cfg = parse_cs_config(model_section)
    expected = expected_cs_shapes(cfg)
    config = f"{config_dir}/{{image_model,text_model}}/config.json"
    heads = Heads(cfg.text_model.num_heads, num_kv_heads_of(cfg))
    out: dict = {}
    family = vision_family(cfg)
    image = KeyMapper(True, groups=(family,), strict=opts.strict)
    _stream_into(out, image_files, image, expected, config, opts, "image_model")
    image.finish((family,))
    text = KeyMapper(True, heads, groups=("llama", "projector"), strict=opts.strict)
    _stream_into(out, text_files, text, expected, config, opts, "text_model")
    projector_file = checkpoint / "text_model" / "mm_projector.bin"  # LLaVA stage-1 output beside the weights
    if not text.seen["projector"] and projector_file.is_file():
        print(f"Projector weights from {projector_file}", file=sys.stderr)
        _stream_into(out, [projector_file], text, expected, config, opts, "mm_projector")
    text.finish(("llama",))
    if not text.seen["projector"]:
        dtype = out["text_model.embedding_layer.word_embeddings.weight"].dtype
        print(f"No mm_projector weights in {checkpoint}/text_model (a plain Vicuna): creating a fresh projector "
              f"(uniform +-1/sqrt(fan_in), seed {opts.seed})", file=sys.stderr)
        out.update(fresh_projector(cfg, dtype, opts.seed))
    out = _finish_cs(out, cfg, expected, config)
    return _write_cs(out, model_section, Path(out_dir), tgt_fmt)


def _llava_hf_config_path(config: Path) -> Path:
    config = Path(config)
    path = config / "config.json" if config.is_dir() else config
    if not path.is_file():
        found = guess_format(config)
        hint = f" It looks like --src-fmt {found}." if found and found != "llava-hf" else ""
        raise ConversionError(f"{path}: not found; --src-fmt llava-hf expects a folder with a LlavaConfig "
                              f"config.json.{hint}")
    return path


def convert_llava_hf_to_cs(checkpoint: Path, config: Path, out_dir: Path, tgt_fmt: str = "cs-2.2",
                           opts: Options = Options()) -> tuple:
    """llava-hf folder -> pytorch_model_to_cs-2.2.mdl + config_to_cs-2.2.yaml."""
    checkpoint = Path(checkpoint)
    config_path = _llava_hf_config_path(config)
    hf_config = read_json(config_path)
    if "text_config" not in hf_config and "vision_config" not in hf_config:
        raise ConversionError(f"{config_path} is not a LlavaConfig (no text_config/vision_config); for the LLaVA "
                              "repo layout use --src-fmt hf")
    files = find_weight_files(checkpoint)
    model_section = llava_hf_config_to_cs(hf_config)
    cfg = parse_cs_config(model_section)
    expected = expected_cs_shapes(cfg)
    groups = (vision_family(cfg), "llama", "projector")
    mapper = KeyMapper(True, Heads(cfg.text_model.num_heads, num_kv_heads_of(cfg)), groups=groups,
                       rename=LLAVA_HF_PREFIXES, strict=opts.strict)
    out: dict = {}
    _stream_into(out, files, mapper, expected, str(config_path), opts, "llava-hf")
    mapper.finish(groups)
    out = _finish_cs(out, cfg, expected, str(config_path))
    return _write_cs(out, model_section, Path(out_dir), tgt_fmt)


def _load_cs_and_config(checkpoint: Path, config: Optional[Path]) -> tuple:
    """(state, cfg, model_section, expected shapes, the checkpoint's own params or None) with every key and shape
    checked against the config."""
    state, params = load_cs_checkpoint(checkpoint)
    if config is not None:
        model_section, config_name = read_cs_yaml(config), str(config)
    elif isinstance(params, Mapping) and isinstance(params.get("model"), Mapping):
        model_section, config_name = dict(params["model"]), f"{checkpoint} (__metadata__ params)"
    else:
        raise ConversionError(f"{checkpoint} carries no params; pass the CS yaml with --config")
    cfg = parse_cs_config(model_section)
    expected = expected_cs_shapes(cfg)
    head = "text_model.lm_head.weight"
    unknown = [k for k in state if k not in expected]
    missing = [k for k in expected if k not in state and not (k == head and cfg.text_model.share_embedding_weights)]
    wrong = [f"{k} {list(state[k].shape)} (config: {list(expected[k])})"
             for k in state if k in expected and tuple(state[k].shape) != expected[k]]
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} key(s) the model has no parameter for: {', '.join(unknown[:10])}")
    if missing:
        problems.append(f"{len(missing)} parameter(s) missing: {', '.join(missing[:10])}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {', '.join(wrong[:10])}")
    if problems:
        raise ConversionError(f"{checkpoint} does not match the model of {config_name}:\n  " + "\n  ".join(problems))
    return state, cfg, model_section, expected, params


def convert_cs_to_cs(checkpoint: Path, config: Optional[Path], out_dir: Path, tgt_fmt: str = "cs-2.2",
                     opts: Options = Options()) -> tuple:
    """Any cs checkpoint (torch.save or, with cerebras.pytorch, HDF5; with or without `model.`) -> a converted-style
    {"model": state} .mdl + yaml. Optimizer and other states are dropped."""
    state, cfg, model_section, expected, _ = _load_cs_and_config(Path(checkpoint), config)
    out = {k: _cast(state[k], opts.dtype) for k in expected if k in state}
    out = _finish_cs(out, cfg, expected, str(config or checkpoint))
    return _write_cs(out, model_section, Path(out_dir), tgt_fmt)


def _cs_tensors(state: dict, expected: dict, cfg, progress: bool, desc: str) -> Iterator:
    """Pop CS tensors in model order (each is released once its shard is written); a tied lm_head is skipped
    (HF re-ties it), after checking that it really equals the embeddings."""
    from tqdm import tqdm

    emb, head = "text_model.embedding_layer.word_embeddings.weight", "text_model.lm_head.weight"
    if cfg.text_model.share_embedding_weights and head in state:
        if not _same(state[head], state[emb]):
            raise ConversionError("share_embedding_weights is true but text_model.lm_head.weight differs from the "
                                  "word embeddings; set share_embedding_weights: false in the config")
        del state[head]
    keys = [k for k in expected if k in state]
    for key in tqdm(keys, desc=desc, unit="tensor", disable=not progress):
        yield key, state.pop(key)


def _tokenizer_dir(opts: Options, checkpoint: Path, required: bool) -> Optional[Path]:
    """--tokenizer-dir, else the checkpoint's own folder when it holds tokenizer files."""
    if opts.tokenizer_dir is not None:
        folder = Path(opts.tokenizer_dir)
        if not any((folder / name).is_file() for name in TOKENIZER_FILES[:2]):
            raise ConversionError(f"--tokenizer-dir {folder}: no tokenizer.model or tokenizer.json there")
        return folder
    folder = Path(checkpoint).resolve().parent
    if any((folder / name).is_file() for name in TOKENIZER_FILES[:2]):
        return folder
    if required:
        raise ConversionError("the llava-hf format needs the tokenizer: pass --tokenizer-dir with the Vicuna/LLaVA "
                              "tokenizer files (tokenizer.model or tokenizer.json)")
    return None


def convert_cs_to_hf(checkpoint: Path, config: Optional[Path], out_dir: Path, opts: Options = Options()) -> list:
    """cs-2.2 .mdl + yaml -> OUT/image_model/ (CLIPVisionModel) + OUT/text_model/ (LLaVA), sharded."""
    state, cfg, _, expected, params = _load_cs_and_config(Path(checkpoint), config)
    image_settings = exported_image_settings(cfg, config, params, checkpoint, opts.ignore_transforms)
    tokenizer = _tokenizer_dir(opts, Path(checkpoint), required=False)
    out_dir = Path(out_dir)
    dtype = opts.dtype or _dtype_name(state["text_model.embedding_layer.word_embeddings.weight"])
    image_dir, text_dir = out_dir / "image_model", out_dir / "text_model"
    writers = {"image": ShardedWriter(image_dir, opts.shard_bytes, opts.safetensors),
               "text": ShardedWriter(text_dir, opts.shard_bytes, opts.safetensors)}
    # Configs first: they validate that the CS model is expressible in the LLaVA repo's terms.
    clip_config = cs_to_hf_vision_config(cfg, dtype)
    text_config = cs_to_hf_text_config(cfg, opts.vision_tower or str(image_dir.resolve()), dtype)
    text_config["image_aspect_ratio"] = hf_image_aspect_ratio(image_settings)
    groups = (vision_family(cfg), "llama", "projector")
    mapper = KeyMapper(False, Heads(cfg.text_model.num_heads, num_kv_heads_of(cfg)), groups=groups)
    for key, tensor in _cs_tensors(state, expected, cfg, opts.progress, "cs -> hf"):
        for hf_key, value in mapper.convert(key, tensor):
            writers["image" if hf_key.startswith(CLIP_HF_PREFIX) else "text"].add(hf_key, _cast(value, opts.dtype))
    mapper.finish(groups)
    written = writers["image"].close() + writers["text"].close()
    _write_json(image_dir / "config.json", clip_config)
    _write_json(image_dir / "preprocessor_config.json", preprocessor_config(cfg, image_settings))
    _write_json(text_dir / "config.json", text_config)
    if tokenizer is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer / name).is_file():
                shutil.copy2(tokenizer / name, text_dir / name)
    else:
        print("No tokenizer files copied into text_model/ (pass --tokenizer-dir); the LLaVA repo needs them",
              file=sys.stderr)
    return written + [image_dir / "config.json", text_dir / "config.json"]


# Our chat template: LLaVA-1.5's training format (conv_vicuna_v1, the one the phase-2 data uses), not llava-hf's
# shorter one, so prompts at inference match training: SYSTEM USER: <image>\nQ ASSISTANT: A</s>USER: ...
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system=\"A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.\", turn=0) -%}"
    "{%- for message in messages if message['role'] == 'system' -%}"
    "{%- set ns.system = message['content'] if message['content'] is string else "
    "(message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ')) -%}"
    "{%- endfor -%}"
    "{{- ns.system -}}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}{%- set images = 0 -%}"
    "{%- else -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
    "{%- set images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- (' ' if ns.turn == 0 else '') + 'USER: ' -}}"
    "{%- for _ in range(images) -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{{- text -}}"
    "{%- else -%}"
    "{{- ' ASSISTANT: ' + text + '</s>' -}}"
    "{%- endif -%}"
    "{%- set ns.turn = ns.turn + 1 -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ' ASSISTANT:' -}}{%- endif -%}"
)
IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"
# --chat-template values besides the keys of create_hdf5_dataset.CHAT_TEMPLATES (the table phase-2 data uses).
CHAT_TEMPLATE_SOURCES = ("auto", "vicuna_v1", "tokenizer")
# Put before a chosen Jinja template (the tokenizer's own or a table one): such templates print message['content']
# as a string, while LlavaProcessor users pass [{"type": "image"}, {"type": "text", ...}]. Each list becomes one
# string laid out as training lays out the first user turn: one '<image>\n' per image, then the texts joined by
# '\n'; string contents pass unchanged. The last tag leaves the template's own leading text untouched.
LIST_CONTENT_PRELUDE = (
    "{%- set llava_ns = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is defined and message['content'] is sequence "
    "and message['content'] is not string -%}"
    "{%- set images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
    "| join('\\n') -%}"
    "{%- set message = dict(message, content='" + IMAGE_TOKEN + "\\n' * images + text) -%}"
    "{%- endif -%}"
    "{%- set llava_ns.messages = llava_ns.messages + [message] -%}"
    "{%- endfor -%}"
    "{%- set messages = llava_ns.messages %}"
)


def llava_tokenizer(folder: Path):
    """The text tokenizer with llava-hf's additions: `<image>` (special) when it lacks one, and a `<pad>` pad token
    only when it has no pad token of its own (Llama-2 has none; Qwen's <|endoftext|> is kept, as training used it)."""
    from transformers import AddedToken, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    vocab = tok.get_vocab()
    if IMAGE_TOKEN not in vocab:
        tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tok.pad_token is None and PAD_TOKEN not in vocab:
        tok.add_special_tokens({"pad_token": AddedToken(PAD_TOKEN, special=True, normalized=False)})
    elif tok.pad_token is None:
        tok.pad_token = PAD_TOKEN
    if "token_type_ids" in tok.model_input_names:  # a generic tokenizer's default; generate() refuses that input
        tok.model_input_names = [name for name in tok.model_input_names if name != "token_type_ids"]
        tok.init_kwargs["model_input_names"] = tok.model_input_names  # what save_pretrained writes
    return tok


def _own_template(tok) -> Optional[str]:
    """The tokenizer's chat template (the default one of a named set), or None."""
    own = tok.chat_template
    return own.get("default") if isinstance(own, dict) else own


def chat_template_for(tok, choice: str = "auto") -> str:
    """The processor's chat template for --chat-template `choice` (see CHAT_TEMPLATE_HELP)."""
    import create_hdf5_dataset as hd

    own = _own_template(tok)
    if choice == "auto":
        choice = "tokenizer" if own else "vicuna_v1"
    if choice == "vicuna_v1":
        return CHAT_TEMPLATE  # handles list contents itself; unchanged, so Llama-2 / Vicuna exports stay identical
    if choice == "tokenizer":
        if not own:
            raise ConversionError(f"--chat-template tokenizer: the tokenizer of --tokenizer-dir has no chat_template "
                                  f"(tokenizer_config.json / chat_template.jinja); pass the template the model was "
                                  f"trained with: one of vicuna_v1, {', '.join(hd.CHAT_TEMPLATES)}")
        return LIST_CONTENT_PRELUDE + own
    if choice not in hd.CHAT_TEMPLATES:
        raise ConversionError(f"--chat-template {choice!r}: use one of "
                              f"{', '.join(CHAT_TEMPLATE_SOURCES + tuple(hd.CHAT_TEMPLATES))}")
    return LIST_CONTENT_PRELUDE + hd.CHAT_TEMPLATES[choice]


ANSWER_MARK = "LLAVA-ANSWER-MARK"


def end_of_turn_id(tok, template: str) -> Optional[int]:
    """The special token `template` writes right after an answer (<|eot_id|>, <|im_end|>, </s>), or None."""
    import create_hdf5_dataset as hd

    chat = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ANSWER_MARK}]
    try:
        text = tok.apply_chat_template(chat, chat_template=template, tokenize=False)
    except Exception as e:  # noqa: BLE001 - Jinja raises many types; the message is what matters
        raise ConversionError(f"the chosen chat template fails on a plain user/assistant conversation ({e}); "
                              "choose another --chat-template") from None
    after = text.split(ANSWER_MARK, 1)[1] if ANSWER_MARK in text else ""
    special = hd.special_token_at(tok, after)
    return tok.convert_tokens_to_ids(special) if special else None


def token_ids(tok) -> dict:
    """text_config's bos/eos/pad ids: the tokenizer's, so generate() ends where the model was trained to."""
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def stop_ids(tok, template: str):
    """generation_config.json's eos_token_id: the tokenizer's eos, plus the template's end-of-turn token where that
    differs (a base tokenizer, whose eos is <|end_of_text|>, under the llama3 table template ending in <|eot_id|>)."""
    eos, turn_end = tok.eos_token_id, end_of_turn_id(tok, template)
    if turn_end is None or turn_end == eos:
        return eos
    return [turn_end] if eos is None else [eos, turn_end]


def llava_hf_vocab_rows(n_tokens: int, vocab: int) -> int:
    """Embedding rows of the llava-hf output: `vocab` when the tokenizer fits, else rounded up to a multiple of
    64 as llava-hf does (32000 + <image> + <pad> -> 32064)."""
    return vocab if n_tokens <= vocab else math.ceil(n_tokens / 64) * 64


def grow_rows(t, rows: int):
    """Append rows (new tokens) set to the mean of the existing ones; unused by the image path, harmless for pad."""
    import torch

    if t.shape[0] >= rows:
        return t
    mean = t.float().mean(0, keepdim=True).to(t.dtype)
    return torch.cat((t, mean.expand(rows - t.shape[0], -1)))


SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]


def llava_image_processor(cfg, settings: Optional[dict] = None):
    """LlavaImageProcessor(**settings) when `settings` (image_processor_settings) reproduce the training transforms,
    for either tower: it can pad, crop and resize exactly, SiglipImageProcessor only the last. Else the default of
    the tower: CLIP's pads to a square in the mean colour first (as LLaVA's expand_to_square does) and crops;
    SigLIP's resizes to image_size x image_size, no crop."""
    from transformers import LlavaImageProcessor, SiglipImageProcessor

    if settings is not None:
        return LlavaImageProcessor(**settings)
    size = _square(cfg.image_model.image_size, "model.image_model.image_size")
    if vision_family(cfg) == "siglip":
        return SiglipImageProcessor(do_resize=True, size={"height": size, "width": size}, resample=3,
                                    do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                    image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD,
                                    do_convert_rgb=True)  # its default (unset) fails on a grey image
    return LlavaImageProcessor(do_pad=True, size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                               resample=3, image_mean=CLIP_MEAN, image_std=CLIP_STD)


def llava_processor(cfg, tok, chat_template: str, image_settings: Optional[dict] = None):
    """LlavaProcessor expanding each <image> to the model's image_tokens_of(cfg) tokens: it counts patches, adds
    num_additional_image_tokens (CLIP's CLS) and drops one for strategy "default". image_settings: see
    llava_image_processor."""
    from transformers import LlavaProcessor

    return LlavaProcessor(image_processor=llava_image_processor(cfg, image_settings), tokenizer=tok,
                          patch_size=_square(cfg.image_model.patch_size, "model.image_model.patch_size"),
                          vision_feature_select_strategy=llava_hf_strategy(cfg), chat_template=chat_template,
                          image_token=IMAGE_TOKEN, num_additional_image_tokens=int(cfg.image_model.prepend_cls_token))


def convert_cs_to_llava_hf(checkpoint: Path, config: Optional[Path], out_dir: Path, opts: Options = Options()) -> list:
    """cs-2.2 .mdl + yaml -> a llava-hf folder (weights, config, generation config, tokenizer with <image> (and
    <pad> when it has no pad token), processor with the --chat-template template)."""
    from transformers import GenerationConfig

    state, cfg, _, expected, params = _load_cs_and_config(Path(checkpoint), config)
    image_settings = exported_image_settings(cfg, config, params, checkpoint, opts.ignore_transforms)
    tok = llava_tokenizer(_tokenizer_dir(opts, Path(checkpoint), required=True))
    template = chat_template_for(tok, opts.chat_template)
    vocab = cfg.text_model.vocab_size
    rows = llava_hf_vocab_rows(len(tok), vocab)
    if rows != vocab:
        print(f"Growing embeddings and lm_head from {vocab} to {rows} rows for the added tokens ({len(tok)} in the "
              f"tokenizer)", file=sys.stderr)
    dtype = opts.dtype or _dtype_name(state["text_model.embedding_layer.word_embeddings.weight"])
    ids = token_ids(tok)
    hf_config = cs_to_llava_hf_config(cfg, tok.convert_tokens_to_ids(IMAGE_TOKEN), tok.pad_token_id, dtype, ids)
    hf_config["text_config"]["vocab_size"] = rows
    out_dir = Path(out_dir)
    # Always safetensors: transformers' own format, and on torch < 2.6 (the Cerebras environment) it refuses .bin.
    writer = ShardedWriter(out_dir, opts.shard_bytes, safetensors=True)
    groups = (vision_family(cfg), "llama", "projector")
    mapper = KeyMapper(False, Heads(cfg.text_model.num_heads, num_kv_heads_of(cfg)), groups=groups)
    for key, tensor in _cs_tensors(state, expected, cfg, opts.progress, "cs -> llava-hf"):
        for hf_key, value in mapper.convert(key, tensor):
            if hf_key in ("model.embed_tokens.weight", "lm_head.weight"):
                value = grow_rows(value, rows)
            writer.add(hf_to_llava_hf_key(hf_key), _cast(value, opts.dtype))
    mapper.finish(groups)
    written = writer.close()
    _write_json(out_dir / "config.json", hf_config)
    GenerationConfig(**dict(ids, eos_token_id=stop_ids(tok, template))).save_pretrained(str(out_dir))
    llava_processor(cfg, tok, template, image_settings).save_pretrained(str(out_dir))
    return written + [out_dir / "config.json"]


# ==============================================================================================
# 7. Command line
# ==============================================================================================

CS_FORMATS = tuple(f"cs-2.{i}" for i in range(2, 10)) + ("cs-current", "cs-auto")  # one mapping for all (spec 9)
FORMATS = ("hf", "llava-hf") + CS_FORMATS
CONVERSIONS = {  # (src, tgt) -> note for `list`
    ("hf", "cs"): "DIR/image_model/ (CLIP: CLIPModel or CLIPVisionModel config + weights) and DIR/text_model/ "
                  "(LLaVA config.json with mm_* fields, Llama/Vicuna weights, sharded .bin or .safetensors). "
                  "Pass DIR as --config and as the checkpoint. No mm_projector weights (plain Vicuna): a fresh "
                  "projector is created. Writes pytorch_model_to_cs-2.2.mdl + config_to_cs-2.2.yaml.",
    ("cs", "hf"): "A run.py checkpoint (.mdl, with or without the `model.` prefix) + its params yaml as --config. "
                  "Writes OUT/image_model/ and OUT/text_model/ (mm_vision_tower -> OUT/image_model, or "
                  "--vision-tower PATH_OR_HUB_ID); rename "
                  "text_model to a name containing 'llava' for the LLaVA repo. --tokenizer-dir copies tokenizer files.",
    ("llava-hf", "cs"): "A transformers LlavaForConditionalGeneration folder (config.json + weights).",
    ("cs", "llava-hf"): "Writes a folder LlavaForConditionalGeneration/AutoProcessor load (safetensors); needs "
                        "--tokenizer-dir (adds <image>, and <pad> when it has no pad token; grows the embeddings to "
                        "a multiple of 64 when they do not fit). --chat-template picks the processor's template.",
    ("cs", "cs"): "Re-saves the model weights of a checkpoint (e.g. a cerebras.pytorch HDF5 .mdl, read in the "
                  "Cerebras environment) as a torch.save .mdl without the `model.` prefix, checked against --config.",
}


def _kind(fmt: str) -> str:
    return "cs" if fmt in CS_FORMATS else fmt


def _cs_name(fmt: str) -> str:
    """Output file suffix: the named cs version, cs-current/cs-auto -> cs-2.2 (the layout all versions share)."""
    return "cs-2.2" if fmt in ("cs-current", "cs-auto") else fmt


def cmd_list(args) -> int:
    cs = "cs-2.2 ... cs-2.9"
    rows = [("llava", cs if src == "cs" else src, cs if tgt == "cs" else tgt, note)
            for (src, tgt), note in CONVERSIONS.items()]
    if args.model not in ("all", "llava"):
        print(f"No converters for model {args.model!r}; models: llava")
        return 1
    widths = [max(len(r[i]) for r in rows + [("model", "src-fmt", "tgt-fmt", "")]) for i in range(3)]
    print("  ".join(h.ljust(w) for h, w in zip(("model", "src-fmt", "tgt-fmt"), widths))
          + ("" if args.hide_notes else "  notes"))
    for row in rows:
        line = "  ".join(c.ljust(w) for c, w in zip(row[:3], widths))
        print(line + ("" if args.hide_notes else "  " + row[3]))
    return 0


def _check_ignore_transforms(args) -> None:
    if args.ignore_transforms and _kind(args.tgt_fmt) not in ("hf", "llava-hf"):
        raise ConversionError(f"--ignore-transforms only applies to --tgt-fmt hf and llava-hf (it picks their image "
                              f"processor); --tgt-fmt {args.tgt_fmt} writes none: drop the option")


def _options(args) -> Options:
    _check_ignore_transforms(args)
    if args.chat_template is not None and _kind(args.tgt_fmt) != "llava-hf":
        raise ConversionError(f"--chat-template only applies to --tgt-fmt llava-hf (it sets the processor's chat "
                              f"template); --tgt-fmt {args.tgt_fmt} has no processor: drop the option")
    return Options(shard_bytes=parse_size(args.hf_shard_size), safetensors=args.export_safetensors,
                   dtype=args.dtype, progress=not args.no_progress_bar, strict=not args.drop_unmatched_keys,
                   tokenizer_dir=Path(args.tokenizer_dir) if args.tokenizer_dir else None, seed=args.seed,
                   chat_template=args.chat_template or "auto", ignore_transforms=args.ignore_transforms)


def _check_pair(src: str, tgt: str) -> tuple:
    pair = (_kind(src), _kind(tgt))
    if pair not in CONVERSIONS:
        supported = ", ".join(f"{a}->{b}" for a, b in CONVERSIONS)
        raise ConversionError(f"--src-fmt {src} --tgt-fmt {tgt} is not supported; supported: {supported} "
                              "(go through cs-2.2 for hf <-> llava-hf)")
    if tgt == "cs-auto":
        raise ConversionError("--tgt-fmt cs-auto is only a source format; use cs-2.2 or cs-current")
    return pair


def _vision_tower(args, out: Path) -> Optional[str]:
    """--vision-tower exactly as given; for --tgt-fmt hf the default is the absolute path of OUT/image_model."""
    if _kind(args.tgt_fmt) != "hf":
        if args.vision_tower is not None:
            raise ConversionError(f"--vision-tower only applies to --tgt-fmt hf (it sets mm_vision_tower in "
                                  f"text_model/config.json); --tgt-fmt {args.tgt_fmt} output has no such field, it "
                                  "carries the vision tower itself: drop the option")
        return None
    if args.vision_tower is not None and not args.vision_tower.strip():
        raise ConversionError("--vision-tower is empty; give a path or a hub id such as "
                              "openai/clip-vit-large-patch14-336, or leave it out for OUT/image_model")
    return args.vision_tower if args.vision_tower is not None else str((out / "image_model").resolve())


def _check_output(tgt: str, out: Path) -> None:
    """Before any work: an hf/llava-hf output folder must not already hold weights."""
    folders = {"hf": [out / "image_model", out / "text_model"], "llava-hf": [out]}.get(tgt, [])
    for folder in folders:
        check_no_weights(folder)


def _convert(pair: tuple, src: Path, config: Optional[Path], out: Path, tgt_fmt: str, opts: Options) -> tuple:
    """Run one conversion into `out`: ([checkpoint paths], [config paths])."""
    to_cs = {("hf", "cs"): convert_hf_to_cs, ("llava-hf", "cs"): convert_llava_hf_to_cs, ("cs", "cs"): convert_cs_to_cs}
    if pair in to_cs:
        ckpt, cfg = to_cs[pair](src, config, out, _cs_name(tgt_fmt), opts)
        return [ckpt], [cfg]
    if pair == ("cs", "hf"):
        convert_cs_to_hf(src, config, out, opts)
        return [out / "image_model", out / "text_model"], [out / "image_model" / "config.json",
                                                           out / "text_model" / "config.json"]
    convert_cs_to_llava_hf(src, config, out, opts)
    return [out], [out / "config.json"]


def _final(paths: list, stage: Path, out: Path) -> str:
    """Paths written under the staging folder, named where they are now."""
    return ", ".join(str(out / Path(p).relative_to(stage)) for p in paths)


def cmd_convert(args) -> int:
    pair = _check_pair(args.src_fmt, args.tgt_fmt)
    opts = _options(args)
    src = Path(args.checkpoint)
    out = Path(args.output_dir) if args.output_dir else (src if src.is_dir() else src.parent)
    opts.vision_tower = _vision_tower(args, out)
    if not src.exists():
        raise ConversionError(f"{src}: not found")
    if pair[0] != "cs" and src.is_file():
        raise ConversionError(f"{src} is a file; --src-fmt {args.src_fmt} expects a folder "
                              f"(a single .mdl file is --src-fmt cs-2.2)")
    config = Path(args.config) if args.config else (src if pair[0] != "cs" else None)
    _check_output(pair[1], out)
    start = time.time()
    with staged_output(out) as stage:  # nothing reaches `out` unless the whole conversion succeeds
        saved, configs = _convert(pair, src, config, stage, args.tgt_fmt, opts)
    print(f"Checkpoint saved to {_final(saved, stage, out)}")
    print(f"Config saved to {_final(configs, stage, out)}")
    print(f"({time.time() - start:.1f} s)")
    return 0


def _write_configs(pair: tuple, src: Path, out: Path, tgt_fmt: str, vision_tower: Optional[str],
                   ignore_transforms: bool = False) -> list:
    """convert-config: the converted config file(s) written into `out`."""
    if pair[1] == "cs":
        if pair[0] == "cs":
            section = read_cs_yaml(src)
        elif pair[0] == "hf":
            section = hf_configs_to_cs(*read_hf_configs(src))
        else:
            section = llava_hf_config_to_cs(read_json(_llava_hf_config_path(src)))
        parse_cs_config(section)  # the (converted) section must be one run.py accepts
        path = out / f"config_to_{_cs_name(tgt_fmt)}.yaml"
        _write_yaml(path, {"model": section})
        return [path]
    cfg = parse_cs_config(read_cs_yaml(src))
    if pair[1] == "hf":
        (out / "image_model").mkdir()
        (out / "text_model").mkdir()
        written = [out / "image_model" / "config.json", out / "image_model" / "preprocessor_config.json",
                   out / "text_model" / "config.json"]
        image_settings = exported_image_settings(cfg, src, None, None, ignore_transforms)
        text_config = cs_to_hf_text_config(cfg, vision_tower)
        text_config["image_aspect_ratio"] = hf_image_aspect_ratio(image_settings)
        _write_json(written[0], cs_to_hf_vision_config(cfg))
        _write_json(written[1], preprocessor_config(cfg, image_settings))
        _write_json(written[2], text_config)
        return written
    vocab = cfg.text_model.vocab_size  # without a tokenizer, assume llava-hf's: <image> = vocab, <pad> = vocab + 1
    hf_config = cs_to_llava_hf_config(cfg, vocab, vocab + 1)
    hf_config["text_config"]["vocab_size"] = llava_hf_vocab_rows(vocab + 2, vocab)
    _write_json(out / "config.json", hf_config)
    return [out / "config.json"]


def cmd_convert_config(args) -> int:
    pair = _check_pair(args.src_fmt, args.tgt_fmt)
    _check_ignore_transforms(args)
    src = Path(args.config_file)
    out = Path(args.output_dir) if args.output_dir else (src if src.is_dir() else src.parent)
    vision_tower = _vision_tower(args, out)
    with staged_output(out) as stage:
        written = _write_configs(pair, src, stage, args.tgt_fmt, vision_tower, args.ignore_transforms)
    print(f"Config saved to {_final(written, stage, out)}")
    return 0


def _load_any(path: Path) -> dict:
    """A state dict from a .mdl/.bin/.safetensors file or an HF folder (all shards)."""
    path = Path(path)
    if path.is_file():
        if path.suffix in (".bin", ".safetensors"):
            return load_weight_file(path)
        return load_cs_checkpoint(path)[0]
    state = {}
    for sub in ([path] if guess_format(path) != "hf" else [path / "image_model", path / "text_model"]):
        for f in find_weight_files(sub):
            state.update(load_weight_file(f))
    return state


def cmd_diff(args) -> int:
    import torch

    left, right = _load_any(Path(args.left)), _load_any(Path(args.right))
    only_left = sorted(set(left) - set(right))
    only_right = sorted(set(right) - set(left))
    differ = []
    for key in sorted(set(left) & set(right)):
        a, b = left[key], right[key]
        if a.shape != b.shape or a.dtype != b.dtype:
            differ.append(f"{key}: {list(a.shape)} {a.dtype} vs {list(b.shape)} {b.dtype}")
        elif not (torch.equal(a, b) if args.tensor_comparison_op == "equal" else torch.allclose(a.float(), b.float())):
            differ.append(f"{key}: values differ (max abs {float((a.float() - b.float()).abs().max()):.3g})")
    for title, items in (("only in left", only_left), ("only in right", only_right), ("different", differ)):
        if items:
            print(f"{len(items)} {title}:\n  " + "\n  ".join(items[:50]))
    same = not (only_left or only_right or differ)
    print(f"{len(set(left) & set(right))} common keys; " + ("identical" if same else "checkpoints differ"))
    return 0 if same else 1


IGNORE_TRANSFORMS_HELP = ("hf / llava-hf output: write the tower's default image processor (CLIP: pad in the mean "
                          "colour, bicubic resize, CLIP mean/std; SigLIP: bicubic square resize, mean = std = 0.5) "
                          "instead of one that reproduces the config's eval_input (else train_input) transforms; "
                          "for transforms the processor cannot express. Its pixels differ from training's")
VISION_TOWER_HELP = ("hf output: the mm_vision_tower of text_model/config.json, written exactly as given. The LLaVA "
                     "repo accepts a path that exists where it runs (a relative one is taken from its working "
                     "directory) or a hub id starting with openai/ or laion/, e.g. openai/clip-vit-large-patch14-336 "
                     "(it then loads that CLIP instead of OUT/image_model: right when the vision tower stayed frozen "
                     "in training). Default: the absolute path of OUT/image_model, which breaks when the export is "
                     "moved or copied elsewhere: then set mm_vision_tower in text_model/config.json to the new "
                     "image_model path, or convert again with --vision-tower NEW_PATH/image_model")


CHAT_TEMPLATE_HELP = ("llava-hf output: the chat template of the processor. auto (default): the --tokenizer-dir "
                      "tokenizer's own chat_template when it has one, else vicuna_v1. vicuna_v1: LLaVA-1.5's training "
                      "format (SYSTEM USER: <image>\\nQ ASSISTANT: A</s>). tokenizer: the tokenizer's own, an error "
                      "when it has none. llama3, qwen2, mistral: the templates of create_hdf5_dataset.py's "
                      "dataset.system_prompt_style of the same name. Choose what the phase-2 data was built with. A "
                      "Jinja template (all but vicuna_v1) gets a prelude that turns a message's content list into one "
                      "string: one <image>\\n per image item, then the text items joined by newlines")


def build_parser() -> argparse.ArgumentParser:
    import create_hdf5_dataset as hd  # the chat templates phase-2 data is built with

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list supported conversions")
    p.add_argument("model", nargs="?", default="all")
    p.add_argument("--hide-notes", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("convert", help="convert a checkpoint (and its config)")
    p.add_argument("checkpoint", help="source checkpoint: hf/llava-hf folder or cs .mdl file")
    p.add_argument("--model", required=True, choices=["llava"])
    p.add_argument("--src-fmt", required=True, choices=FORMATS)
    p.add_argument("--tgt-fmt", required=True, choices=FORMATS)
    p.add_argument("--config", help="hf/llava-hf: the source folder (default: the checkpoint); cs: the params yaml")
    p.add_argument("--output-dir", help="default: the checkpoint's folder")
    p.add_argument("--hf-shard-size", default="10GB", help="max shard size of hf/llava-hf output (default 10GB)")
    p.add_argument("--export-safetensors", action="store_true", help="hf output: .safetensors instead of .bin "
                   "(llava-hf output is always .safetensors)")
    p.add_argument("--dtype", choices=DTYPES, help="cast floating tensors (default: keep the checkpoint's dtype)")
    p.add_argument("--tokenizer-dir", help="tokenizer files for hf (copied) / llava-hf (required) output")
    p.add_argument("--drop-unmatched-keys", action="store_true", help="drop (and list) unknown source keys "
                   "instead of failing")
    p.add_argument("--seed", type=int, default=0, help="seed of a fresh projector (plain Vicuna input)")
    p.add_argument("--vision-tower", metavar="PATH_OR_HUB_ID", help=VISION_TOWER_HELP)
    p.add_argument("--chat-template", choices=CHAT_TEMPLATE_SOURCES + tuple(hd.CHAT_TEMPLATES),
                   help=CHAT_TEMPLATE_HELP)
    p.add_argument("--ignore-transforms", action="store_true", help=IGNORE_TRANSFORMS_HELP)
    p.add_argument("--no-progress-bar", "--no_progress", dest="no_progress_bar", action="store_true")
    p.add_argument("--debug", action="store_true", help="show the traceback on failure")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("convert-config", help="convert a config only (no weights)")
    p.add_argument("config_file", help="hf: the folder with image_model/ text_model/; llava-hf: folder or "
                   "config.json; cs: the params yaml")
    p.add_argument("--model", required=True, choices=["llava"])
    p.add_argument("--src-fmt", required=True, choices=FORMATS)
    p.add_argument("--tgt-fmt", required=True, choices=FORMATS)
    p.add_argument("--output-dir")
    p.add_argument("--vision-tower", metavar="PATH_OR_HUB_ID", help=VISION_TOWER_HELP)
    p.add_argument("--ignore-transforms", action="store_true", help=IGNORE_TRANSFORMS_HELP)
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_convert_config)

    p = sub.add_parser("diff", help="compare two checkpoints key by key")
    p.add_argument("left")
    p.add_argument("right")
    p.add_argument("--tensor_comparison_op", "--tensor-comparison-op", choices=["equal", "allclose"],
                   default="equal")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_diff)
    return parser


def main(argv=None) -> int:
    import create_hdf5_dataset as hd  # its yaml reader and error

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConversionError as e:
        if getattr(args, "debug", False):
            raise
        print(f"Conversion failed: {e}", file=sys.stderr)
        return 1
    except hd.YamlFileError as e:  # a --config that is not valid yaml
        if getattr(args, "debug", False):
            raise
        print(f"Conversion failed: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
