"""The whole LLaVA pipeline on the embedded demo dataset, on CPU, in a few minutes.

    python demo.py                      # writes demo_out/, prints each stage's command and a summary
    python demo.py --num_train 1000 --phase1_steps 150 --phase2_steps 200    # reduced size (tests/test_demo.py)
    python demo.py --family llama3_clip     # Llama-3-style LM + chat template; qwen2_siglip: Qwen2-style LM + SigLIP

Measured on 2 shared CPU cores: the default takes about 3.5 minutes and answers about 95% of the held-out questions'
first word right (uniform chance over each question's answers: 21%); its generated answers are 96% exactly right.
The reduced size takes about 80 s and reaches about 60%.

Stages (each is the documented command, printed before it runs):
  1. preprocess_dataset.py synthetic_shapes      -> images, phase-1 captions, phase-2 questions, tokenizer
  2. create_hdf5_dataset.py LlavaPhaseOne/Two     -> H5 train and held-out eval splits
  3. run.py CPU phase 1                           -> only the projector trains (ViT and LM frozen)
  4. run.py CPU phase 2 from the phase-1 weights  -> projector + LM train (load_checkpoint_states: model)
  5. eval on the held-out split                   -> loss, perplexity, answer accuracy vs the majority answer
  6. run.py CPU --mode predict on held-out questions -> generated answers, their accuracy, a few examples and
                                                     demo_out/predictions.png (images with question/answer/truth)

The demo's questions (colour, shape, position, count of drawn shapes) can only be answered by looking at the
image, so first-answer-token accuracy far above the majority-answer baseline shows the image reaches the LM.
Options shrink it for tests: --num_train, --phase1_steps, --phase2_steps.

Why it learns in minutes: the tiny yamls resize the 64x64 images to the ViT's 48x48, so its 16x16 patches are
exactly the 3x3 grid cells the shapes are drawn in: each of the 9 image tokens holds one whole cell, and colour,
count, position and shape become per-token features the projector and LM can pick up. The stages run with one
torch thread each (--threads): the tiny model's matrices are too small to gain from more, and on a busy machine
extra threads mostly spin.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


# --family -> (synthetic_shapes --tokenizer, params yaml per phase, phase-2 preprocessing yaml)
FAMILIES = {
    "vicuna_clip": ("llama", {1: "configs/params_llava_tiny_phase1.yaml", 2: "configs/params_llava_tiny_phase2.yaml"},
                    "configs/demo_phase_2_preproc.yaml"),
    "llama3_clip": ("llama3", {1: "configs/params_llava_tiny_llama3_phase1.yaml",
                               2: "configs/params_llava_tiny_llama3_phase2.yaml"},
                    "configs/demo_phase_2_chat_preproc.yaml"),
    "qwen2_siglip": ("qwen2", {1: "configs/params_llava_tiny_qwen2_siglip_phase1.yaml",
                               2: "configs/params_llava_tiny_qwen2_siglip_phase2.yaml"},
                     "configs/demo_phase_2_chat_preproc.yaml"),
}


def run(cmd: list, quiet: bool, threads: int) -> None:
    printable = " ".join(str(c) for c in cmd).replace(sys.executable, "python")
    print(f"\n$ {printable}", flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    result = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=quiet, text=True, env=env)
    if result.returncode:
        if quiet:
            print(result.stdout[-4000:], result.stderr[-4000:], sep="\n")
        raise SystemExit(f"demo: stage failed (exit {result.returncode}): {printable}")
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_out", help="everything the demo writes (replaced)")
    parser.add_argument("--num_train", type=int, default=2000, help="training images")
    parser.add_argument("--num_eval", type=int, default=200, help="held-out images")
    parser.add_argument("--phase1_steps", type=int, default=300)
    parser.add_argument("--phase2_steps", type=int, default=700)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per stage (OMP_NUM_THREADS)")
    parser.add_argument("--quiet", action="store_true", help="hide the stages' own output")
    parser.add_argument("--family", choices=list(FAMILIES), default="vicuna_clip",
                        help="vicuna_clip: Llama-2-style LM, CLIP-style tower, vicuna_v1 prompts (LLaVA-1.5); "
                             "llama3_clip: Llama-3-style LM and tokenizer with its chat template; qwen2_siglip: "
                             "Qwen2-style LM and tokenizer with its chat template, SigLIP-style tower")
    args = parser.parse_args(argv)

    out = Path(args.output_dir).resolve()
    if out.exists():
        shutil.rmtree(out)
    data, h5, runs = out / "data", out / "h5", out / "runs"
    py = sys.executable
    started = time.perf_counter()

    tokenizer, phase_params, phase2_preproc = FAMILIES[args.family]
    run([py, "preprocess_dataset.py", "synthetic_shapes", "--output_dir", data, "--num_train", args.num_train,
         "--num_eval", args.num_eval, "--tokenizer", tokenizer, "--no_progress"], args.quiet, args.threads)
    preproc = {1: "configs/demo_phase_1_preproc.yaml", 2: phase2_preproc}
    for phase, name in ((1, "LlavaPhaseOne"), (2, "LlavaPhaseTwo")):
        for split in ("train", "eval"):
            run([py, "create_hdf5_dataset.py", name, "--params", preproc[phase],
                 "--input_dir", data / f"phase{phase}" / split, "--output_dir", h5 / f"phase{phase}" / split,
                 "--huggingface_tokenizer", data / "tokenizer", "--image_dir", data / "images", "--no_progress"],
                args.quiet, args.threads)

    def run_args(phase: int, steps: int) -> list:
        params = json.loads((h5 / f"phase{phase}" / "train" / "data_params.json").read_text())
        start = params["image_patch_info"]["image_patch_start_idx"]
        warmup = max(1, steps // 6)
        return [f"train_input.data_dir={h5 / f'phase{phase}' / 'train'}",
                f"eval_input.data_dir={h5 / f'phase{phase}' / 'eval'}",
                f"train_input.img_data_dir={data / 'images'}", f"eval_input.img_data_dir={data / 'images'}",
                f"train_input.batch_size={args.batch_size}", f"eval_input.batch_size={args.batch_size}",
                f"model.image_start_idx={start}", f"runconfig.max_steps={steps}",
                f"runconfig.log_steps={max(1, steps // 6)}", f"runconfig.checkpoint_steps={steps}",
                f"optimizer.learning_rate.0.total_iters={warmup}",
                f"optimizer.learning_rate.1.total_iters={steps - warmup}"]

    p1, p2 = runs / "phase1", runs / "phase2"
    run([py, "run.py", "CPU", "--mode", "train", "--params", phase_params[1],
         "--model_dir", p1, "--no_progress", *run_args(1, args.phase1_steps)], args.quiet, args.threads)
    run([py, "run.py", "CPU", "--mode", "train_and_eval", "--params", phase_params[2],
         "--model_dir", p2, "--checkpoint_path", p1 / f"checkpoint_{args.phase1_steps}.mdl", "--no_progress",
         *run_args(2, args.phase2_steps)], args.quiet, args.threads)

    checkpoint = p2 / f"checkpoint_{args.phase2_steps}.mdl"
    answers_file = out / "predictions.jsonl"
    run([py, "run.py", "CPU", "--mode", "predict", "--params", p2 / "params_train_and_eval.yaml", "--model_dir", p2,
         "--checkpoint_path", checkpoint, "--questions", data / "phase2" / "eval" / "questions.jsonl",
         "--answers", answers_file, "--max_new_tokens", "4", "--no_progress"], args.quiet, args.threads)

    metrics = json.loads((p2 / f"eval_{args.phase2_steps}.json").read_text())
    predicted = json.loads((p2 / f"predict_{args.phase2_steps}.json").read_text())
    manifest = json.loads((data / "manifest.json").read_text())
    options = [len(t["answers"]) for t in manifest["question_types"].values() if t.get("answers")]
    uniform = sum(1 / n for n in options) / len(options) if options else float("nan")
    acc, majority = metrics["first_answer_token_accuracy"], metrics["majority_first_answer_baseline"]
    print("\n=== Demo summary ===")
    print(f"data: {args.num_train} train / {args.num_eval} held-out images; phase 1 {args.phase1_steps} steps "
          f"(projector only), phase 2 {args.phase2_steps} steps (projector + LM)")
    print(f"held-out eval: loss {metrics['loss']:.3f}, perplexity {metrics['perplexity']:.2f}, "
          f"answer-token accuracy {metrics['accuracy']:.1%}")
    print(f"first answer word accuracy {acc:.1%} vs majority-answer baseline {majority:.1%} and uniform chance "
          f"{uniform:.1%} over {metrics['eval_answers']} answers")
    generated = predicted["accuracy"]["all"]
    print(f"generated answers (run.py --mode predict): {generated['exact_match']:.1%} exact match over "
          f"{generated['questions']} held-out questions; per type: " + ", ".join(
              f"{k} {v['exact_match']:.0%}" for k, v in predicted["accuracy"].items() if k != "all"))
    examples = answered_examples(data / "phase2" / "eval" / "questions.jsonl", answers_file)
    for q, answer in examples[:6]:
        mark = "right" if is_right(q, answer) else "WRONG"
        print(f"  {q['text'].splitlines()[0]:<44} model: {answer:<8} truth: {q['answer']:<8} {mark}")
    picture = out / "predictions.png"
    draw_predictions(picture_examples(examples, PICTURE_GRID[0] * PICTURE_GRID[1]), data / "images", picture)
    print(f"picture of held-out answers: {picture}")
    elapsed = time.perf_counter() - started
    print(f"model: {checkpoint}; total time {elapsed:.0f} s")
    metrics.update(uniform_chance=uniform, elapsed_s=elapsed,
                   phase1_checkpoint=str(p1 / f"checkpoint_{args.phase1_steps}.mdl"), phase2_checkpoint=str(checkpoint),
                   generated_answer_accuracy=generated["exact_match"], generated_answers=generated["questions"],
                   predictions_picture=str(picture))
    return metrics


# ----------------------------------------------------------------------------------------------
# Held-out answers: console examples and the picture

PICTURE_GRID = (4, 4)  # columns, rows of held-out images in predictions.png
PICTURE_SCALE = 3  # the 64-pixel images drawn 3x, nearest-neighbour, so the shapes stay crisp
CAPTION_LINES = 4


def answered_examples(questions_file: Path, answers_file: Path) -> list:
    """(question, generated answer) pairs in question order, for the questions predict answered."""
    answers = {}
    for line in answers_file.read_text().splitlines():
        record = json.loads(line)
        answers[record["question_id"]] = record["text"]
    questions = [json.loads(line) for line in questions_file.read_text().splitlines()]
    return [(q, answers[q["question_id"]]) for q in questions if q["question_id"] in answers]


def is_right(question: dict, answer: str) -> bool:
    import run as R  # the same normalisation as predict's exact match

    return R.normalize_answer(answer) == R.normalize_answer(question["answer"])


def picture_examples(examples: list, count: int) -> list:
    """`count` examples in question order, up to a quarter of them wrong answers when there are any, so the
    picture shows the mistakes too."""
    wrong = [k for k, (q, a) in enumerate(examples) if not is_right(q, a)][:count // 4]
    right = [k for k, (q, a) in enumerate(examples) if is_right(q, a)][:count - len(wrong)]
    return [examples[k] for k in sorted(wrong + right)]


def draw_predictions(examples: list, image_root: Path, path: Path) -> None:
    """A grid of held-out images, each captioned with its question, the model's answer and the truth; a wrong
    answer gets a red frame and a red answer line."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=12)
    except (TypeError, OSError):  # a Pillow without FreeType: the small bitmap font
        font = ImageFont.load_default()
    columns = PICTURE_GRID[0]
    rows = max(1, -(-len(examples) // columns))
    side = 64 * PICTURE_SCALE
    cell_w, line_h = side + 40, 15
    cell_h = side + 12 + CAPTION_LINES * line_h
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (q, answer) in enumerate(examples):
        x, y = (k % columns) * cell_w + 20, (k // columns) * cell_h + 6
        with Image.open(image_root / q["image"]) as im:
            sheet.paste(im.convert("RGB").resize((side, side), Image.NEAREST), (x, y))
        right = is_right(q, answer)
        colour = (0, 120, 0) if right else (200, 0, 0)
        if not right:
            draw.rectangle((x - 3, y - 3, x + side + 2, y + side + 2), outline=colour, width=3)
        question = textwrap.wrap(q["text"].splitlines()[0], 30)[:CAPTION_LINES - 2]
        lines = [(t, "black") for t in question] + [(f"model: {answer[:20]}" + ("" if right else "  (wrong)"), colour), (f"truth: {q['answer']}", "black")]
        for n, (text, fill) in enumerate(lines):
            draw.text((x, y + side + 6 + n * line_h), text, fill=fill, font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    sheet.save(tmp, format="PNG")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
