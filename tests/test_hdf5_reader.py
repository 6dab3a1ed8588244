"""Tests of create_hdf5_dataset.py's reader side: LlavaH5Dataset, build_transforms, ResumableSampler.

Run: python -m pytest tests/test_hdf5_reader.py -q
"""

import itertools
import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import create_hdf5_dataset as c  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference_data"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
LLAVA_336 = [  # the Cerebras yaml transforms (spec 3.3)
    {"name": "expand_to_square", "background_color": [122, 116, 104]},
    {"name": "resize", "size": 336, "interpolation": "bicubic"},
    {"name": "center_crop", "size": 336},
    {"name": "to_tensor"},
    {"name": "normalize", "mean": CLIP_MEAN, "std": CLIP_STD},
]
SMALL = [{"name": "resize", "size": 16, "interpolation": "bicubic"}, {"name": "center_crop", "size": 16},
         {"name": "to_tensor"}, {"name": "normalize", "mean": CLIP_MEAN, "std": CLIP_STD}]
Q = "\nWhat is the main color of the vase in the image?"
A = "The vase is blue."


def noise_image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def write_h5_dataset(root: Path, tok_dir: Path, phase: int) -> Path:
    """Rows: 0 image a.jpg, 1 text-only (same text), 2 image b.png, 3 image c.jpg."""
    imgs = root / "images"
    imgs.mkdir(parents=True)
    noise_image(40, 30, 1).save(imgs / "a.jpg")
    noise_image(20, 36, 2).save(imgs / "b.png")
    noise_image(16, 16, 3).save(imgs / "c.jpg")
    records = [{"id": "0", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>" + Q},
                                                               {"from": "gpt", "value": A}]},
               {"id": "1", "conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": A}]},
               {"id": "2", "image": "b.png", "conversations": [{"from": "human", "value": "<image>" + Q},
                                                               {"from": "gpt", "value": A}]},
               {"id": "3", "image": "c.jpg", "conversations": [{"from": "human", "value": "<image>" + Q},
                                                               {"from": "gpt", "value": "blue"}]}]
    (root / "in").mkdir()
    (root / "in" / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    cfg = c.parse_config({
        "setup": {"input_dir": str(root / "in"), "output_dir": str(root / "h5")},
        "processing": {"huggingface_tokenizer": str(tok_dir), "max_seq_length": 192, "files_per_record": 3},
        "dataset": {"image_dir": str(imgs), "num_patches": 8}})
    c.preprocess("LlavaPhaseOne" if phase == 1 else "LlavaPhaseTwo", cfg, progress=False)
    return root


@pytest.fixture(params=[1, 2], ids=["phase1", "phase2"])
def dataset_root(request, tmp_path, tok_dir):
    return write_h5_dataset(tmp_path, tok_dir, request.param)


def rows_of(root: Path) -> np.ndarray:
    out = []
    for p in sorted((root / "h5").glob("*.h5")):
        with h5py.File(p, "r") as f:
            out.append(f["data"][:])
    return np.concatenate(out)


# ----------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_features_shapes_and_dtypes(dataset_root, dtype):
    ds = c.LlavaH5Dataset(str(dataset_root / "h5"), str(dataset_root / "images"), SMALL, (3, 16, 16), dtype)
    rows = rows_of(dataset_root)
    assert len(ds) == 4 and ds.max_sequence_length == 192
    assert ds.data_params["image_patch_info"]["num_patches"] == 8
    for i in range(4):
        s = ds[i]
        assert set(s) == {"image_data", "text_input_ids", "loss_mask", "labels", "key_padding_mask"}
        assert s["image_data"].shape == (3, 16, 16) and s["image_data"].dtype == dtype
        for k, name in enumerate(["text_input_ids", "loss_mask", "labels", "key_padding_mask"]):
            assert s[name].dtype == torch.int32 and s[name].shape == (192,)
            np.testing.assert_array_equal(s[name].numpy(), rows[i, k])
    assert torch.count_nonzero(ds[1]["image_data"]) == 0  # text-only row: zero image
    assert torch.count_nonzero(ds[0]["image_data"]) > 0
    expected = c.build_transforms(SMALL)(Image.open(dataset_root / "images" / "b.png").convert("RGB"))
    torch.testing.assert_close(ds[2]["image_data"], torch.from_numpy(expected).to(dtype))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_workers_match_direct_reads(dataset_root, num_workers):
    ds = c.LlavaH5Dataset(str(dataset_root / "h5"), str(dataset_root / "images"), SMALL, (3, 16, 16))
    direct = [ds[i] for i in range(len(ds))]  # opens h5 handles in this process before the workers fork
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=num_workers, shuffle=False)
    got = [b for b in loader]
    assert len(got) == 2
    for b, batch in enumerate(got):
        for key in direct[0]:
            torch.testing.assert_close(batch[key], torch.stack([direct[2 * b][key], direct[2 * b + 1][key]]))


def test_h5_handles_are_not_pickled():
    import pickle

    ds = c.LlavaH5Dataset.__new__(c.LlavaH5Dataset)
    ds.__dict__.update({"_handles": {0: "open handle"}, "_pid": 123, "files": []})
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._handles == {} and clone._pid is None and type(clone) is c.LlavaH5Dataset


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_bad_image_error_names_the_file(dataset_root, damage):
    path = dataset_root / "images" / "b.png"
    path.unlink() if damage == "missing" else path.write_bytes(b"not an image at all")
    ds = c.LlavaH5Dataset(str(dataset_root / "h5"), str(dataset_root / "images"), SMALL, (3, 16, 16))
    ds[0]
    with pytest.raises(c.ImageReadError, match=r"b\.png.*on_bad_image"):
        ds[2]


@pytest.mark.parametrize("with_params", [True, False])
def test_bad_image_as_text_only_is_counted_and_masked_like_text_rows(dataset_root, with_params):
    (dataset_root / "images" / "a.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    if not with_params:  # Cerebras-written folders have no image_patch_info extras: slots are located by pad run
        (dataset_root / "h5" / "data_params.json").unlink()
    ds = c.LlavaH5Dataset(str(dataset_root / "h5"), str(dataset_root / "images"), SMALL, (3, 16, 16),
                          on_bad_image="text_only")
    bad, text_only = ds[0], ds[1]
    assert ds.bad_image_count == 1
    assert torch.count_nonzero(bad["image_data"]) == 0
    for key in ("text_input_ids", "loss_mask", "labels", "key_padding_mask"):
        torch.testing.assert_close(bad[key], text_only[key])
    ds[2]
    assert ds.bad_image_count == 1


def _write_cerebras_style(d: Path, paths, msl=32):
    """An H5 file as Cerebras' writer makes it: fixed-size datasets, 'S' paths."""
    d.mkdir(parents=True, exist_ok=True)
    n = len(paths)
    ids = np.array([1] + [0] * 4 + [5, 6, 7] + [0] * (msl - 8), np.int32)  # BOS, 4 image slots, text; pad 0
    row = np.stack([ids, (np.arange(msl) >= 4) & (np.arange(msl) < 7), np.append(ids[1:], 0),
                    np.arange(msl) >= 8]).astype(np.int32)
    data = np.stack([row + [[k], [0], [k], [0]] * (np.arange(msl) >= 5) for k in range(n)])
    with h5py.File(d / "examples_0_0.h5", "w") as f:
        f.attrs["n_examples"] = n
        f.create_dataset("data", data=data, chunks=(1, 4, msl), compression="gzip")
        f.create_dataset("img_path", data=np.array(paths, dtype="S").reshape(n, 1), compression="gzip")
    return data


def test_several_dirs_and_path_escape_refused(tmp_path):
    noise_image(8, 8).save(tmp_path / "ok.png")
    d1 = _write_cerebras_style(tmp_path / "one", [b"None", b"ok.png"])
    d2 = _write_cerebras_style(tmp_path / "two", [b"../outside.png"])
    tf = [{"name": "resize", "size": 4}, {"name": "center_crop", "size": 4}, {"name": "to_tensor"}]
    ds = c.LlavaH5Dataset([str(tmp_path / "one"), str(tmp_path / "two")], str(tmp_path), tf, (3, 4, 4))
    assert len(ds) == 3 and ds.max_sequence_length == 32 and ds.data_params is None
    np.testing.assert_array_equal(ds[1]["labels"].numpy(), d1[1, 2])
    np.testing.assert_array_equal(ds[0]["text_input_ids"].numpy(), d1[0, 0])
    with pytest.raises(c.ImageReadError, match="escapes img_data_dir"):
        ds[-1]
    lenient = c.LlavaH5Dataset([str(tmp_path / "one"), str(tmp_path / "two")], str(tmp_path), tf, (3, 4, 4),
                               on_bad_image="text_only")
    row = lenient[2]
    np.testing.assert_array_equal(row["labels"].numpy(), d2[0, 2])
    assert lenient.bad_image_count == 1
    assert row["key_padding_mask"][:8].tolist() == [0, 1, 1, 1, 1, 0, 0, 0]  # slots found from the pad run
    assert row["loss_mask"][:8].tolist() == [0, 0, 0, 0, 0, 1, 1, 0]


def test_six_feature_files_are_refused(tmp_path):
    (tmp_path / "d").mkdir()
    with h5py.File(tmp_path / "d" / "x.h5", "w") as f:
        f.create_dataset("data", data=np.zeros((1, 6, 8), np.int32))
        f.create_dataset("img_path", data=np.array([[b"None"]]))
    with pytest.raises(ValueError, match="expected \\[n, 4, MSL\\]"):
        c.LlavaH5Dataset(str(tmp_path / "d"), None, None, (3, 4, 4))


# ----------------------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------------------


def _clip_processor():
    from transformers import CLIPImageProcessor

    cfg = {"crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True, "image_mean": CLIP_MEAN,
           "image_std": CLIP_STD, "resample": 3, "size": 336}
    ref = REFERENCE / "hf_configs" / "openai--clip-vit-large-patch14-336" / "preprocessor_config.json"
    if ref.is_file():  # the real openai/clip-vit-large-patch14-336 settings, when present
        cfg = {k: v for k, v in json.loads(ref.read_text()).items() if k != "feature_extractor_type"}
    return CLIPImageProcessor(**cfg)


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (336, 336), (503, 336), (1000, 223), (200, 150)])
def test_resize_crop_normalize_matches_clip_image_processor(size):
    img = noise_image(*size, seed=size[0])
    ours = c.build_transforms(LLAVA_336[1:])(img)
    theirs = _clip_processor()(images=img, return_tensors="np")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 336, 336) and ours.dtype == np.float32
    assert np.abs(ours - theirs).max() < 1e-2


def _expand2square_llava(pil_img, background_color):
    """LLaVA's expand2square (llava/mm_utils.py), restated."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    side = max(width, height)
    result = Image.new(pil_img.mode, (side, side), background_color)
    result.paste(pil_img, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
    return result


@pytest.mark.parametrize("size", [(40, 30), (30, 41), (25, 25)])
def test_expand_to_square_matches_llava(size):
    img = noise_image(*size)
    fn = c.TRANSFORMS["expand_to_square"](background_color=[122, 116, 104])
    out = np.asarray(fn(img))
    np.testing.assert_array_equal(out, np.asarray(_expand2square_llava(img, (122, 116, 104))))
    side = max(size)
    assert out.shape == (side, side, 3)
    if size[0] > size[1]:  # wide: background bands above and below, image centred vertically
        top = (size[0] - size[1]) // 2
        assert (out[:top] == [122, 116, 104]).all() and (out[top + size[1]:] == [122, 116, 104]).all()
        np.testing.assert_array_equal(out[top:top + size[1]], np.asarray(img))


def test_full_llava_pipeline_pads_then_matches_clip():
    img = noise_image(300, 200)
    ours = c.build_transforms(LLAVA_336)(img)
    theirs = _clip_processor()(images=_expand2square_llava(img, (122, 116, 104)), return_tensors="np")
    assert np.abs(ours - theirs["pixel_values"][0]).max() < 1e-2


def test_unknown_transform_lists_supported():
    with pytest.raises(ValueError, match="supported: expand_to_square, resize"):
        c.build_transforms([{"name": "random_flip"}])


# ----------------------------------------------------------------------------------------------------------
# Sampler
# ----------------------------------------------------------------------------------------------------------


def test_sampler_order_without_shuffle_and_cerebras_permutation():
    assert list(c.ResumableSampler(7, shuffle=False, num_epochs=1)) == list(range(7))
    s = c.ResumableSampler(10, shuffle=True, seed=5, num_epochs=2)
    got = list(s)
    g = torch.Generator()
    want = []
    for e in range(2):
        g.manual_seed(5 + e)
        want += torch.randperm(10, generator=g).tolist()
    assert got == want and got[:10] != got[10:]
    assert list(c.ResumableSampler(10, seed=5, num_epochs=2)) == got  # deterministic


def test_sampler_ranks_split_the_global_order_equally():
    n, w = 11, 3
    full = c.ResumableSampler(n, seed=1, num_epochs=1).epoch_order(0).tolist()
    parts = [list(c.ResumableSampler(n, seed=1, rank=r, world_size=w, num_epochs=1)) for r in range(w)]
    assert [len(p) for p in parts] == [3, 3, 3]
    assert sorted(sum(parts, [])) == sorted(full[:9]) and len(set(sum(parts, []))) == 9
    assert parts[1] == full[:9][1::3]


@pytest.mark.parametrize("world_size", [1, 2])
def test_sampler_resume_continues_exactly(world_size):
    n, consumed_per_rank = 9, 7  # crosses an epoch boundary after resuming
    fresh = [iter(c.ResumableSampler(n, seed=3, rank=r, world_size=world_size)) for r in range(world_size)]
    for it in fresh:
        list(itertools.islice(it, consumed_per_rank))
    start = consumed_per_rank * world_size
    for r, it in enumerate(fresh):
        resumed = c.ResumableSampler(n, seed=3, rank=r, world_size=world_size, start_sample=start)
        assert list(itertools.islice(iter(resumed), 20)) == list(itertools.islice(it, 20))


@pytest.mark.parametrize("start,rank", [(0, 0), (5, 1), (6, 0), (17, 2)])
def test_sampler_len_matches_iteration(start, rank):
    s = c.ResumableSampler(10, seed=0, rank=rank, world_size=3, start_sample=start, num_epochs=2)
    assert len(s) == len(list(s))
