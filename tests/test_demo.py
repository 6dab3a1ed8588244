"""demo.py end to end at a reduced size (about 75-100 s per family on 2 CPU cores): synthetic_shapes -> H5 -> phase 1
-> phase 2 -> held-out eval, for each --family: the LLaVA-1.5 recipe (vicuna_clip) and the tiny variants of the
Llama-3.1 + CLIP and Qwen2.5 + SigLIP recipes, whose phase-2 data follows the tokenizer's chat template. The questions
can only be answered from the image, so accuracy well above chance shows the image reaches the LM; the checkpoints
show which weights each phase trained; the llava-hf export answers through transformers' generate().

    python -m pytest -q tests/test_demo.py
"""

import pytest
import torch
import yaml

import demo
import model as M

# Reduced size: 1000 training images, 150 + 200 steps of batch 32. It reaches about 60% first-answer accuracy
# (uniform chance 21%); the full default demo about 95%.
REDUCED = ["--num_train", "1000", "--num_eval", "200", "--phase1_steps", "150", "--phase2_steps", "200",
           "--batch_size", "32"]


@pytest.fixture(scope="module", params=sorted(demo.FAMILIES))
def demo_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"demo_{request.param}") / "demo"
    metrics = demo.main([*REDUCED, "--family", request.param, "--output_dir", str(out), "--quiet"])
    return metrics, out


def initial_weights(params_yaml):
    """The weights run.py starts from: torch seeded with runconfig.seed, then the model built from the config."""
    params = yaml.safe_load(params_yaml.read_text())
    torch.manual_seed(params["runconfig"]["seed"])
    return M.LlavaModel(params["model"]).state_dict()


def checkpoint_model(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def changed_by_module(initial: dict, trained: dict) -> dict:
    """{module: [tensor changed?, ...]} for the three LLaVA modules (checkpoint names carry the `model.` prefix)."""
    assert set(initial) == set(trained)
    out = {}
    for name, tensor in initial.items():
        module = name.split(".")[1]
        out.setdefault(module, []).append(not torch.equal(tensor, trained[name]))
    assert set(out) == {"image_model", "text_model", "projector_image_model"}
    return out


def test_demo_answers_held_out_questions_far_above_chance(demo_run):
    metrics, _ = demo_run
    acc = metrics["first_answer_token_accuracy"]
    assert metrics["eval_answers"] > 200
    assert acc >= 2 * metrics["uniform_chance"], metrics
    assert acc > metrics["majority_first_answer_baseline"], metrics


def test_demo_generates_held_out_answers_and_draws_them(demo_run):
    """The demo's last stage (run.py --mode predict on the held-out questions): generated answers right far above
    chance, and predictions.png written as a grid of captioned images."""
    from PIL import Image

    import demo as D

    metrics, out = demo_run
    assert metrics["generated_answers"] == 200
    assert metrics["generated_answer_accuracy"] >= 2 * metrics["uniform_chance"], metrics
    picture = out / "predictions.png"
    assert metrics["predictions_picture"] == str(picture)
    with Image.open(picture) as im:
        columns, rows = D.PICTURE_GRID
        assert im.format == "PNG" and im.width >= columns * 64 * D.PICTURE_SCALE and im.height >= rows * 64
    assert not list(out.glob(".*.tmp"))


def test_picture_shows_some_wrong_answers_in_question_order():
    examples = [({"answer": "red"}, "red" if k % 3 else "blue") for k in range(30)]  # every third one wrong
    chosen = demo.picture_examples(examples, 16)
    assert len(chosen) == 16 and sum(a == "blue" for _, a in chosen) == 4
    assert chosen == [e for e in examples if any(e is c for c in chosen)]  # question order kept
    assert demo.picture_examples(examples[:3], 16) == examples[:3]


def test_phase1_trains_only_the_projector(demo_run):
    metrics, out = demo_run
    initial = initial_weights(out / "runs" / "phase1" / "params_train.yaml")
    changed = changed_by_module(initial, checkpoint_model(metrics["phase1_checkpoint"]))
    assert not any(changed["image_model"]) and not any(changed["text_model"])
    assert all(changed["projector_image_model"])


def test_phase2_trains_projector_and_lm_but_not_the_vit(demo_run):
    metrics, out = demo_run
    # Phase 2 starts from the phase-1 weights, which hold the seeded initial ViT and LM unchanged.
    initial = initial_weights(out / "runs" / "phase1" / "params_train.yaml")
    changed = changed_by_module(initial, checkpoint_model(metrics["phase2_checkpoint"]))
    assert not any(changed["image_model"])
    assert all(changed["text_model"]) and all(changed["projector_image_model"])


def test_exported_llava_hf_model_answers_through_transformers(demo_run):
    """The trained demo model handed to transformers (llava-hf export: weights, processor, chat template) answers the
    held-out questions with generate() about as well as run.py's own eval measured. It is fed the exported
    processor's own pixel values, which equal the ones training made (the config's transforms)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    import convert_checkpoint as cc
    import create_hdf5_dataset as hd

    metrics, out = demo_run
    root = Path(__file__).resolve().parents[1]
    export = out / "llava_hf"
    subprocess.run([sys.executable, str(root / "convert_checkpoint.py"), "convert", "--model", "llava", "--src-fmt",
                    "cs-2.2", "--tgt-fmt", "llava-hf", "--output-dir", str(export), "--tokenizer-dir",
                    str(out / "data" / "tokenizer"), "--no-progress-bar", metrics["phase2_checkpoint"]],
                   check=True, capture_output=True)
    hf = LlavaForConditionalGeneration.from_pretrained(export).eval()
    processor = AutoProcessor.from_pretrained(export)
    records = [json.loads(line) for line in (out / "data" / "phase2" / "eval" / "data.jsonl").read_text().splitlines()]
    records = [r for r in records if "image" in r][:40]
    params = torch.load(metrics["phase2_checkpoint"], weights_only=True)["__metadata__"][-1]["params"]
    training_pixels = hd.build_transforms(cc.training_transforms(params, "")[0])  # what the converter read
    right = 0
    for r in records:
        question = r["conversations"][0]["value"].replace("<image>", "").strip()
        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
        image = Image.open(out / "data" / "images" / r["image"]).convert("RGB")
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        assert (inputs["pixel_values"][0] - torch.from_numpy(training_pixels(image))).abs().max() <= 1e-5
        with torch.no_grad():
            tokens = hf.generate(**inputs, max_new_tokens=3, do_sample=False)
        answer = processor.tokenizer.decode(tokens[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        right += answer.strip().split(" ")[0].strip(".").lower() == r["conversations"][1]["value"].lower()
    accuracy = right / len(records)
    assert accuracy >= 2 * metrics["uniform_chance"], (accuracy, metrics)


def held_out_questions(out, limit=40):
    """The demo's held-out phase-2 image questions in the LLaVA repo's question format, with reference answers."""
    import json

    records = [json.loads(line) for line in (out / "data" / "phase2" / "eval" / "data.jsonl").read_text().splitlines()]
    records = [r for r in records if "image" in r][:limit]
    return [{"question_id": f"q{i}", "image": r["image"], "category": "demo",
             "text": r["conversations"][0]["value"].replace("<image>", "").strip(),
             "answer": r["conversations"][1]["value"]} for i, r in enumerate(records)]


def test_predict_mode_answers_held_out_questions_and_resumes(demo_run, tmp_path):
    """run.py --mode predict: prompts as the phase-2 data built them, answers in the LLaVA repo's format in
    question order, accuracy far above chance, an interrupted run's answers kept, a bad line and a missing image
    skipped and counted."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    metrics, out = demo_run
    root = Path(__file__).resolve().parents[1]
    questions = held_out_questions(out)
    lines = [json.dumps(q) for q in questions] + ["{not json", json.dumps(
        {"question_id": "missing", "image": "train/nope.png", "text": "What?"})]
    qfile = tmp_path / "questions.jsonl"
    qfile.write_text("\n".join(lines) + "\n")
    answers = tmp_path / "answers.jsonl"
    # an interrupted run had answered q0 already: it must be kept, not redone
    (tmp_path / ".answers.jsonl.partial-rank0").write_text(json.dumps(
        {"question_id": "q0", "prompt": "p", "text": "kept", "answer_id": "x", "model_id": "m", "metadata": {}}) + "\n")
    params = out / "runs" / "phase2" / "params_train_and_eval.yaml"
    cmd = [sys.executable, str(root / "run.py"), "CPU", "--mode", "predict", "--params", str(params),
           "--model_dir", str(tmp_path / "pred"), "--checkpoint_path", metrics["phase2_checkpoint"],
           "--questions", str(qfile), "--answers", str(answers), "--max_new_tokens", "4", "--no_progress"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    got = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [a["question_id"] for a in got] == [q["question_id"] for q in questions]
    assert set(got[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert got[0]["text"] == "kept"
    right = sum(a["text"].split(" ")[0].strip(".").lower() == q["answer"].lower() for a, q in zip(got[1:], questions[1:]))
    assert right / (len(got) - 1) >= 2 * metrics["uniform_chance"], (right, metrics)
    report = json.loads((tmp_path / "pred" / "predict_200.json").read_text())
    assert report["skipped"] == {"bad_lines": 1, "bad_image": 1, "too_long": 0}
    assert set(report["accuracy"]) == {"all", "demo"}
    assert not list(tmp_path.glob(".answers.jsonl.*"))  # partial files merged and removed


def test_chat_mode_answers_about_one_image(demo_run):
    """run.py --mode chat: --prompt answers once (only the answer on stdout); a console session answers each line
    with the earlier turns in the prompt, as a multi-turn training row holds them."""
    import subprocess
    import sys
    from pathlib import Path

    metrics, out = demo_run
    root = Path(__file__).resolve().parents[1]
    q = held_out_questions(out, limit=1)[0]
    base = [sys.executable, str(root / "run.py"), "CPU", "--mode", "chat", "--params",
            str(out / "runs" / "phase2" / "params_train_and_eval.yaml"), "--model_dir", str(out / "chat"),
            "--checkpoint_path", metrics["phase2_checkpoint"], "--image", str(out / "data" / "images" / q["image"]),
            "--max_new_tokens", "4", "--logging", "WARNING"]
    once = subprocess.run(base + ["--prompt", q["text"]], capture_output=True, text=True, cwd=root)
    assert once.returncode == 0, once.stderr[-2000:]
    assert len(once.stdout.strip().splitlines()) == 1 and once.stdout.strip()
    first_line = q["text"].splitlines()[0]  # one console line per question
    session = subprocess.run(base, input=f"{first_line}\nHow many shapes are there?\n", capture_output=True,
                             text=True, cwd=root)
    assert session.returncode == 0, session.stderr[-2000:]
    assert session.stdout.count("ASSISTANT: ") == 2
    missing = subprocess.run(base[:-6] + ["--image", str(out / "nope.png"), "--prompt", "hi"], capture_output=True,
                             text=True, cwd=root)
    assert missing.returncode != 0 and "cannot read it as an image" in missing.stderr
    assert "Traceback" not in missing.stderr
