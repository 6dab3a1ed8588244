"""Sequence packing (train_input.packing) is exact: a packed batch computes what the same samples compute unpacked.

Run: python -m pytest tests/test_packing.py -q
CPU, fp32, the tiny config: losses, gradients of every trainable parameter and per-sample logits against the
unpacked rows (phase-1 and phase-2 freezing, text-only samples in the mix, image_start_idx 1 and 35); pack plans
independent of the number of processes, resumable, and complete (no sample lost or repeated).
"""

import numpy as np
import pytest
import torch
import yaml

import create_hdf5_dataset as hd
import model as M
import modeling_llava as ml
from test_model import CONFIGS

PAD = 0


def section(phase: int, start: int, **overrides):
    sec = yaml.safe_load((CONFIGS / f"params_llava_tiny_phase{phase}.yaml").read_text())["model"]
    sec = dict(sec, image_start_idx=start, **overrides)
    sec["text_model"] = dict(sec["text_model"], max_position_embeddings=256)
    return sec


def sample_row(rng, msl: int, start: int, n_image: int, n_text: int, has_image: bool) -> np.ndarray:
    """An H5 row [4, msl] as create_hdf5_dataset writes it: prefix, image slots at `start`, text, right padding;
    a text-only row has its slots (and the token before them when start > 1) masked."""
    length = start + n_image + n_text
    ids = np.full(msl + 1, PAD, np.int64)
    ids[:start] = rng.integers(3, 200, start)
    ids[start + n_image:length] = rng.integers(3, 200, n_text)
    row = np.zeros((4, msl), np.int32)
    row[0], row[2] = ids[:msl], ids[1:msl + 1]
    row[1, start + n_image - 1:length - 1] = rng.random(n_text) < 0.7  # answer positions (incl. the last slot)
    row[1, length - 1:] = 0
    row[3, length:] = 1
    if not has_image:
        mstart = start - 1 if start > 1 else start
        row[3, mstart:start + n_image] = 1
        row[1, mstart:start + n_image] = 0
    return row


def samples_for(llava, start: int, msl: int, seed: int = 0, n: int = 7):
    rng = np.random.default_rng(seed)
    npatch = llava.model.num_image_tokens
    im = llava.config.image_model
    out = []
    for i in range(n):
        has_image = i % 3 != 2  # every third sample text-only
        row = sample_row(rng, msl, start, npatch, int(rng.integers(4, 20)), has_image)
        image = torch.randn(im.num_channels, *im.image_size, generator=torch.Generator().manual_seed(seed * 100 + i))
        out.append((row, image if has_image else None))
    return out


def unpacked_batch(samples, image_size):
    rows = np.stack([r for r, _ in samples])
    images = torch.stack([im if im is not None else torch.zeros(image_size) for _, im in samples])
    names = ("text_input_ids", "loss_mask", "labels", "key_padding_mask")
    return {"image_data": images, **{k: torch.from_numpy(rows[:, i].copy()) for i, k in enumerate(names)}}


def packed_batch(samples, groups, llava, msl, max_images):
    im = llava.config.image_model
    npatch = llava.model.num_image_tokens
    start = llava.config.image_start_idx
    rows = [hd.pack_row([samples[i] for i in g], msl, max_images, npatch, (im.num_channels, *im.image_size),
                        torch.float32, lambda row: (start, npatch)) for g in groups]
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def loss_and_grads(llava, batch):
    llava.zero_grad(set_to_none=True)
    loss = llava(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in llava.named_parameters() if p.requires_grad}
    return loss.detach(), grads


CASES = [(1, 1), (2, 35), (2, 1), (1, 35)]  # (freezing phase, image_start_idx)


@pytest.mark.parametrize("scaling", ["num_tokens", "batch_size"])
@pytest.mark.parametrize("sparse", [True, False], ids=["gpu_cpu", "fixed_shape"])
@pytest.mark.parametrize("phase,start", CASES)
def test_packed_batch_gives_the_unpacked_loss_and_gradients(phase, start, sparse, scaling):
    torch.manual_seed(0)
    weight = 0.5 if scaling == "batch_size" else 1.0
    llava = M.LlavaModel(section(phase, start, loss_scaling=scaling, loss_weight=weight), sparse_logits=sparse)
    msl = start + llava.model.num_image_tokens + 20
    samples = samples_for(llava, start, msl)
    im = llava.config.image_model
    ref_loss, ref_grads = loss_and_grads(llava, unpacked_batch(samples, (im.num_channels, *im.image_size)))
    packed_msl = 4 * msl
    # row 0: two image samples + a text-only one; row 1: the rest (an unused image slot in row 1 of 3 slots)
    groups = [(0, 1, 2), (3, 4, 5, 6)]
    batch = packed_batch(samples, groups, llava, packed_msl, max_images=3)
    assert batch["num_samples"].tolist() == [3, 4] and batch["image_valid"].sum() == 5
    loss, grads = loss_and_grads(llava, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("phase,start", CASES[:2])
def test_per_sample_logits_of_a_packed_row_equal_each_sample_alone(phase, start):
    torch.manual_seed(0)
    llava = M.LlavaModel(section(phase, start), sparse_logits=False).eval()
    msl = start + llava.model.num_image_tokens + 20
    samples = samples_for(llava, start, msl, seed=3, n=4)
    im = llava.config.image_model
    batch = packed_batch(samples, [(0, 1, 2, 3)], llava, 4 * msl, max_images=3)
    with torch.no_grad():
        packed = llava.logits(batch)[0]
        seg, pos = batch["segment_ids"][0], batch["position_ids"][0]
        for i, sample in enumerate(samples):
            alone = llava.logits(unpacked_batch([sample], (im.num_channels, *im.image_size)))[0]
            where = (seg == i + 1).nonzero().squeeze(-1)
            attended = np.flatnonzero(sample[0][3] == 0)
            assert sorted(pos[where].tolist()) == attended.tolist()  # every attended token, at its own position
            torch.testing.assert_close(packed[where], alone[pos[where].long()], rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_equals_the_dense_mask():
    pytest.importorskip("torch.nn.attention.flex_attention", reason="FlexAttention needs torch >= 2.5 (GPU/CPU env)")
    torch.manual_seed(0)
    llava = M.LlavaModel(section(2, 35), sparse_logits=False).eval()
    msl = 35 + llava.model.num_image_tokens + 20
    samples = samples_for(llava, 35, msl, seed=5, n=4)
    batch = packed_batch(samples, [(0, 1), (2, 3)], llava, 128, max_images=2)
    with torch.no_grad():
        llava.model.text_model.packed_attention = "sdpa"
        dense = llava.logits(batch)
        llava.model.text_model.packed_attention = "flex"
        flex = llava.logits(batch)
    real = batch["segment_ids"] > 0
    torch.testing.assert_close(flex[real], dense[real], rtol=1e-4, atol=1e-4)


def test_packed_attention_mask_is_block_diagonal_causal_in_position():
    seg = torch.tensor([[1, 1, 2, 1, 2, 0]])
    pos = torch.tensor([[0, 1, 0, 2, 1, 0]])
    mask = ml.packed_attention_mask(seg, pos)[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0, 0],
                    [0, 0, 1, 0, 0, 0],
                    [1, 1, 0, 1, 0, 0],
                    [0, 0, 1, 0, 1, 0],
                    [0, 0, 0, 0, 0, 1]]


# ----------------------------------------------------------------------------------------------
# Pack plans


def lengths(n=500, seed=0):
    rng = np.random.default_rng(seed)
    has_image = rng.random(n) < 0.9
    tokens = np.where(has_image, 576 + rng.integers(10, 700, n), rng.integers(300, 2049, n)).astype(np.int32)
    return tokens, has_image


def test_plan_never_overfills_a_row_and_holds_every_sample_once():
    tokens, has_image = lengths()
    rows = hd.plan_rows(np.random.default_rng(1).permutation(len(tokens)), tokens, has_image, 2048, 3)
    members = [i for r in rows for i in r]
    assert sorted(members) == list(range(len(tokens)))
    assert all(tokens[list(r)].sum() <= 2048 and has_image[list(r)].sum() <= 3 for r in rows)
    assert tokens.sum() / (len(rows) * 2048) > 0.85  # little padding


def test_plans_do_not_depend_on_the_number_of_processes_and_resume_exactly():
    tokens, has_image = lengths(300)

    def stream(world, start=0, take=None):
        per_rank = [iter(hd.PackedRowSampler(tokens, has_image, 2048, 3, seed=7, rank=r, world_size=world,
                                             start_row=start)) for r in range(world)]
        out = []
        for _ in range(take // world):
            out.extend(next(it) for it in per_rank)
        return out

    one = stream(1, take=400)  # more than one epoch
    assert stream(2, take=400) == one
    assert stream(2, start=150, take=250) == one[150:]
    epoch0 = hd.PackedRowSampler(tokens, has_image, 2048, 3, seed=7).epoch_rows(0)
    assert sorted(i for r in epoch0 for i in r) == list(range(300))
    assert one[:len(epoch0)] == epoch0
    assert hd.PackedRowSampler(tokens, has_image, 2048, 3, seed=8).epoch_rows(0) != epoch0  # seeded per epoch
    assert hd.PackedRowSampler(tokens, has_image, 2048, 3, seed=7).epoch_rows(1) != epoch0


def test_finite_stream_pads_ranks_to_equal_length_with_empty_rows():
    tokens, has_image = lengths(50)
    total = len(hd.PackedRowSampler(tokens, has_image, 2048, 3, shuffle=False).epoch_rows(0))
    parts = [list(hd.PackedRowSampler(tokens, has_image, 2048, 3, shuffle=False, rank=r, world_size=3,
                                      num_epochs=1)) for r in range(3)]
    assert len({len(p) for p in parts}) == 1 and sum(len(p) for p in parts) == total + (-total % 3)
    assert sorted(i for p in parts for r in p for i in r) == list(range(50))
    assert len(hd.PackedRowSampler(tokens, has_image, 2048, 3, shuffle=False, rank=1, world_size=3,
                                   num_epochs=1)) == len(parts[1])


# ----------------------------------------------------------------------------------------------
# run.py with packing (CPU, the tiny configs and data of test_run.py)

import json  # noqa: E402
import shutil  # noqa: E402

import run  # noqa: E402
from test_run import PHASE1, PHASE2, cli, data, losses, torchrun, weights  # noqa: E402, F401

PACKED = {"train_input.packing": True, "eval_input.packing": True}


def eval_metrics(model_dir):
    return json.loads((model_dir / "eval" / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.mark.parametrize("phase,params", [(1, PHASE1), (2, PHASE2)])
def test_packed_eval_gives_the_unpacked_metrics(data, tmp_path, phase, params):
    run.main(cli("CPU", "train", params, tmp_path, data, phase, steps=2, **PACKED))
    ckpt = weights(tmp_path / "checkpoint_2.mdl")
    assert ckpt["dataloader"] == {"samples_streamed": 16, "seed": 1234, "packing": True}
    assert (data[(phase, "train")] / hd.PACK_INDEX_NAME).is_file()
    results = {}
    for packing in (False, True):
        out = tmp_path / f"eval_{packing}"
        run.main(cli("CPU", "eval", params, out, data, phase, "--checkpoint_path", str(tmp_path / "checkpoint_2.mdl"),
                     **{"eval_input.packing": packing}))
        results[packing] = eval_metrics(out)
    for key in ("loss", "accuracy", "first_answer_token_accuracy", "majority_first_answer_baseline"):
        assert results[True][key] == pytest.approx(results[False][key], rel=1e-5, abs=1e-6), key


def test_packed_training_accumulation_and_activation_checkpointing_match(data, tmp_path):
    run.main(cli("CPU", "train", PHASE2, tmp_path / "big", data, 2, steps=2, **PACKED))
    run.main(cli("CPU", "train", PHASE2, tmp_path / "acc", data, 2, steps=2,
                 **PACKED, **{"train_input.micro_batch_size": 2}))
    run.main(cli("CPU", "train", PHASE2, tmp_path / "ac", data, 2, steps=2,
                 **PACKED, **{"runconfig.activation_checkpointing": True}))
    a, b, c = losses(tmp_path / "big"), losses(tmp_path / "acc"), losses(tmp_path / "ac")
    assert all(a[s] == pytest.approx(b[s], abs=1e-5) and a[s] == pytest.approx(c[s], abs=1e-5) for s in a)
    metrics = [json.loads(x) for x in (tmp_path / "big" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["samples_per_sec"] > 0 and m["tokens_per_sec"] > m["samples_per_sec"] for m in metrics)


def test_packed_ddp_two_processes_match_one_process(data, tmp_path):
    run.main(cli("CPU", "train", PHASE2, tmp_path / "one", data, 2, steps=2, **PACKED))
    result = torchrun(2, cli("CPU", "train", PHASE2, tmp_path / "two", data, 2, steps=2, **PACKED))
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert a.keys() == b.keys() and all(a[s] == pytest.approx(b[s], abs=1e-5) for s in a)


@pytest.mark.skipif(tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 6),
                    reason="FSDP2 on CPU processes (gloo) needs torch >= 2.6; torch 2.4's FSDP is CUDA-only")
def test_packed_fsdp_two_processes_match_one_process(data, tmp_path):
    run.main(cli("CPU", "train", PHASE2, tmp_path / "one", data, 2, steps=2, **PACKED))
    result = torchrun(2, cli("CPU", "train", PHASE2, tmp_path / "fsdp", data, 2, steps=2, **PACKED,
                             **{"runconfig.distributed_strategy": "fsdp"}))
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    assert all(a[s] == pytest.approx(b[s], abs=1e-5) for s in a)


def test_packing_with_text_only_fallback_for_bad_images(data, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(data["images"], images)
    for png in sorted(images.rglob("*.png"))[::4]:
        png.write_bytes(b"not an image")
    opts = {"train_input.img_data_dir": images, "eval_input.img_data_dir": images, "train_input.on_bad_image":
            "text_only", "eval_input.on_bad_image": "text_only", "runconfig.eval_frequency": 1}
    run.main(cli("CPU", "train_and_eval", PHASE2, tmp_path / "m", data, 2, steps=2, **PACKED, **opts))
    assert all(np.isfinite(v) for v in losses(tmp_path / "m").values())
    packed = eval_metrics(tmp_path / "m")
    run.main(cli("CPU", "eval", PHASE2, tmp_path / "plain", data, 2, "--checkpoint_path",
                 str(tmp_path / "m" / "checkpoint_2.mdl"), **opts))
    assert packed["loss"] == pytest.approx(eval_metrics(tmp_path / "plain")["loss"], rel=1e-5)


def test_resuming_a_packed_run_without_packing_is_refused(data, tmp_path):
    run.main(cli("CPU", "train", PHASE2, tmp_path, data, 2, steps=1, **PACKED))
    with pytest.raises(SystemExit, match=r"trained with train_input.packing.*packing: true"):
        run.main(cli("CPU", "train", PHASE2, tmp_path, data, 2, steps=2))


def reference_varlen(q, k, v, cu_seqlens, longest):
    """What torch.nn.attention.varlen computes (causal), one sequence at a time: the CPU stand-in for CUDA."""
    out = torch.empty_like(q)
    for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        assert b - a <= longest
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(
            *(x[a:b].transpose(0, 1) for x in (q, k, v)), is_causal=True).transpose(0, 1)
    return out


def test_varlen_layout_equals_the_bucketed_and_dense_attention():
    torch.manual_seed(0)
    seg = torch.tensor([[1, 1, 1, 2, 2, 1, 3, 2, 0, 0], [1, 1, 2, 1, 2, 2, 2, 1, 1, 0]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 3, 0, 2, 0, 0], [0, 1, 0, 2, 1, 2, 3, 3, 4, 0]])
    q, k, v = (torch.randn(2, 3, 10, 8) for _ in range(3))
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=ml.packed_attention_mask(seg, pos))
    bucketed = ml.PackedSegments(seg, pos).attend(q, k, v, 0.0)
    varlen = ml.PackedSegments(seg, pos, varlen=reference_varlen).attend(q, k, v, 0.0)
    real = (seg > 0)[:, None, :, None].expand_as(q)
    torch.testing.assert_close(bucketed[real], dense[real])
    torch.testing.assert_close(varlen[real], dense[real])
    assert not varlen[~real].any() and not bucketed[~real].any()  # padding gets zeros
