"""run.py on CPU: training, checkpoints, exact resume after SIGKILL, DDP/FSDP with gloo, config errors, eval."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import create_hdf5_dataset as hd
import model as M
import modeling_llava as ml
import preprocess_dataset as pd
import run

ROOT = Path(__file__).resolve().parents[1]
PHASE1 = str(ROOT / "configs" / "params_llava_tiny_phase1.yaml")
PHASE2 = str(ROOT / "configs" / "params_llava_tiny_phase2.yaml")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tiny synthetic_shapes H5 data for both phases (train and eval splits)."""
    root = tmp_path_factory.mktemp("rundata")
    pd.make_synthetic_shapes(root / "raw", num_train=48, num_eval=16, progress=False)
    out = {}
    for phase, name in ((1, "LlavaPhaseOne"), (2, "LlavaPhaseTwo")):
        for split in ("train", "eval"):
            target = root / "h5" / f"phase{phase}" / split
            code = hd.main([name, "--params", str(ROOT / "configs" / f"demo_phase_{phase}_preproc.yaml"),
                            "--input_dir", str(root / "raw" / f"phase{phase}" / split), "--output_dir", str(target),
                            "--huggingface_tokenizer", str(root / "raw" / "tokenizer"),
                            "--image_dir", str(root / "raw" / "images"), "--processes", "1", "--no_progress"])
            assert code in (0, None)
            out[(phase, split)] = target
        params = json.loads((out[(phase, "train")] / "data_params.json").read_text())
        out[(phase, "start")] = params["image_patch_info"]["image_patch_start_idx"]
    out["images"] = root / "raw" / "images"
    return out


def overrides(data, phase, steps=4, batch=8, **extra):
    values = {
        "train_input.data_dir": data[(phase, "train")], "eval_input.data_dir": data[(phase, "eval")],
        "train_input.img_data_dir": data["images"], "eval_input.img_data_dir": data["images"],
        "train_input.batch_size": batch, "eval_input.batch_size": batch, "model.image_start_idx": data[(phase, "start")],
        "runconfig.max_steps": steps, "runconfig.log_steps": 1, "runconfig.checkpoint_steps": steps,
        "optimizer.learning_rate.0.total_iters": 2, "optimizer.learning_rate.1.total_iters": 20,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def cli(target, mode, params, model_dir, data, phase, *more, **extra):
    return [target, "--mode", mode, "--params", params, "--model_dir", str(model_dir), "--no_progress",
            *more, *overrides(data, phase, **extra)]


def losses(model_dir):
    """Loss per step from the metrics log (the last entry wins: a resumed run re-logs steps after its checkpoint)."""
    out = {}
    for line in (Path(model_dir) / "train" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------


def test_phase1_updates_only_the_projector(data, tmp_path):
    run.main(cli("CPU", "train", PHASE1, tmp_path, data, 1, steps=3))
    ckpt = weights(tmp_path / "checkpoint_3.mdl")
    assert ckpt["global_step"] == 3 and set(ckpt) >= {"model", "optimizer", "lr_scheduler", "dataloader"}
    # run.py seeds torch with runconfig.seed before building the model: rebuild the initial weights the same way
    params = run.apply_overrides(run.load_params(PHASE1, []), overrides(data, 1))
    torch.manual_seed(params["runconfig"]["seed"])
    initial = M.LlavaModel(params["model"]).state_dict()
    changed = {k for k, v in ckpt["model"].items() if not torch.equal(v, initial[k])}
    assert changed and all(k.startswith("model.projector_image_model.") for k in changed)
    assert all(k.startswith("model.") for k in ckpt["model"])
    saved = run.load_params(str(tmp_path / "params_train.yaml"), [])  # resolved config next to the checkpoints
    assert saved["runconfig"]["max_steps"] == 3


def test_eval_mode_reports_loss_perplexity_accuracy(data, tmp_path):
    run.main(cli("CPU", "train", PHASE2, tmp_path, data, 2, steps=2))
    metrics = run.main(cli("CPU", "eval", PHASE2, tmp_path, data, 2))
    written = json.loads((tmp_path / "eval_2.json").read_text())
    assert written == metrics
    assert metrics["perplexity"] == pytest.approx(torch.tensor(metrics["loss"]).exp().item(), rel=1e-5)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["eval_tokens"] > 0 and metrics["eval_answers"] > 0
    assert list((tmp_path / "eval").glob("events.out.tfevents*"))  # TensorBoard


def test_batch_trimming_does_not_change_the_loss(data, tmp_path):
    run.main(cli("CPU", "train", PHASE2, tmp_path / "trim", data, 2, steps=2))
    run.main(cli("CPU", "train", PHASE2, tmp_path / "full", data, 2, steps=2, **{"runconfig.trim_batches": False}))
    a, b = losses(tmp_path / "trim"), losses(tmp_path / "full")
    assert a.keys() == b.keys() and all(a[s] == pytest.approx(b[s], abs=1e-5) for s in a)


def test_gradient_accumulation_equals_one_big_batch(data, tmp_path):
    run.main(cli("CPU", "train", PHASE2, tmp_path / "big", data, 2, steps=3))
    run.main(cli("CPU", "train", PHASE2, tmp_path / "acc", data, 2, steps=3, **{"train_input.micro_batch_size": 2}))
    a, b = losses(tmp_path / "big"), losses(tmp_path / "acc")
    assert all(a[s] == pytest.approx(b[s], abs=1e-5) for s in a)
    wa, wb = weights(tmp_path / "big" / "checkpoint_3.mdl")["model"], weights(tmp_path / "acc" / "checkpoint_3.mdl")["model"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


@pytest.mark.parametrize("packing", [False, True])
def test_resume_after_sigkill_is_exact(data, tmp_path, packing):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [sys.executable, str(ROOT / "run.py")]
    pack = {"train_input.packing": packing}
    straight = tmp_path / "straight"
    subprocess.run(base + cli("CPU", "train", PHASE2, straight, data, 2, steps=6,
                              **{"runconfig.checkpoint_steps": 2}, **pack), check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    # a long run, killed with SIGKILL once checkpoint_2 exists, then resumed from it up to step 6
    proc = subprocess.Popen(base + cli("CPU", "train", PHASE2, killed, data, 2, steps=10000,
                                       **{"runconfig.checkpoint_steps": 2, "runconfig.max_checkpoints": 100},
                                       **pack),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoint_2.mdl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoint_2.mdl").exists()
    assert not list(killed.glob("*.tmp"))
    subprocess.run(base + cli("CPU", "train", PHASE2, killed, data, 2, "--checkpoint_path",
                              str(killed / "checkpoint_2.mdl"), steps=6, **{"runconfig.checkpoint_steps": 2}, **pack),
                   check=True, env=env, capture_output=True)
    a, b = weights(straight / "checkpoint_6.mdl"), weights(killed / "checkpoint_6.mdl")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["dataloader"] == b["dataloader"] and a["lr_scheduler"] == b["lr_scheduler"]
    la, lb = losses(straight), losses(killed)
    assert all(la[s] == lb[s] for s in range(1, 7))


def test_autoload_resumes_from_newest_checkpoint_and_keeps_n(data, tmp_path):
    run.main(cli("CPU", "train", PHASE2, tmp_path, data, 2, steps=4, **{"runconfig.checkpoint_steps": 1,
                                                                       "runconfig.max_checkpoints": 2}))
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.mdl")) == ["checkpoint_3.mdl", "checkpoint_4.mdl"]
    run.main(cli("CPU", "train", PHASE2, tmp_path, data, 2, steps=5, **{"runconfig.max_checkpoints": 2}))
    assert weights(tmp_path / "checkpoint_5.mdl")["global_step"] == 5
    assert max(losses(tmp_path)) == 5


def test_phase2_from_phase1_weights_only(data, tmp_path):
    run.main(cli("CPU", "train", PHASE1, tmp_path / "p1", data, 1, steps=2))
    run.main(cli("CPU", "train", PHASE2, tmp_path / "p2", data, 2, "--checkpoint_path",
                 str(tmp_path / "p1" / "checkpoint_2.mdl"), steps=2))  # the yaml says load_checkpoint_states: model
    p2 = weights(tmp_path / "p2" / "checkpoint_2.mdl")
    assert p2["global_step"] == 2  # started from step 0, not from the phase-1 step


def test_converted_checkpoint_without_prefix_loads_into_inner_model(data, tmp_path):
    params = run.apply_overrides(run.load_params(PHASE2, []), overrides(data, 2))
    torch.manual_seed(5)
    inner = M.LlavaModel(params["model"]).model.state_dict()
    torch.save({"model": inner}, tmp_path / "converted.mdl")
    run.main(cli("CPU", "train", PHASE2, tmp_path / "out", data, 2, "--checkpoint_path", str(tmp_path / "converted.mdl"),
                 steps=1))
    out = weights(tmp_path / "out" / "checkpoint_1.mdl")["model"]
    key = "image_model.embedding_layer.cls_embedding"  # frozen in phase 2, so it is still the loaded value
    assert torch.equal(out["model." + key], inner[key])


def torchrun(nproc, args, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29500 + os.getpid() % 1000), str(ROOT / "run.py"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_ddp_two_processes_match_one_process(data, tmp_path):
    one = tmp_path / "one"
    run.main(cli("CPU", "train", PHASE2, one, data, 2, steps=3))
    two = tmp_path / "two"
    result = torchrun(2, cli("CPU", "train", PHASE2, two, data, 2, steps=3))
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = losses(one), losses(two)
    assert a.keys() == b.keys() and all(a[s] == pytest.approx(b[s], abs=1e-5) for s in a)
    wa, wb = weights(one / "checkpoint_3.mdl")["model"], weights(two / "checkpoint_3.mdl")["model"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


@pytest.mark.skipif(tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 6),
                    reason="FSDP2 on CPU processes (gloo) needs torch >= 2.6; torch 2.4's FSDP is CUDA-only")
def test_fsdp_two_processes_match_one_process(data, tmp_path):
    one = tmp_path / "one"
    run.main(cli("CPU", "train", PHASE2, one, data, 2, steps=2))
    two = tmp_path / "fsdp"
    result = torchrun(2, cli("CPU", "train", PHASE2, two, data, 2, steps=2,
                             **{"runconfig.distributed_strategy": "fsdp"}))
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = losses(one), losses(two)
    assert all(a[s] == pytest.approx(b[s], abs=1e-5) for s in a)
    wa, wb = weights(one / "checkpoint_2.mdl")["model"], weights(two / "checkpoint_2.mdl")["model"]
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    # the FSDP checkpoint (full optimizer state) resumes in a single process, and FSDP resumes the other way
    assert weights(two / "checkpoint_2.mdl")["optimizer"].keys() == weights(one / "checkpoint_2.mdl")["optimizer"].keys()
    run.main(cli("CPU", "train", PHASE2, two, data, 2, steps=3))
    run.main(cli("CPU", "train", PHASE2, one, data, 2, steps=3))
    result = torchrun(2, cli("CPU", "train", PHASE2, one, data, 2, steps=4, **{"runconfig.distributed_strategy": "fsdp"}))
    assert result.returncode == 0, result.stderr[-3000:]
    run.main(cli("CPU", "train", PHASE2, two, data, 2, steps=4))
    wa, wb = weights(one / "checkpoint_4.mdl")["model"], weights(two / "checkpoint_4.mdl")["model"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_predict_two_processes_match_one_process_and_stop_strings_cut(data, tmp_path):
    """--mode predict through torchrun: each rank answers its share of the questions, rank 0 merges them into one
    file in question order, the same answers as one process writes; --stop cuts each answer at the text."""
    run.main(cli("CPU", "train", PHASE2, tmp_path / "m", data, 2, steps=2))
    questions = data["images"].parent / "phase2" / "eval" / "questions.jsonl"

    def predict(name, *more):
        return cli("CPU", "predict", PHASE2, tmp_path / name, data, 2, "--checkpoint_path",
                   str(tmp_path / "m" / "checkpoint_2.mdl"), "--questions", str(questions), "--answers",
                   str(tmp_path / f"{name}.jsonl"), "--max_new_tokens", "8", "--predict_batch_size", "1", *more)

    def texts(name):
        return [(a["question_id"], a["text"]) for a in map(json.loads, (tmp_path / f"{name}.jsonl").read_text().splitlines())]

    run.main(predict("one"))
    result = torchrun(2, predict("two"))
    assert result.returncode == 0, result.stderr[-3000:]
    ids = [json.loads(line)["question_id"] for line in questions.read_text().splitlines()]
    assert [i for i, _ in texts("one")] == ids and texts("two") == texts("one")
    assert not list(tmp_path.glob(".two.jsonl.*"))  # the ranks' partial files are merged and removed
    report = json.loads((tmp_path / "two" / "predict_2.json").read_text())
    assert report["answered"] == len(ids) and report["accuracy"]["all"]["questions"] == len(ids)
    stop = next(t[1] for _, t in texts("one") if len(t) > 2 and not t[1].isspace())
    run.main(predict("stopped", "--stop", stop))
    cut = [(i, ml.cut_at_stop_string(t, [stop]).strip()) for i, t in texts("one")]
    assert texts("stopped") == cut and cut != texts("one")


# ----------------------------------------------------------------------------------------------
# Errors


def test_unknown_runconfig_key_is_reported(data, tmp_path):
    with pytest.raises(SystemExit, match=r"runconfig\.max_step.*max_steps"):
        run.main(cli("CPU", "train", PHASE2, tmp_path, data, 2, **{"runconfig.max_step": 3}))


def test_image_start_mismatch_names_the_value_to_set(data, tmp_path):
    start = data[(2, "start")]
    with pytest.raises(SystemExit, match=rf"set model.image_start_idx: {start}"):
        run.main(cli("CPU", "train", PHASE2, tmp_path, data, 2, **{"model.image_start_idx": start + 1}))


def test_nan_loss_stops_with_step_and_last_checkpoint(data, tmp_path):
    with pytest.raises(SystemExit, match=r"Loss is (nan|inf) at step \d+; the last good checkpoint is"):
        run.main(cli("CPU", "train", PHASE2, tmp_path, data, 2, steps=6, **{
            "optimizer.learning_rate": 1.0e12, "optimizer.max_gradient_norm": "null"}))


def test_gpu_without_cuda_says_so(data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match="CUDA is not available"):
        run.main(cli("GPU", "train", PHASE2, tmp_path, data, 2))


def test_checkpoint_that_does_not_match_the_model(data, tmp_path):
    torch.save({"model": {"model.something.weight": torch.zeros(2)}}, tmp_path / "bad.mdl")
    with pytest.raises(SystemExit, match="does not match the model"):
        run.main(cli("CPU", "train", PHASE2, tmp_path / "o", data, 2, "--checkpoint_path", str(tmp_path / "bad.mdl")))


def test_lr_schedule_is_sequential_with_cumulative_milestones():
    fn = run.lr_schedule([
        {"scheduler": "Linear", "initial_learning_rate": 0.0, "end_learning_rate": 1.0, "total_iters": 10},
        {"scheduler": "CosineDecayLR", "initial_learning_rate": 1.0, "end_learning_rate": 0.0, "total_iters": 20},
    ])
    assert fn(0) == 0.0 and fn(5) == pytest.approx(0.5) and fn(10) == pytest.approx(1.0)
    assert fn(20) == pytest.approx(0.5) and fn(30) == pytest.approx(0.0) and fn(100) == pytest.approx(0.0)


def test_csx_without_cerebras_names_the_requirements_file(data, tmp_path):
    try:
        import cerebras.pytorch  # noqa: F401
        pytest.skip("cerebras.pytorch is installed here (the CSX path is tested in test_run_csx.py)")
    except ImportError:
        pass
    with pytest.raises(SystemExit, match="requirements-csx.txt"):
        run.main(cli("CSX", "train", PHASE2, tmp_path, data, 2))


def test_checkpoint_with_wrong_shapes_names_the_problem(data, tmp_path):
    params = run.apply_overrides(run.load_params(PHASE2, []), overrides(data, 2))
    state = M.LlavaModel(params["model"]).state_dict()
    key = "model.text_model.embedding_layer.word_embeddings.weight"
    state[key] = torch.zeros(state[key].shape[0] + 5, state[key].shape[1])
    torch.save({"model": state}, tmp_path / "wide.mdl")
    with pytest.raises(SystemExit, match=r"(?s)does not fit the model.*size mismatch for model.text_model.embedding_layer.word_embeddings"):
        run.main(cli("CPU", "train", PHASE2, tmp_path / "o", data, 2, "--checkpoint_path", str(tmp_path / "wide.mdl")))


def test_bad_fp16_type_is_a_config_error(data, tmp_path):
    with pytest.raises(SystemExit, match=r"train_input.fp16_type: 'half'"):
        run.main(cli("CPU", "train", PHASE2, tmp_path, data, 2, **{"train_input.fp16_type": "half"}))
