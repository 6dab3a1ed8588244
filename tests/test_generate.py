"""Generation with a key/value cache (modeling_llava.Llava.generate): greedy output token for token equal to
transformers' generate() on the same weights (LlavaForConditionalGeneration, tiny random configs, fp32), for one
prompt and for a left-padded batch of prompts of different lengths; sampling and stopping rules; the decoding
steps in every weight layout against the module path.

    python -m pytest -q tests/test_generate.py
"""

import gc
import weakref

import pytest
import torch

import modeling_llava as ml
from test_model_families import llava_pair

NP = 16  # image tokens of the tiny towers (28 / 7 = 4 per side; CLIP's CLS dropped, SigLIP has none)


def prompts(image_token: int, lengths: list[int], start: int = 3, seed: int = 0):
    """Left-padded prompts with NP image tokens at `start` of each prompt; (hf ids, our ids, mask, starts)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    hf_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    starts = []
    for row, n in enumerate(lengths):
        ids = torch.randint(1, image_token, (n,), generator=g)
        ids[start:start + NP] = image_token
        hf_ids[row, width - n:] = ids
        mask[row, width - n:] = 1
        starts.append(width - n + start)
    return hf_ids, hf_ids.clone(), mask, torch.tensor(starts)


def hf_new_tokens(hf, ids, mask, pixels, max_new, eos):
    out = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=max_new,
                      do_sample=False, eos_token_id=eos, pad_token_id=0)
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        rows.append(row[:row.index(eos)] if eos in row else row)
    return rows


@pytest.mark.parametrize("vision,text_family", [("clip", "llama3"), ("siglip", "qwen2"), ("siglip", "qwen3")])
@pytest.mark.parametrize("lengths", [[24], [30, 21, 26]], ids=["batch1", "padded_batch3"])
def test_greedy_generation_equals_transformers_generate(vision, text_family, lengths):
    hf, ours, image_token = llava_pair(vision, text_family)
    hf_ids, our_ids, mask, starts = prompts(image_token, lengths)
    pixels = torch.randn(len(lengths), 3, 28, 28, generator=torch.Generator().manual_seed(1))
    eos = 5
    with torch.no_grad():
        theirs = hf_new_tokens(hf, hf_ids, mask, pixels, 20, eos)
    mine = ours.model.generate(our_ids, mask, pixels, starts, max_new_tokens=20, eos_token_ids=[eos])
    assert mine == theirs
    assert any(len(row) > 5 for row in mine)  # the comparison covers real decoding steps


def test_generation_stops_at_eos_and_at_stop_sequences():
    _, ours, image_token = llava_pair("clip", "llama3")
    _, ids, mask, starts = prompts(image_token, [24, 20])
    pixels = torch.randn(2, 3, 28, 28)
    free = ours.model.generate(ids, mask, pixels, starts, max_new_tokens=12)
    assert [len(r) for r in free] == [12, 12]
    first = free[0][4]
    cut = ours.model.generate(ids, mask, pixels, starts, max_new_tokens=12, eos_token_ids=[first])
    assert cut[0] == free[0][:free[0].index(first)]  # stopped before its first EOS, EOS not returned
    seq = free[1][3:5]
    stopped = ours.model.generate(ids, mask, pixels, starts, max_new_tokens=12, stop_sequences=[seq])
    end = next(i for i in range(2, 13) if free[1][i - 2:i] == seq)
    assert stopped[1] == free[1][:end - 2]


def test_generation_stops_at_stop_strings_even_inside_a_token():
    """A stop string ends a row once its decoded text holds it, also when the string starts inside one token and
    ends in the next; cut_at_stop_string then gives the text before it."""
    _, ours, image_token = llava_pair("clip", "llama3")
    _, ids, mask, starts = prompts(image_token, [24, 20])
    pixels = torch.randn(2, 3, 28, 28)
    free = ours.model.generate(ids, mask, pixels, starts, max_new_tokens=12)

    def decode(tokens):  # two letters per token, so a string can span a token boundary
        return "".join(chr(97 + t % 26) + chr(65 + t % 26) for t in tokens)

    text = decode(free[1])
    stop = text[7:10]  # from token 3's second letter to token 4's second letter
    first = text.find(stop)
    stopped = ours.model.generate(ids, mask, pixels, starts, max_new_tokens=12, stop_strings=[stop], decode=decode)
    assert stopped[1] == free[1][:(first + len(stop) + 1) // 2]  # up to the token completing the string
    assert ml.cut_at_stop_string(decode(stopped[1]), [stop]) == text[:first]
    if stop not in decode(free[0]):
        assert stopped[0] == free[0]  # the other row goes on to max_new_tokens
    assert ml.cut_at_stop_string("red###x##", ["##", "x"]) == "red"
    with pytest.raises(ValueError, match="need decode"):
        ours.model.generate(ids, mask, pixels, starts, max_new_tokens=2, stop_strings=["x"])


def test_sampling_is_reproducible_and_respects_top_k():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    a = ml.next_tokens(logits, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(7))
    b = ml.next_tokens(logits, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    top3 = logits.topk(3, dim=-1).indices
    for _ in range(20):
        t = ml.next_tokens(logits, temperature=1.0, top_k=3)
        assert all(t[i] in top3[i] for i in range(4))
    # top_p small enough keeps only the most likely token
    assert torch.equal(ml.next_tokens(logits * 10, temperature=1.0, top_p=0.01), logits.argmax(-1))
    assert torch.equal(ml.next_tokens(logits, temperature=0.0), logits.argmax(-1))


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_one_query_attention_equals_sdpa_over_the_repeated_cache(heads, kv_heads):
    """The decoding step's grouped-head attention computes what the prompt pass's path does: the cache repeated
    per query group and scaled_dot_product_attention with the same mask."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, heads, 1, 16, generator=g)
    k, v = torch.randn(2, 3, kv_heads, 11, 16, generator=g)
    attend = torch.rand(3, 1, 1, 11, generator=g) > 0.3
    attend[..., -1] = True  # the new token always sees itself
    groups = heads // kv_heads
    plain = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1), attn_mask=attend)
    torch.testing.assert_close(ml.one_query_attention(q, k, v, ~attend), plain[:, :, 0], atol=1e-6, rtol=1e-5)


def test_cache_holds_exactly_prompt_plus_new_tokens():
    cache = ml.KVCache(1, 2, 4, 8, torch.float32, "cpu")
    cache.append(torch.ones(1, 2, 3, 8), torch.ones(1, 2, 3, 8))
    k, v = cache.append(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8))
    assert k.shape == (1, 2, 4, 8) and cache.length == 4
    with pytest.raises(ValueError, match="cache holds 4"):
        cache.append(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8))


# ----------------------------------------------------------------------------------------------
# Decoding steps (DecodingSteps): every weight layout computes the module path's step

STEP_MODELS = {
    "llama_gqa": dict(),
    "qwen2_biases": dict(use_projection_bias_in_attention=True, use_ffn_bias_in_attention=False),
    "qwen3_qk_norm_wide_heads": dict(attention_inner_dim=96, qk_norm_eps=1e-6),
    "partial_rotary_gelu_ffn": dict(rotary_dim=8, nonlinearity="gelu", use_ffn_bias=True, use_bias_in_output=True),
}


def step_model(name: str) -> ml.LlamaLMModel:
    torch.manual_seed(0)
    lm = ml.LlamaLMModel(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_heads=4, num_kv_heads=2,
                         filter_size=80, **STEP_MODELS[name]).eval()
    with torch.no_grad():
        for p in lm.parameters():  # away from the init's ones and zeros, so biases and norms count
            p.add_(torch.randn_like(p) * 0.1)
    return lm


def prompt_pass(lm, batch: int, length: int, extra: int):
    """Caches filled with a random prompt (the first row left-padded by 3); (caches, attend keys, positions)."""
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(batch, length, lm.embedding_layer.word_embeddings.embedding_dim, generator=g)
    real = torch.ones(batch, length, dtype=torch.bool)
    real[0, :3] = False
    keys = torch.zeros(batch, length + extra, dtype=torch.bool)
    keys[:, :length] = real
    attend = (torch.ones(length, length, dtype=torch.bool).tril() & real[:, None, None, :]) | torch.eye(
        length, dtype=torch.bool)
    positions = (torch.arange(length) - real.long().argmax(1, keepdim=True)).clamp(min=0)
    caches = lm.new_caches(batch, length + extra, torch.float32, "cpu")
    with torch.no_grad():
        lm.decode_cached(embeds, positions, attend, caches)
    return caches, keys, positions[:, -1] + 1


@pytest.mark.parametrize("layout", ml.STEP_LAYOUTS)
@pytest.mark.parametrize("name", list(STEP_MODELS))
@pytest.mark.parametrize("batch", [1, 3])
def test_decoding_step_equals_the_module_path(name, layout, batch):
    """Three steps through DecodingSteps give the logits, and leave the caches, that decode_cached + lm_head give."""
    lm = step_model(name)
    ours, keys, position = prompt_pass(lm, batch, 9, 3)
    theirs = [ml.KVCache(batch, c.keys.shape[1], c.keys.shape[2], c.keys.shape[3], torch.float32, "cpu")
              for c in ours]
    for mine, copy in zip(ours, theirs):
        copy.keys.copy_(mine.keys)
        copy.values.copy_(mine.values)
        copy.length = mine.length
    steps = ml.DecodingSteps(lm, layout)
    tokens = torch.tensor([5, 17, 96][:batch])
    with torch.no_grad():
        for step in range(3):
            keys[:, 9 + step] = True
            attend = keys[:, None, None, :10 + step]
            got = steps(tokens, position, attend, ours)
            hidden = lm.decode_cached(lm.compute_input_embeddings(tokens[:, None]), position[:, None], attend, theirs)
            want = lm.lm_head(hidden[:, -1])
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
            tokens, position = want.argmax(-1), position + 1
    for mine, copy in zip(ours, theirs):
        assert mine.length == copy.length == 12
        torch.testing.assert_close(mine.keys, copy.keys, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(mine.values, copy.values, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_step_rotation_is_bit_identical_to_the_interleaved_rotation(rotary_dim):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 1, 16, generator=g)
    positions = torch.tensor([0, 7, 250])
    inv_freq = ml.rope_inverse_frequencies(rotary_dim, 10000.0, None, "cpu")
    plain = ml.apply_interleaved_rotary(x, *ml.rotary_for_positions(positions[:, None], inv_freq, 2.0))
    step = ml.apply_step_rotary(x, *ml.step_rotary_tables(positions, inv_freq, 2.0, 16))
    assert torch.equal(step, plain)


def test_step_layout_copies_only_fp32_cpu_weights_that_fit_in_free_memory(monkeypatch):
    weights = [torch.zeros(64, 32), torch.zeros(32, 64)]
    monkeypatch.setattr(ml, "free_memory_bytes", lambda: 1 << 30)
    assert ml.step_layout(weights, 1) == "transposed"
    assert ml.step_layout(weights, 8) == ("onednn" if torch.backends.mkldnn.is_available() else "modules")
    assert ml.step_layout([w.bfloat16() for w in weights], 1) == "modules"
    assert ml.step_layout([w.to("meta") for w in weights], 1) == "modules"
    monkeypatch.setattr(ml, "free_memory_bytes", lambda: 2 * 64 * 32 * 4 * 2 - 1)  # the copy: just over half
    assert ml.step_layout(weights, 1) == "modules"


def test_copied_step_weights_are_kept_until_the_weights_or_the_layout_change(monkeypatch):
    monkeypatch.setattr(ml, "free_memory_bytes", lambda: 1 << 30)
    lm = step_model("llama_gqa")
    with torch.no_grad():
        first = ml.decoding_steps(lm, 1)
        assert first.layout == "transposed" and ml.decoding_steps(lm, 1) is first
        lm.transformer_decoder.layers[1].ffn.ffn[1].linear_layer.weight.mul_(2.0)  # an optimizer step, in place
        changed = ml.decoding_steps(lm, 1)
        assert changed is not first
        torch.testing.assert_close(changed.layers[1].down.weight,
                                   lm.transformer_decoder.layers[1].ffn.ffn[1].linear_layer.weight.t())
        lm.load_state_dict(step_model("qwen2_biases").state_dict(), strict=False)  # new values copied in
        assert ml.decoding_steps(lm, 1) is not changed
        if torch.backends.mkldnn.is_available():
            assert ml.decoding_steps(lm, 4).layout == "onednn"
    assert lm in ml._COPIED_STEPS
    model = weakref.ref(lm)
    del lm, first, changed
    gc.collect()
    assert model() is None  # the kept copy does not keep its model alive, and goes with it
