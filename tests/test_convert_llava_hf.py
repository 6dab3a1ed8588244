"""convert_checkpoint.py llava-hf format: folders transformers' LlavaForConditionalGeneration and AutoProcessor load.

A tiny Llama tokenizer is trained in the test (preprocess_dataset.write_llama_tokenizer); offline, CPU, seconds.
"""

import json

import pytest
import torch
import yaml
from PIL import Image
from transformers import (AutoProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration)

import convert_checkpoint as cc
from test_convert_checkpoint import LLAMA, NUM_PATCHES, TOL, VIT, make_hf_dir, our_logits, randomize_, run_cli

TEXTS = ["A chat between a curious user and an artificial intelligence assistant.",
         "USER: What is shown in the picture? ASSISTANT: A blue vase on a wooden table.",
         "The assistant gives helpful, detailed, and polite answers to the user's questions."] * 10


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from preprocess_dataset import write_llama_tokenizer

    return write_llama_tokenizer(TEXTS, tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=400)


@pytest.fixture(scope="module")
def base_vocab(tokenizer_dir):
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tokenizer_dir))


def tiny_llava_hf(vocab: int, image_token: int, pad: int, kv_heads: int = 2):
    torch.manual_seed(0)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**VIT),
                         text_config=LlamaConfig(**dict(LLAMA, vocab_size=vocab), num_key_value_heads=kv_heads),
                         image_token_index=image_token, pad_token_id=pad, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=NUM_PATCHES)
    return randomize_(LlavaForConditionalGeneration(config).eval())


def llava_inputs(vocab: int, image_token: int, start: int = 1, seq: int = 40):
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 28, 28, generator=g)
    ids = torch.randint(3, min(vocab, image_token), (2, seq), generator=g, dtype=torch.int32)
    hf_ids = ids.clone().long()
    hf_ids[:, start:start + NUM_PATCHES] = image_token
    return pixels, ids, hf_ids


def test_llava_hf_folder_round_trips_through_cs_with_equal_logits(tmp_path, tokenizer_dir, base_vocab):
    image_token, pad = base_vocab, base_vocab + 1  # what the converter assigns when it adds the two tokens
    vocab = -(-(base_vocab + 2) // 64) * 64
    hf = tiny_llava_hf(vocab, image_token, pad)
    hf.save_pretrained(tmp_path / "src")
    assert run_cli("convert", "--model", "llava", "--src-fmt", "llava-hf", "--tgt-fmt", "cs-2.2", "--config",
                   tmp_path / "src", "--output-dir", tmp_path / "cs", "--no-progress-bar", tmp_path / "src") == 0
    cs = torch.load(tmp_path / "cs" / "pytorch_model_to_cs-2.2.mdl", weights_only=True)["model"]
    section = yaml.safe_load((tmp_path / "cs" / "config_to_cs-2.2.yaml").read_text())["model"]
    pixels, ids, hf_ids = llava_inputs(vocab, image_token, start=section["image_start_idx"])
    with torch.no_grad():
        theirs = hf(input_ids=hf_ids, pixel_values=pixels).logits
    assert (our_logits(section, cs, pixels, ids) - theirs).abs().max() <= TOL

    out = tmp_path / "back"
    assert run_cli("convert", "--model", "llava", "--src-fmt", "cs-2.2", "--tgt-fmt", "llava-hf", "--config",
                   tmp_path / "cs" / "config_to_cs-2.2.yaml", "--tokenizer-dir", tokenizer_dir, "--output-dir", out,
                   "--export-safetensors", "--no-progress-bar", tmp_path / "cs" / "pytorch_model_to_cs-2.2.mdl") == 0
    original = cc.load_weight_file(tmp_path / "src" / "model.safetensors")
    written = cc.load_weight_file(out / "model.safetensors")
    assert written.keys() == original.keys() and all(torch.equal(written[k], original[k]) for k in original)
    before = json.loads((tmp_path / "src" / "config.json").read_text())
    after = json.loads((out / "config.json").read_text())
    assert cc.llava_hf_config_to_cs(after) == cc.llava_hf_config_to_cs(before)
    for key in ("image_token_index", "vision_feature_layer", "vision_feature_select_strategy", "projector_hidden_act",
                "image_seq_length"):
        assert after[key] == before[key], key

    reloaded = LlavaForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=hf_ids, pixel_values=pixels).logits, theirs)


def test_processor_and_chat_template_of_the_written_folder(tmp_path, tokenizer_dir, base_vocab):
    vocab = -(-(base_vocab + 2) // 64) * 64
    tiny_llava_hf(vocab, base_vocab, base_vocab + 1).save_pretrained(tmp_path / "src")
    run_cli("convert", "--model", "llava", "--src-fmt", "llava-hf", "--tgt-fmt", "cs-2.2", "--output-dir",
            tmp_path / "cs", "--no-progress-bar", tmp_path / "src")
    out = tmp_path / "llava-hf"
    assert run_cli("convert", "--model", "llava", "--src-fmt", "cs-2.2", "--tgt-fmt", "llava-hf", "--config",
                   tmp_path / "cs" / "config_to_cs-2.2.yaml", "--tokenizer-dir", tokenizer_dir, "--output-dir", out,
                   "--no-progress-bar", tmp_path / "cs" / "pytorch_model_to_cs-2.2.mdl") == 0
    processor = AutoProcessor.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A vase."}]},
                {"role": "user", "content": [{"type": "text", "text": "Which colour?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the user's questions.")
    assert prompt == f"{system} USER: <image>\nWhat is this? ASSISTANT: A vase.</s>USER: Which colour? ASSISTANT:"
    wide = Image.new("RGB", (56, 28), (255, 0, 0))
    batch = processor(text=prompt, images=wide, return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == base_vocab and processor.tokenizer.pad_token == "<pad>"
    assert int((batch["input_ids"] == image_id).sum()) == NUM_PATCHES
    assert batch["pixel_values"].shape == (1, 3, 28, 28)
    # padded to a square in the CLIP mean colour (as the training transforms), not centre-cropped: the top row is
    # background, which normalises to 0 in every channel
    assert batch["pixel_values"][0, :, 0].abs().max() < 0.02
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], vocab)


def test_cs_model_without_image_tokens_grows_embeddings_to_a_multiple_of_64(tmp_path, tokenizer_dir, base_vocab):
    src = make_hf_dir(tmp_path / "hf", projector=None, vocab_size=base_vocab)
    run_cli("convert", "--model", "llava", "--src-fmt", "hf", "--tgt-fmt", "cs-2.2", "--output-dir", tmp_path / "cs",
            "--no-progress-bar", src)
    cs = torch.load(tmp_path / "cs" / "pytorch_model_to_cs-2.2.mdl", weights_only=True)["model"]
    section = yaml.safe_load((tmp_path / "cs" / "config_to_cs-2.2.yaml").read_text())["model"]
    out = tmp_path / "llava-hf"
    assert run_cli("convert", "--model", "llava", "--src-fmt", "cs-2.2", "--tgt-fmt", "llava-hf", "--config",
                   tmp_path / "cs" / "config_to_cs-2.2.yaml", "--tokenizer-dir", tokenizer_dir, "--output-dir", out,
                   "--no-progress-bar", tmp_path / "cs" / "pytorch_model_to_cs-2.2.mdl") == 0
    config = json.loads((out / "config.json").read_text())
    rows = -(-(base_vocab + 2) // 64) * 64
    assert config["text_config"]["vocab_size"] == rows
    assert (config["image_token_index"], config["pad_token_id"]) == (base_vocab, base_vocab + 1)
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    emb = hf.get_input_embeddings().weight
    words = cs["text_model.embedding_layer.word_embeddings.weight"]
    assert emb.shape[0] == rows and torch.equal(emb[:base_vocab], words)
    assert torch.allclose(emb[-1], words.mean(0))
    pixels, ids, hf_ids = llava_inputs(base_vocab, base_vocab, start=section["image_start_idx"])
    with torch.no_grad():
        theirs = hf(input_ids=hf_ids, pixel_values=pixels).logits
    assert (our_logits(section, cs, pixels, ids) - theirs[..., :base_vocab]).abs().max() <= TOL


def test_llava_hf_target_without_a_tokenizer_says_what_to_pass(tmp_path, capsys):
    src = make_hf_dir(tmp_path / "hf", projector=None)
    run_cli("convert", "--model", "llava", "--src-fmt", "hf", "--tgt-fmt", "cs-2.2", "--output-dir", tmp_path / "cs",
            "--no-progress-bar", src)
    assert run_cli("convert", "--model", "llava", "--src-fmt", "cs-2.2", "--tgt-fmt", "llava-hf", "--config",
                   tmp_path / "cs" / "config_to_cs-2.2.yaml", "--output-dir", tmp_path / "out",
                   tmp_path / "cs" / "pytorch_model_to_cs-2.2.mdl") == 1
    assert "--tokenizer-dir" in capsys.readouterr().err
    assert run_cli("convert", "--model", "llava", "--src-fmt", "llava-hf", "--tgt-fmt", "cs-2.2", "--output-dir",
                   tmp_path / "x", src) == 1
    assert "It looks like --src-fmt hf" in capsys.readouterr().err
