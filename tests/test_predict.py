"""Answer scoring of run.py --mode predict (the standard VQA normalisation) and question reading.

    python -m pytest -q tests/test_predict.py

The end-to-end predict run (trained demo model, answers file, resume, skipped inputs) is in tests/test_demo.py."""

import pytest

import run


@pytest.mark.parametrize("raw,normal", [("The Red.", "red"), ("two", "2"), ("an apple, please!", "apple please"),
                                        ("3.5 m", "3.5 m"), ("Yes\n", "yes")])
def test_normalize_answer(raw, normal):
    assert run.normalize_answer(raw) == normal


def test_answer_scores_exact_and_vqa():
    assert run.answer_scores("Two.", ["2"]) == (1.0, 1.0)
    assert run.answer_scores("red", ["blue"]) == (0.0, 0.0)
    ten = ["red"] * 2 + ["dark red"] * 8
    assert run.answer_scores("red", ten) == (1.0, pytest.approx(2 / 3))
    assert run.answer_scores("red", ["red"] * 4 + ["blue"] * 6) == (1.0, 1.0)


def test_read_questions_counts_bad_lines(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_bytes(b'{"question_id": 1, "text": "a?"}\n{broken\n\xff\n{"question_id": 2}\n\n{"question_id": 3, "text": "b"}\n')
    questions, bad = run.read_questions(f)
    assert [q["question_id"] for q in questions] == [1, 3] and bad == 3


def test_references_of_accepts_answer_and_vqa_answers():
    assert run.references_of({"answer": "x"}) == ["x"]
    assert run.references_of({"answers": [{"answer": "a"}, {"answer": "b"}]}) == ["a", "b"]
    assert run.references_of({}) is None


def test_read_answers_drops_a_line_cut_short(tmp_path):
    f = tmp_path / ".answers.jsonl.partial-rank0"
    f.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 2, "te')
    assert [r["question_id"] for r in run.read_answers(f)] == [1]
    assert run.read_answers(tmp_path / "absent") == []


def test_missing_questions_file_is_a_message(tmp_path):
    with pytest.raises(SystemExit, match="--questions .*no such file"):
        run.read_questions(tmp_path / "nope.jsonl")


def test_predict_on_csx_says_to_use_gpu_or_cpu():
    with pytest.raises(SystemExit, match="runs on GPU or CPU"):
        run.main(["CSX", "--mode", "predict", "--params", "configs/params_llava_tiny_phase2.yaml"])


@pytest.mark.parametrize("flag,value", [("--max_new_tokens", "0"), ("--predict_batch_size", "0"), ("--top_p", "1.5"),
                                        ("--top_k", "-1"), ("--temperature", "-0.5")])
def test_generation_flags_out_of_range_are_messages(flag, value):
    args = run.build_parser().parse_args(["CPU", "--mode", "predict", "--params", "p.yaml", flag, value])
    with pytest.raises(SystemExit, match=f"{flag} {value}: must be"):
        run.check_generation_args(args)
