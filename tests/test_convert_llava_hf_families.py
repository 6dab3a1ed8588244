"""convert_checkpoint.py llava-hf <-> cs-2.2 for every tower x text family transformers' LlavaForConditionalGeneration
takes here (CLIP, SigLIP x Llama-3, Mistral, Qwen2, Qwen3), and what the cs-2.2 -> llava-hf export carries from the
tokenizer: its chat template (--chat-template), <image>, its pad token, its bos/eos/pad ids, and a processor that
expands <image> to the model's image token count.

Tiny random fp32 models and a tiny byte-level BPE tokenizer trained in the test; offline, CPU, seconds. The
Llama-3.1 / Qwen3 tokenizer checks read REFERENCE_TOKENIZERS and skip when it is not there.

    python -m pytest -q tests/test_convert_llava_hf_families.py
"""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from transformers import (AutoProcessor, AutoTokenizer, CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, MistralConfig, Qwen2Config, Qwen3Config, SiglipVisionConfig)

import convert_checkpoint as cc
import create_hdf5_dataset as hd
from test_convert_checkpoint import our_logits, randomize_, run_cli

REFERENCE_TOKENIZERS = Path(os.environ.get("LLAVA_REFERENCE_TOKENIZERS", "/work/shared/reference_data/tokenizer"))
TOL = 1e-5
BPE_SIZE = 300  # the tiny tokenizer's size: <image> gets id 300, inside the models' 320 rows (no growth)
VOCAB = 320
NUM_PATCHES = 16  # (28 / 7) ** 2; neither tower's strategy keeps CLS
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}
TEXT_CONFIGS = {  # family -> config of the tiny text model (Qwen2 tied, as Qwen2-0.5B/1.5B ship)
    "llama3": lambda: LlamaConfig(**TEXT, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING, tie_word_embeddings=False),
    "mistral": lambda: MistralConfig(**TEXT, rope_theta=1e6, sliding_window=64, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**TEXT, rope_theta=1e6, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**TEXT, head_dim=24, rope_theta=1e6, tie_word_embeddings=False),
}
VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
           patch_size=7)
TOWERS = {  # tower -> (vision config, vision_feature_select_strategy): SigLIP has no CLS, so "full"
    "clip": (lambda: CLIPVisionConfig(**VIT, hidden_act="quick_gelu", layer_norm_eps=1e-5), "default"),
    "siglip": (lambda: SiglipVisionConfig(**VIT, vision_use_head=False), "full"),
}
# Fields of the round-tripped text_config that may differ: the ids follow the tokenizer; the rest is bookkeeping.
FREE_TEXT_FIELDS = {"bos_token_id", "eos_token_id", "pad_token_id", "_name_or_path", "torch_dtype", "dtype",
                    "transformers_version", "architectures"}
TEXTS = ["A chat between a curious user and an artificial intelligence assistant.",
         "What is shown in the picture? A blue vase on a wooden table.",
         "The assistant gives helpful, detailed, and polite answers to the user's questions."] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
IMAGE_AND_QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]


def convert(*args) -> None:
    assert run_cli("convert", "--model", "llava", "--no-progress-bar", *args) == 0


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """A tiny ChatML tokenizer as Qwen2-Instruct ships it (eos <|im_end|>, pad <|endoftext|>, the qwen2 template),
    and its base variant (eos <|endoftext|>, no pad, no template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=BPE_SIZE, special_tokens=SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    root = tmp_path_factory.mktemp("bpe")
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            chat_template=hd.CHAT_TEMPLATES["qwen2"]).save_pretrained(root / "instruct")
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(root / "base")
    assert len(AutoTokenizer.from_pretrained(root / "base")) == BPE_SIZE
    return {"instruct": root / "instruct", "base": root / "base"}


def tiny_llava_hf(tower: str, text: str) -> LlavaForConditionalGeneration:
    vision_config, strategy = TOWERS[tower]
    torch.manual_seed(0)
    config = LlavaConfig(vision_config=vision_config(), text_config=TEXT_CONFIGS[text](), image_token_index=BPE_SIZE,
                         vision_feature_layer=-2, vision_feature_select_strategy=strategy,
                         image_seq_length=NUM_PATCHES)
    return randomize_(LlavaForConditionalGeneration(config).eval())


def llava_inputs(start: int):
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 28, 28, generator=g)
    ids = torch.randint(3, BPE_SIZE, (2, 40), generator=g, dtype=torch.int32)
    hf_ids = ids.clone().long()
    hf_ids[:, start:start + NUM_PATCHES] = BPE_SIZE
    return pixels, ids, hf_ids


def to_cs(src: Path, out: Path) -> tuple:
    convert("--src-fmt", "llava-hf", "--tgt-fmt", "cs-2.2", "--output-dir", out, src)
    cs = torch.load(out / "pytorch_model_to_cs-2.2.mdl", weights_only=True)["model"]
    return cs, yaml.safe_load((out / "config_to_cs-2.2.yaml").read_text())["model"]


def to_llava_hf(cs_dir: Path, out: Path, tokenizer: Path, *extra) -> Path:
    convert("--src-fmt", "cs-2.2", "--tgt-fmt", "llava-hf", "--config", cs_dir / "config_to_cs-2.2.yaml",
            "--tokenizer-dir", tokenizer, "--output-dir", out, *extra, cs_dir / "pytorch_model_to_cs-2.2.mdl")
    return out


@pytest.fixture(scope="module")
def cs_models(tmp_path_factory):
    """tower -> a cs-2.2 folder converted from a tiny llava-hf model (Qwen2 text) with that tower."""
    root = tmp_path_factory.mktemp("cs_models")
    for tower in TOWERS:
        tiny_llava_hf(tower, "qwen2").save_pretrained(root / f"{tower}_src")
        to_cs(root / f"{tower}_src", root / tower)
    return {tower: root / tower for tower in TOWERS}


# ----------------------------------------------------------------------------------------------
# llava-hf -> cs-2.2 -> llava-hf, every tower x text family


@pytest.mark.parametrize("text", sorted(TEXT_CONFIGS))
@pytest.mark.parametrize("tower", sorted(TOWERS))
def test_llava_hf_round_trips_through_cs_exactly(tmp_path, tokenizers, tower, text):
    hf = tiny_llava_hf(tower, text)
    hf.save_pretrained(tmp_path / "src")
    cs, section = to_cs(tmp_path / "src", tmp_path / "cs")
    assert section["image_model"]["prepend_cls_token"] is (tower == "clip")
    pixels, ids, hf_ids = llava_inputs(section["image_start_idx"])
    with torch.no_grad():
        theirs = hf(input_ids=hf_ids, pixel_values=pixels).logits
    assert (our_logits(section, cs, pixels, ids) - theirs).abs().max() <= TOL  # our model = transformers'

    out = to_llava_hf(tmp_path / "cs", tmp_path / "back", tokenizers["instruct"])
    original = cc.load_weight_file(tmp_path / "src" / "model.safetensors")
    written = cc.load_weight_file(out / "model.safetensors")
    assert written.keys() == original.keys() and all(torch.equal(written[k], original[k]) for k in original)
    reloaded = LlavaForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        assert (reloaded(input_ids=hf_ids, pixel_values=pixels).logits - theirs).abs().max() <= TOL

    before, after = hf.config, LlavaConfig.from_pretrained(out)
    for key in ("image_token_index", "vision_feature_layer", "vision_feature_select_strategy", "image_seq_length",
                "projector_hidden_act", "multimodal_projector_bias"):
        assert getattr(after, key) == getattr(before, key), key
    assert after.vision_config.model_type == before.vision_config.model_type
    for key, value in before.text_config.to_dict().items():
        if key not in FREE_TEXT_FIELDS:
            assert getattr(after.text_config, key) == value, key
    assert after.get_text_config(decoder=True).tie_word_embeddings is (text == "qwen2")


# ----------------------------------------------------------------------------------------------
# The export's processor: image tokens, image processor, chat template, ids


@pytest.mark.parametrize("tower", sorted(TOWERS))
def test_processor_expands_image_to_the_models_image_tokens_and_generate_runs(tmp_path, tokenizers, cs_models, tower):
    out = to_llava_hf(cs_models[tower], tmp_path / "out", tokenizers["instruct"])
    processor = AutoProcessor.from_pretrained(out)
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert model.config.image_seq_length == NUM_PATCHES
    prompt = processor.apply_chat_template(IMAGE_AND_QUESTION, add_generation_prompt=True)
    batch = processor(text=prompt, images=Image.new("RGB", (56, 28), (200, 30, 30)), return_tensors="pt")
    assert int((batch["input_ids"] == model.config.image_token_index).sum()) == NUM_PATCHES
    assert batch["pixel_values"].shape == (1, 3, 28, 28)
    image_processor = processor.image_processor
    if tower == "siglip":  # SigLIP's own preprocessing: a square resize, bicubic, mean = std = 0.5, no crop
        assert type(image_processor).__name__.startswith("SiglipImageProcessor")
        assert dict(image_processor.size) == {"height": 28, "width": 28} and image_processor.resample == 3
        assert list(image_processor.image_mean) == list(image_processor.image_std) == [0.5, 0.5, 0.5]
        assert abs(image_processor.rescale_factor - 1 / 255) < 1e-12
        assert not getattr(image_processor, "do_center_crop", False)
    else:
        assert type(image_processor).__name__.startswith("LlavaImageProcessor")
    with torch.no_grad():
        tokens = model.generate(**batch, max_new_tokens=3, do_sample=False)
    prompt_length = batch["input_ids"].shape[1]
    assert prompt_length < tokens.shape[1] <= prompt_length + 3
    assert torch.equal(tokens[:, :prompt_length], batch["input_ids"])


@pytest.mark.parametrize("tower,image_size,tokens", [("siglip", 384, 729), ("clip", 336, 576)])
def test_processor_of_a_full_size_tower_expands_image_to_its_feature_count(tokenizers, cs_models, tower, image_size,
                                                                           tokens):
    section = yaml.safe_load((cs_models[tower] / "config_to_cs-2.2.yaml").read_text())["model"]
    section["image_model"].update(image_size=[image_size] * 2, patch_size=[14, 14])
    section["text_model"]["max_position_embeddings"] = 1024  # room for the image tokens
    cfg = cc.parse_cs_config(section)
    assert cc.image_tokens_of(cfg) == tokens
    processor = cc.llava_processor(cfg, cc.llava_tokenizer(tokenizers["instruct"]), cc.CHAT_TEMPLATE)
    batch = processor(text="<image>\nWhat?", images=Image.new("RGB", (500, 400)), return_tensors="pt")
    assert int((batch["input_ids"] == BPE_SIZE).sum()) == tokens
    assert batch["pixel_values"].shape == (1, 3, image_size, image_size)


def assert_list_contents_render_as_strings(processor, tokenizer) -> None:
    """The processor renders content lists exactly as the tokenizer's own template renders "<image>\\nQ"."""
    got = processor.apply_chat_template(IMAGE_AND_QUESTION, add_generation_prompt=True)
    want = tokenizer.apply_chat_template([{"role": "user", "content": "<image>\nWhat?"}], add_generation_prompt=True,
                                         tokenize=False)
    assert got == want
    turns = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "Look."}, {"type": "image"},
                                          {"type": "text", "text": "What?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "A vase."}]},
             {"role": "user", "content": "Which colour?"}]
    strings = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nLook.\nWhat?"},
               {"role": "assistant", "content": "A vase."}, {"role": "user", "content": "Which colour?"}]
    assert processor.apply_chat_template(turns, add_generation_prompt=True) == tokenizer.apply_chat_template(
        strings, add_generation_prompt=True, tokenize=False)


def test_auto_carries_the_tokenizers_own_template_into_the_processor(tmp_path, tokenizers, cs_models):
    out = to_llava_hf(cs_models["clip"], tmp_path / "out", tokenizers["instruct"])
    assert_list_contents_render_as_strings(AutoProcessor.from_pretrained(out),
                                           AutoTokenizer.from_pretrained(tokenizers["instruct"]))


@pytest.mark.parametrize("name", ["llama3_1_hf", "qwen3_hf"])
def test_reference_tokenizer_templates_and_ids_reach_the_processor(tmp_path, cs_models, name):
    folder = REFERENCE_TOKENIZERS / name
    if not (folder / "tokenizer_config.json").is_file():
        pytest.skip(f"{folder} is not here (set LLAVA_REFERENCE_TOKENIZERS to a folder holding {name}/)")
    own = AutoTokenizer.from_pretrained(folder)
    tok = cc.llava_tokenizer(folder)
    cfg = cc.parse_cs_config(yaml.safe_load((cs_models["clip"] / "config_to_cs-2.2.yaml").read_text())["model"])
    template = cc.chat_template_for(tok, "auto")
    assert template == cc.LIST_CONTENT_PRELUDE + own.chat_template
    cc.llava_processor(cfg, tok, template).save_pretrained(tmp_path / "processor")
    assert_list_contents_render_as_strings(AutoProcessor.from_pretrained(tmp_path / "processor"), own)

    ids = cc.token_ids(tok)
    assert ids["eos_token_id"] == own.convert_tokens_to_ids("<|eot_id|>" if name == "llama3_1_hf" else "<|im_end|>")
    assert cc.stop_ids(tok, template) == ids["eos_token_id"]  # the template ends a turn with eos itself
    if name == "llama3_1_hf":  # no pad token of its own: <pad> is added
        assert own.pad_token is None and tok.pad_token == "<pad>"
    else:  # Qwen's own <|endoftext|> is kept
        assert tok.pad_token == own.pad_token == "<|endoftext|>"
    assert tok.convert_tokens_to_ids("<image>") == len(own)


def test_instruct_tokenizer_keeps_its_pad_and_sets_eos_for_generate(tmp_path, tokenizers, cs_models):
    out = to_llava_hf(cs_models["siglip"], tmp_path / "out", tokenizers["instruct"])
    tok = AutoTokenizer.from_pretrained(out)
    im_end, endoftext = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert "<pad>" not in tok.get_vocab() and tok.pad_token == "<|endoftext|>"
    assert tok.convert_tokens_to_ids("<image>") == BPE_SIZE
    config = json.loads((out / "config.json").read_text())
    assert config["pad_token_id"] == endoftext and config["text_config"]["vocab_size"] == VOCAB
    assert (config["text_config"]["eos_token_id"], config["text_config"]["pad_token_id"]) == (im_end, endoftext)
    assert config["text_config"]["bos_token_id"] is None
    generation = GenerationConfig.from_pretrained(out)
    assert (generation.eos_token_id, generation.pad_token_id) == (im_end, endoftext)


def test_table_template_for_a_base_tokenizer_also_stops_at_its_end_of_turn_token(tmp_path, tokenizers, cs_models):
    out = to_llava_hf(cs_models["clip"], tmp_path / "out", tokenizers["base"], "--chat-template", "qwen2")
    processor = AutoProcessor.from_pretrained(out)
    tok = processor.tokenizer
    assert tok.pad_token == "<pad>" and tok.convert_tokens_to_ids("<pad>") == BPE_SIZE + 1  # it had none
    table = AutoTokenizer.from_pretrained(tokenizers["instruct"])  # the same vocabulary, with the qwen2 template
    assert_list_contents_render_as_strings(processor, table)
    eos, im_end = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    assert json.loads((out / "config.json").read_text())["text_config"]["eos_token_id"] == eos
    assert GenerationConfig.from_pretrained(out).eos_token_id == [eos, im_end]


def test_chat_template_choices(tmp_path, tokenizers, cs_models, capsys):
    cs = cs_models["clip"]
    # a tokenizer without a template: auto is LLaVA-1.5's vicuna_v1, unchanged
    out = to_llava_hf(cs, tmp_path / "auto", tokenizers["base"])
    assert AutoProcessor.from_pretrained(out).chat_template == cc.CHAT_TEMPLATE
    # vicuna_v1 wins over the tokenizer's own template when asked for
    out = to_llava_hf(cs, tmp_path / "vicuna", tokenizers["instruct"], "--chat-template", "vicuna_v1")
    assert AutoProcessor.from_pretrained(out).chat_template == cc.CHAT_TEMPLATE
    out = to_llava_hf(cs, tmp_path / "llama3", tokenizers["instruct"], "--chat-template", "llama3")
    assert AutoProcessor.from_pretrained(out).chat_template == cc.LIST_CONTENT_PRELUDE + hd.CHAT_TEMPLATES["llama3"]

    args = ("convert", "--model", "llava", "--src-fmt", "cs-2.2", "--config", cs / "config_to_cs-2.2.yaml",
            "--tokenizer-dir", tokenizers["base"], "--no-progress-bar")
    assert run_cli(*args, "--tgt-fmt", "llava-hf", "--output-dir", tmp_path / "x", "--chat-template", "tokenizer",
                   cs / "pytorch_model_to_cs-2.2.mdl") == 1
    err = capsys.readouterr().err
    assert "has no chat_template" in err and "vicuna_v1, llama3, qwen2, mistral" in err
    assert not (tmp_path / "x").exists()
    assert run_cli(*args, "--tgt-fmt", "hf", "--output-dir", tmp_path / "y", "--chat-template", "qwen2",
                   cs / "pytorch_model_to_cs-2.2.mdl") == 1
    assert "--chat-template only applies to --tgt-fmt llava-hf" in capsys.readouterr().err
