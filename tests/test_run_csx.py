"""The CSX code path of run.py (run_csx.py) on cerebras.pytorch's CPU backend, plus a CSX-backend compile-only trace.

Run in the Cerebras environment (skipped elsewhere; set LLAVA_REQUIRE_CSTORCH=1 to make a missing cstorch an error):
    .venv-csx/bin/python -m pytest -q tests/test_run_csx.py

cstorch allows one backend per process, so every run is a `python run.py CSX --cstorch_backend CPU ...` subprocess.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

if os.environ.get("LLAVA_REQUIRE_CSTORCH"):
    import cerebras.pytorch as cstorch  # CI's Cerebras stage: an import failure must not become a skip
else:
    cstorch = pytest.importorskip("cerebras.pytorch")

import torch  # noqa: E402

import create_hdf5_dataset as hd  # noqa: E402
import preprocess_dataset as pd  # noqa: E402
import run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# One intra-op thread: this tiny model runs about 3x faster than with 2 threads contending for 2 shared cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PHASE1 = str(ROOT / "configs" / "params_llava_tiny_phase1.yaml")
BATCH, STEPS = 4, 4
METRICS = {"step", "loss", "perplexity", "accuracy", "first_answer_token_accuracy", "majority_first_answer_baseline",
           "eval_tokens", "eval_answers"}  # the keys of run.evaluate's eval_<step>.json


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tiny phase-1 H5 data (synthetic_shapes, demo preprocessing yaml): 24 train and 8 eval samples."""
    root = tmp_path_factory.mktemp("csxdata")
    pd.make_synthetic_shapes(root / "raw", num_train=24, num_eval=8, progress=False)
    out = {"images": root / "raw" / "images"}
    for split in ("train", "eval"):
        out[split] = root / "h5" / split
        code = hd.main(["LlavaPhaseOne", "--params", str(ROOT / "configs" / "demo_phase_1_preproc.yaml"),
                        "--input_dir", str(root / "raw" / "phase1" / split), "--output_dir", str(out[split]),
                        "--huggingface_tokenizer", str(root / "raw" / "tokenizer"),
                        "--image_dir", str(out["images"]), "--processes", "1", "--no_progress"])
        assert code in (0, None)
    return out


def overrides(data, **extra):
    values = {
        "train_input.data_dir": data["train"], "eval_input.data_dir": data["eval"],
        "train_input.img_data_dir": data["images"], "eval_input.img_data_dir": data["images"],
        "train_input.batch_size": BATCH, "eval_input.batch_size": BATCH,
        "runconfig.max_steps": STEPS, "runconfig.log_steps": 1, "runconfig.checkpoint_steps": 2,
        "runconfig.max_checkpoints": 2,
        "optimizer.learning_rate.0.total_iters": 2, "optimizer.learning_rate.1.total_iters": 10,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def run_py(target, mode, model_dir, data, *more, expect_ok=True, **extra):
    """python run.py TARGET (CSX: on the cstorch CPU backend unless --cstorch_backend is in `more`)."""
    cmd = [sys.executable, "run.py", target, "--mode", mode, "--params", PHASE1, "--model_dir", str(model_dir),
           "--no_progress", *more, *overrides(data, **extra)]
    if target == "CSX" and "--cstorch_backend" not in more:
        cmd[3:3] = ["--cstorch_backend", "CPU"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def train_log(model_dir) -> dict:
    """step -> logged values (the last entry wins: a resumed run logs its steps again)."""
    lines = (Path(model_dir) / "train" / "metrics.jsonl").read_text().splitlines()
    return {rec["step"]: rec for rec in map(json.loads, lines)}


def losses(model_dir) -> dict:
    return {step: rec["loss"] for step, rec in train_log(model_dir).items()}


def checkpoints(model_dir) -> list:
    return [p.name for p in run.list_checkpoints(Path(model_dir))]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """4 CSX-path steps on the CPU backend with checkpoints at 2 and 4, then eval_4.json."""
    model_dir = tmp_path_factory.mktemp("csx_train")
    run_py("CSX", "train_and_eval", model_dir, data, **{"runconfig.max_checkpoints": 3})
    return model_dir


@pytest.fixture(scope="module")
def continued(trained, data, tmp_path_factory):
    """A copy of `trained` whose newest checkpoint (4) is gone, run again to step 6 with evals at 5 and 6: it
    resumes from checkpoint_2 by itself and redoes steps 3 and 4."""
    model_dir = tmp_path_factory.mktemp("csx_continued") / "m"
    shutil.copytree(trained, model_dir, symlinks=True)
    (model_dir / "checkpoint_4.mdl").unlink()
    proc = run_py("CSX", "train_and_eval", model_dir, data,
                  **{"runconfig.max_steps": 6, "runconfig.eval_frequency": 5})
    return model_dir, proc


# ----------------------------------------------------------------------------------------------


def test_training_logs_finite_loss_and_writes_cstorch_checkpoints(trained):
    log = train_log(trained)
    assert sorted(log) == [1, 2, 3, 4]
    assert all(math.isfinite(rec["loss"]) and rec["loss"] > 0 for rec in log.values())
    assert {"lr", "grad_norm", "samples_per_sec", "tokens_per_sec"} <= set(log[1])
    assert list((trained / "train").glob("events.out.tfevents.*")), "no TensorBoard events"
    assert checkpoints(trained) == ["checkpoint_2.mdl", "checkpoint_4.mdl"]

    ckpt = cstorch.load(str(trained / "checkpoint_4.mdl"))  # an HDF5 file in cstorch's format
    assert ckpt["global_step"] == 4
    assert ckpt["dataloader"] == {"samples_streamed": STEPS * BATCH, "seed": 1234}
    assert ckpt["lr_scheduler"]["last_step"] == 4
    meta = ckpt["__metadata__"][-1]
    assert meta["version"] == cstorch.__version__ and meta["llava_pipeline"]["writer"] == "run_csx.py"
    params = meta["params"]
    assert params["train_input"]["batch_size"] == BATCH and params["model"]["freeze"] == ["^image_model", "^text_model"]
    state = ckpt["optimizer"]["state"][0]
    assert {"exp_avg", "exp_avg_sq", "beta1_power", "step"} <= set(state) and float(state["step"]) == 4

    # model keys are LlavaModel's (`model.` prefix); phase 1 trains only the projector
    import model as M

    expected = set(M.LlavaModel(run.parse_sections(params)["model"]).state_dict())
    assert set(ckpt["model"]) == expected
    before = cstorch.load(str(trained / "checkpoint_2.mdl"))["model"]
    changed = {k for k in expected if not torch.equal(torch.as_tensor(before[k]), torch.as_tensor(ckpt["model"][k]))}
    assert changed and all(k.startswith("model.projector_image_model.") for k in changed)


def test_eval_writes_run_py_metrics(trained):
    metrics = json.loads((trained / "eval_4.json").read_text())
    assert set(metrics) == METRICS and metrics["step"] == 4
    assert metrics["eval_tokens"] > 0 and metrics["eval_answers"] == 8  # 2 batches of 4, one answer each
    assert 0 <= metrics["accuracy"] <= 1 and metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))


def test_resume_is_exact_and_keeps_the_newest_checkpoints(trained, continued):
    model_dir, proc = continued
    assert "Loaded " + str(model_dir / "checkpoint_2.mdl") in proc.stderr  # the newest one left
    original, resumed = losses(trained), losses(model_dir)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert (resumed[3], resumed[4]) == (original[3], original[4])  # bitwise on the CPU backend
    assert checkpoints(model_dir) == ["checkpoint_4.mdl", "checkpoint_6.mdl"]  # max_checkpoints: 2
    for step in (5, 6):
        assert json.loads((model_dir / f"eval_{step}.json").read_text())["step"] == step


def test_checkpoints_move_between_the_gpu_cpu_path_and_the_csx_path(trained, continued, data, tmp_path):
    """CSX checkpoint (cstorch.save) -> run.py CPU, and its checkpoint (torch.save) -> CSX path, continue the
    same run: same losses and eval metrics up to float rounding (full logits vs run.py's sparse ones)."""
    torch_dir, csx_dir = tmp_path / "torch", tmp_path / "csx"
    run_py("CPU", "train_and_eval", torch_dir, data, "--checkpoint_path", str(trained / "checkpoint_2.mdl"),
           **{"runconfig.trim_batches": "false"})
    reference, continued_torch = losses(trained), losses(torch_dir)
    assert sorted(continued_torch) == [3, 4]
    for step in (3, 4):
        assert continued_torch[step] == pytest.approx(reference[step], rel=1e-5), step
    torch_metrics = json.loads((torch_dir / "eval_4.json").read_text())
    csx_metrics = json.loads((trained / "eval_4.json").read_text())
    assert set(torch_metrics) == METRICS
    for key in METRICS:
        assert csx_metrics[key] == pytest.approx(torch_metrics[key], rel=1e-4), key

    run_py("CSX", "train", csx_dir, data, "--checkpoint_path", str(torch_dir / "checkpoint_4.mdl"),
           **{"runconfig.max_steps": 6})
    reference, back = losses(continued[0]), losses(csx_dir)
    assert sorted(back) == [5, 6]
    for step in (5, 6):
        assert back[step] == pytest.approx(reference[step], rel=1e-5), step


def test_modelzoo_shaped_cstorch_checkpoint_resumes_with_all_states(trained, data, tmp_path):
    """A cstorch.save (HDF5) checkpoint in Cerebras ModelZoo's shape (plain version in __metadata__, two AdamW
    groups without `step`, the scheduler under `schedulers`) resumes on the CSX path and continues bitwise."""
    ckpt = cstorch.load(str(trained / "checkpoint_2.mdl"))
    assert [len(g["params"]) for g in ckpt["optimizer"]["param_groups"]] == [2, 2]  # weight decay, no decay
    params = ckpt["__metadata__"][-1]["params"]
    scheduler = {k: v for k, v in ckpt["lr_scheduler"].items() if k != "last_step"}
    optimizer = {"state": {i: {k: v for k, v in s.items() if k != "step"} for i, s in ckpt["optimizer"]["state"].items()},
                 "param_groups": ckpt["optimizer"]["param_groups"]}
    modelzoo = {"model": ckpt["model"], "optimizer": optimizer, "schedulers": [scheduler],
                "global_step": ckpt["global_step"], "dataloader": ckpt["dataloader"],
                "__metadata__": [{"version": cstorch.__version__, "model_name": "LlavaModel", "params": params}]}
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    cstorch.save(modelzoo, str(model_dir / "checkpoint_2.mdl"))
    run_py("CSX", "train", model_dir, data)
    original, resumed = losses(trained), losses(model_dir)
    assert sorted(resumed) == [3, 4] and (resumed[3], resumed[4]) == (original[3], original[4])


def test_converted_checkpoint_without_prefix_loads_into_the_inner_model(trained, data, tmp_path):
    """A converted checkpoint ({"model": Llava keys without `model.`}) evaluates like the checkpoint it came from."""
    weights = cstorch.load(str(trained / "checkpoint_4.mdl"))["model"]
    converted = tmp_path / "pytorch_model_to_cs-2.2.mdl"
    torch.save({"model": {k.removeprefix("model."): torch.as_tensor(v).clone() for k, v in weights.items()}}, converted)
    run_py("CSX", "eval", tmp_path / "eval", data, "--checkpoint_path", str(converted))
    metrics = json.loads((tmp_path / "eval" / "eval_0.json").read_text())  # no global_step in it: step 0
    expected = json.loads((trained / "eval_4.json").read_text())
    assert {k: v for k, v in metrics.items() if k != "step"} == {k: v for k, v in expected.items() if k != "step"}


def test_predict_answers_from_a_csx_checkpoint(trained, data, tmp_path):
    """run.py CPU --mode predict in the Cerebras environment reads the CSX path's cstorch (HDF5) checkpoint."""
    questions = data["images"].parent / "phase2" / "eval" / "questions.jsonl"
    answers = tmp_path / "answers.jsonl"
    run_py("CPU", "predict", tmp_path / "pred", data, "--checkpoint_path", str(trained / "checkpoint_4.mdl"),
           "--questions", str(questions), "--answers", str(answers), "--max_new_tokens", "3")
    got = [json.loads(line)["question_id"] for line in answers.read_text().splitlines()]
    assert got == [json.loads(line)["question_id"] for line in questions.read_text().splitlines()]
    assert json.loads((tmp_path / "pred" / "predict_4.json").read_text())["answered"] == len(got)


def test_nan_loss_stops_before_the_checkpoint_and_names_the_last_good_one(data, tmp_path):
    proc = run_py("CSX", "train", tmp_path, data, expect_ok=False,
                  **{"optimizer.learning_rate": "1.0e+30", "optimizer.max_gradient_norm": "null",
                     "runconfig.checkpoint_steps": 1, "train_input.mixed_precision": "true",
                     "train_input.fp16_type": "cbfloat16"})
    assert proc.returncode != 0
    assert "runs as bfloat16 on the cstorch CPU backend" in proc.stderr
    assert f"at step 2; the last good checkpoint is {tmp_path / 'checkpoint_1.mdl'}" in proc.stdout + proc.stderr
    assert checkpoints(tmp_path) == ["checkpoint_1.mdl"]


def test_compile_only_on_the_csx_backend_traces_the_training_step(data, tmp_path):
    """No appliance here: the CSX backend traces the whole step (model, cbfloat16, GradScaler, AdamW, schedule)
    into torch.mlir locally; lowering it needs the Cerebras SDK's torch-cirh-opt, which the wheel lacks."""
    compile_only_traces(tmp_path, data, **{"train_input.micro_batch_size": 2})
    assert checkpoints(tmp_path) == []


def compile_only_traces(tmp_path, data, **extra) -> None:
    """run.py CSX --compile_only in cbfloat16 on the CSX backend: the step is traced into torch.mlir, and only
    the SDK-less lowering after it fails."""
    proc = run_py("CSX", "train", tmp_path, data, "--cstorch_backend", "CSX", "--compile_only",
                  "--mgmt_address", "localhost:9", expect_ok=False,
                  **{"train_input.mixed_precision": "true", "train_input.fp16_type": "cbfloat16", **extra})
    out = proc.stdout + proc.stderr
    assert "CSX compile failed: torch-to-cirh lowering failed" in out, out[-3000:]
    assert (tmp_path / "cerebras_logs" / "executors" / "000001" / "torch.mlir").stat().st_size > 0


SCHEDULE_CHECK = textwrap.dedent("""
    import json, sys
    import torch
    import cerebras.pytorch as cstorch
    import run, run_csx

    cstorch.backend("CPU", artifact_dir=sys.argv[1])
    out = {}
    for name, spec in json.loads(sys.argv[2]).items():
        param = torch.nn.Parameter(torch.zeros(2))
        opt = run_csx.make_optimizer(run.OptimizerConfig(learning_rate=spec), [param])
        scheduler, milestones = run_csx.make_scheduler(opt, spec)
        lrs = []
        for _ in range(12):
            lrs.append(float(opt.param_groups[0]["lr"]))
            param.grad = torch.ones(2)
            opt.step()
            scheduler.step()
        # a GPU/CPU checkpoint's {"last_step": 5} on a fresh optimizer continues with the lr of step 6
        opt2 = run_csx.make_optimizer(run.OptimizerConfig(learning_rate=spec), [torch.nn.Parameter(torch.zeros(2))])
        scheduler2, _ = run_csx.make_scheduler(opt2, spec)
        scheduler2.load_state_dict(run_csx.scheduler_state_at(scheduler2, 5, milestones))
        opt2.param_groups[0]["lr"] = run.lr_schedule(spec)(5)
        after = []
        for _ in range(3):
            opt2.step()
            scheduler2.step()
            after.append(float(opt2.param_groups[0]["lr"]))
        out[name] = {"lrs": lrs, "after_resume": after}
    # optimizer state after 3 steps: cstorch's beta powers must be those of step 4
    group = {"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "correct_bias": True, "params": [0]}
    def beta1_power(entries, from_torch):
        param = torch.nn.Parameter(torch.zeros(2))
        opt = run_csx.make_optimizer(run.OptimizerConfig(learning_rate=0.1), [param])
        state = {"exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2), **entries}
        run_csx.load_optimizer_state(opt, {"state": {0: state}, "param_groups": [group]}, from_torch)
        return float(opt.state[param]["beta1_power"])
    stale = {"beta1_power": torch.tensor(0.9 ** 2), "beta2_power": torch.tensor(0.999 ** 2)}
    out["beta1_power"] = {
        "torch": beta1_power({"step": torch.tensor(3.0)}, True),
        "torch_with_stale_powers": beta1_power({"step": torch.tensor(3.0), **stale}, True),
        "cstorch": beta1_power({"step": torch.tensor(3.0), "beta1_power": torch.tensor(0.9 ** 4),
                                "beta2_power": torch.tensor(0.999 ** 4)}, False),
    }
    print(json.dumps(out))
""")


def test_cstorch_schedulers_follow_the_yaml_schedule(tmp_path):
    """cstorch LinearLR / CosineDecayLR / ConstantLR / ExponentialLR / SequentialLR from the yaml grammar give the
    lr of run.lr_schedule at every step, also after loading a GPU/CPU checkpoint's scheduler position."""
    specs = {
        "number": 0.01,
        "warmup_cosine": [{"scheduler": "Linear", "initial_learning_rate": 0.0, "end_learning_rate": 0.01,
                           "total_iters": 3},
                          {"scheduler": "CosineDecayLR", "initial_learning_rate": 0.01, "end_learning_rate": 0.001,
                           "total_iters": 6}],
        "three": [{"scheduler": "linear", "initial_learning_rate": 0.0, "end_learning_rate": 1.0, "total_iters": 2},
                  {"scheduler": "ConstantLR", "learning_rate": 1.0, "total_iters": 2},
                  {"scheduler": "Exponential", "initial_learning_rate": 1.0, "decay_rate": 0.5, "total_iters": 4}],
    }
    proc = subprocess.run([sys.executable, "-c", SCHEDULE_CHECK, str(tmp_path), json.dumps(specs)], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, spec in specs.items():
        fn = run.lr_schedule(spec)
        assert out[name]["lrs"] == pytest.approx([fn(t) for t in range(12)], rel=1e-5, abs=1e-7), name
        assert out[name]["after_resume"] == pytest.approx([fn(t) for t in (6, 7, 8)], rel=1e-5, abs=1e-7), name
    assert out["beta1_power"] == pytest.approx({"torch": 0.9 ** 4, "torch_with_stale_powers": 0.9 ** 4,
                                                "cstorch": 0.9 ** 4})


MODELZOO_LOAD = textwrap.dedent("""
    import json, sys
    import torch
    import cerebras.pytorch as cstorch
    import model as M, run, run_csx

    cstorch.backend("CPU", artifact_dir=sys.argv[1])
    ckpt = torch.load(sys.argv[2], map_location="cpu", weights_only=True)
    params = ckpt["__metadata__"][-1]["params"]
    llava = M.LlavaModel(params["model"])
    llava.load_state_dict(ckpt["model"])
    opt_cfg = run.parse_sections(params)["optimizer"]
    # what ModelZoo does: its groups, cstorch AdamW and schedulers, plain load_state_dict, no adaptation
    groups = M.optimizer_param_groups(llava, opt_cfg.weight_decay)
    opt = cstorch.optim.AdamW(groups, lr=0.0, betas=tuple(opt_cfg.betas), eps=opt_cfg.eps,
                              weight_decay=opt_cfg.weight_decay, correct_bias=opt_cfg.correct_bias)
    scheduler, _ = run_csx.make_scheduler(opt, opt_cfg.learning_rate)
    opt.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["lr_scheduler"])
    first = groups[0]["params"][0]
    moments_equal = bool(torch.equal(opt.state[first]["exp_avg"], ckpt["optimizer"]["state"][0]["exp_avg"]))
    beta1_power = float(opt.state[first]["beta1_power"])
    for p in llava.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    scheduler.step()
    print(json.dumps({"moments_equal": moments_equal, "beta1_power": beta1_power,
                      "next_lr": float(opt.param_groups[0]["lr"]), "betas": list(opt_cfg.betas)}))
""")


def test_run_py_checkpoint_loads_as_modelzoo_loads_it(data, tmp_path):
    """A run.py checkpoint into cstorch's AdamW and schedulers built ModelZoo's way and loaded with plain
    load_state_dict (what ModelZoo's Trainer does): moments, bias-correction powers and schedule position hold."""
    run_py("CPU", "train", tmp_path / "torch", data, **{"runconfig.max_steps": 2})
    proc = subprocess.run([sys.executable, "-c", MODELZOO_LOAD, str(tmp_path / "logs"),
                           str(tmp_path / "torch" / "checkpoint_2.mdl")], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["moments_equal"]
    assert out["beta1_power"] == pytest.approx(out["betas"][0] ** 3)  # cstorch's power after 2 steps
    spec = run.load_params(PHASE1, overrides(data))["optimizer"]["learning_rate"]
    assert out["next_lr"] == pytest.approx(run.lr_schedule(spec)(3), rel=1e-6, abs=1e-9)


# ----------------------------------------------------------------------------------------------
# Sequence packing on the CSX path

PACKED = {"train_input.packing": "true", "eval_input.packing": "true", "eval_input.batch_size": 1}


def test_packed_csx_path_matches_the_gpu_cpu_path(data, tmp_path):
    """Packed rows on the CSX path and on run.py CPU from the same checkpoint (the backends initialise weights
    differently): the same packed stream, the same losses and eval metrics up to float rounding."""
    csx, cpu = tmp_path / "csx", tmp_path / "cpu"
    run_py("CSX", "train_and_eval", csx, data, **PACKED)
    ckpt = cstorch.load(str(csx / "checkpoint_2.mdl"))
    assert ckpt["dataloader"] == {"samples_streamed": 2 * BATCH, "seed": 1234, "packing": True}
    run_py("CPU", "train_and_eval", cpu, data, "--checkpoint_path", str(csx / "checkpoint_2.mdl"), **PACKED)
    a, b = losses(csx), losses(cpu)
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [3, 4]
    assert all(a[s] == pytest.approx(b[s], rel=1e-5) for s in (3, 4)), (a, b)
    ea = json.loads((csx / "eval_4.json").read_text())
    eb = json.loads((cpu / "eval_4.json").read_text())
    for key in METRICS:
        assert ea[key] == pytest.approx(eb[key], rel=1e-4), key


def test_compile_only_traces_the_packed_training_step(data, tmp_path):
    compile_only_traces(tmp_path, data, **PACKED, **{"train_input.max_images_per_row": 2})
