"""Tests for the dataset converters of preprocess_dataset.py, on fixtures written here in each dataset's real
on-disk format (including the odd cases listed in ../shared/reference_data/README.md), plus a run over
../shared/reference_data when it is present.

Run: python -m pytest tests/test_preprocess_dataset.py -q
"""

import io
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import preprocess_dataset as P  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference_data"


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def rec(rid, image, question, answer):
    return {"id": rid, "image": image, "conversations": [
        {"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]}


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def png_bytes(color=(200, 30, 30), size=(8, 6), fmt="PNG", mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- ai2d


def test_ai2d_templates_and_bad_questions(tmp_path):
    q = tmp_path / "ai2d" / "questions"
    write(q / "100.png.json", json.dumps({"imageName": "100.png", "questions": {
        "Which is flat?": {"abcLabel": False, "answerTexts": ["Round", "Flat", "Tall", "none of the above"],
                           "correctAnswer": 1, "questionId": "100.png-0"},
        "What is Label B?": {"abcLabel": True, "answerTexts": ["x", "y"], "correctAnswer": 7,
                             "questionId": "100.png-1"},
        "Five?": {"answerTexts": list("abcde"), "correctAnswer": 0, "questionId": "100.png-2"},
    }}, indent=4))
    write(q / "1.png.json", json.dumps({"imageName": "1.png", "questions": {}}, indent=4))  # real: empty dict
    write(q / "2.png.json", '{"imageName": "2.png", "questions": {')  # truncated file
    write(q / "3.png.json", json.dumps({"questions": {}}))  # no imageName
    report = P.convert_ai2d(q, tmp_path / "out", progress=False)
    assert read_jsonl(tmp_path / "out/ai2d_llava.jsonl") == [
        rec("100.png-0", "ai2d/images/100.png", "Which is flat? a) Round b) Flat c) Tall d) none of the above",
            "b) Flat")]
    assert report.written == 1
    assert dict(report.skipped) == {"answer index out of range": 1, "more than 4 options": 1,
                                    "malformed json file": 1, "missing field 'imageName'": 1}
    assert "100.png-1" in " ".join(report.examples["answer index out of range"])


# ---------------------------------------------------------------------------------------------- arxivqa


def test_arxivqa_label_branches_streaming_and_empty_label_fix(tmp_path):
    lines = [
        {"id": "q1", "image": "images/1911.02852_1.jpg", "options": ["A. yes", "B. no"], "question": "Q1?",
         "label": "B", "rationale": "Because."},
        {"id": "q2", "image": "images/a.jpg", "options": ["A) 0.1", "B) 0.2"], "question": "Q2?",
         "label": "B) 0.2", "rationale": "R2."},
        {"id": "q3", "image": "images/a.jpg", "options": ["0.1", "0.5"], "question": "Q3?", "label": "[0.5]",
         "rationale": "R3."},
        {"id": "q4", "image": "images/a.jpg", "options": ["A. yes", "B. no"], "question": "Q4?", "label": "E",
         "rationale": "R4."},
        {"id": "q5", "image": "images/a.jpg", "options": ["A. yes"], "question": "Q5?", "label": "", "rationale": ""},
        {"id": "q6", "image": "images/a.jpg", "options": ["A. yes"], "question": "Q6?", "label": "",
         "rationale": "Only a rationale."},  # Cerebras crashes on label[0]
        {"id": "q7", "image": "../../etc/passwd", "options": ["A. x"], "question": "Q7?", "label": "A", "rationale": ""},
        {"id": "q8", "image": "images/a.jpg", "question": "Q8?", "label": "A", "rationale": ""},
    ]
    text = "\n".join(json.dumps(x, ensure_ascii=False) for x in lines[:3]) + "\n\n{not json\n"
    text += "\n".join(json.dumps(x) for x in lines[3:]) + "\n"
    src = write(tmp_path / "ArxivQA" / "arxivqa.jsonl", text)
    report = P.convert_arxivqa(src, tmp_path / "out", progress=False)
    assert read_jsonl(tmp_path / "out/arxivqa_llava.jsonl") == [
        rec("q1", "ArxivQA/images/1911.02852_1.jpg", "Q1? A. yes B. no", "B. no Because."),
        rec("q2", "ArxivQA/images/a.jpg", "Q2? A) 0.1 B) 0.2", "B) 0.2 R2."),
        rec("q3", "ArxivQA/images/a.jpg", "Q3? 0.1 0.5", "[0.5] R3."),
        rec("q6", "ArxivQA/images/a.jpg", "Q6? A. yes", "Only a rationale."),
    ]
    assert dict(report.skipped) == {"malformed json line": 1, "label letter beyond the options": 1,
                                    "empty label and rationale": 1, "image path leaves the image root": 1,
                                    "missing field 'options'": 1}
    assert report.examples["malformed json line"] == [f"{src} line 5"]


# ---------------------------------------------------------------------------------------------- chartqa


def chartqa_folder(tmp_path) -> Path:
    root = tmp_path / "ChartQA_Dataset"
    # *_human files are single-line json.dumps; augmented ones tab-indented (as the real files).
    write(root / "train/train_human.json", json.dumps([
        {"imgname": "10095.png", "query": "How many bars?", "label": "14"},
        {"imgname": "two_col_40758.png", "query": "Which is La Granja de Zen\u00e3n?", "label": "[63, 26]"},
        {"imgname": "41699051005347.png", "query": "Value?"},  # no label
        {"imgname": "OECD_X_000042.png", "query": "Date?", "label": 44362},  # a number: written as text
    ]))
    write(root / "val/val_augmented.json", json.dumps([
        {"imgname": "multi_col_20933.png", "query": "What is \ufffd?", "label": "0.39"}], indent="\t"))
    write(root / "test/test_human.json", "[{]")
    return root


def test_chartqa_six_files_layout_ids_and_odd_labels(tmp_path):
    root = chartqa_folder(tmp_path)
    report = P.convert_chartqa(root, progress=False)
    out = root / "train/train_human_llava_jsonl/train_human_llava.jsonl"
    assert read_jsonl(out) == [
        rec(0, "ChartQA_Dataset/train/png/10095.png", "How many bars?", "14"),
        rec(1, "ChartQA_Dataset/train/png/two_col_40758.png", "Which is La Granja de Zen\u00e3n?", "[63, 26]"),
        rec(3, "ChartQA_Dataset/train/png/OECD_X_000042.png", "Date?", "44362"),
    ]
    assert "\\u00e3" in out.read_text()  # ensure_ascii output, as Cerebras
    assert read_jsonl(root / "val/val_augmented_llava_jsonl/val_augmented_llava.jsonl") == [
        rec(0, "ChartQA_Dataset/val/png/multi_col_20933.png", "What is \ufffd?", "0.39")]
    assert report.written == 4
    assert dict(report.skipped) == {"missing field 'label'": 1, "malformed json file": 1}
    assert "imgname '41699051005347.png'" in report.examples["missing field 'label'"][0]
    assert sum(n for what, n in report.notes.items() if what.startswith("input file not found")) == 3


def test_image_root_check_skips_missing_unreadable_and_outside_images(tmp_path):
    root = chartqa_folder(tmp_path)
    images = tmp_path / "img_root"
    write(images / "ChartQA_Dataset/train/png/10095.png", png_bytes())
    write(images / "ChartQA_Dataset/train/png/two_col_40758.png", b"this is not a png")
    report = P.convert_chartqa(root, output_dir=tmp_path / "out", image_root=images, progress=False)
    assert [r["id"] for r in read_jsonl(tmp_path / "out/train/train_human_llava_jsonl/train_human_llava.jsonl")] == [0]
    assert report.skipped["missing image"] == 2 and report.skipped["unreadable image"] == 1
    assert not (root / "train/train_human_llava_jsonl").exists()  # --output_dir leaves the inputs alone
    checker = P.ImageChecker(images)
    with pytest.raises(P.BadRecord, match="leaves the image root"):
        checker.check("ChartQA_Dataset/../../secret.png")
    with pytest.raises(P.BadRecord, match="leaves the image root"):
        checker.check("/etc/passwd")


# ---------------------------------------------------------------------------------------------- DocVQA, DVQA


def test_sp_docvqa_documents_prefix_and_first_answer(tmp_path):
    folder = tmp_path / "spdocvqa_qas"
    header = {"dataset_name": "docvqa", "dataset_version": "1.0", "dataset_split": "train"}
    write(folder / "train_v1.0_withQT.json", json.dumps({**header, "data": [
        {"questionId": 337, "question": "what is the date mentioned in this letter?", "question_types": ["others"],
         "image": "documents/xnbl0037_1.png", "docId": 279, "ucsf_document_id": "xnbl0037",
         "ucsf_document_page_no": "1", "answers": ["1/8/93", "January 8, 1993"], "data_split": "train"},
        {"questionId": 338, "question": "no answers", "image": "documents/a_1.png", "answers": []},
    ]}, indent=4, ensure_ascii=False))
    write(folder / "val_v1.0_withQT.json", json.dumps({**header, "data": [
        {"questionId": 49153, "question": "What is the \u2018actual\u2019 value?", "image": "documents/pybv0228_81.png",
         "answers": ["0.28"]}]}, ensure_ascii=False))
    write(folder / "train_v1.0.json", json.dumps({**header, "data": [{"questionId": 1}]}))  # not read (no QT)
    report = P.convert_sp_docvqa(folder, progress=False)
    assert read_jsonl(folder / "train_v1.0_withQT_llava_jsonl/train_v1.0_withQT_llava.jsonl") == [
        rec(337, "DocVQA/sp_docvqa/images/xnbl0037_1.png", "what is the date mentioned in this letter?", "1/8/93")]
    assert read_jsonl(folder / "val_v1.0_withQT_llava_jsonl/val_v1.0_withQT_llava.jsonl") == [
        rec(49153, "DocVQA/sp_docvqa/images/pybv0228_81.png", "What is the \u2018actual\u2019 value?", "0.28")]
    assert dict(report.skipped) == {"empty 'answers' list": 1}
    assert "questionId 338" in report.examples["empty 'answers' list"][0]


def test_infographics_image_local_name(tmp_path):
    folder = tmp_path / "infographicsvqa_qas"
    item = {"questionId": 98313, "question": "Which social platform has heavy female audience?",
            "image_local_name": "37313.jpeg", "image_url": "https://xxx.png", "ocr_output_file": "37313.json",
            "answers": ["pinterest"], "data_split": "val", "answer_type": ["single span"], "evidence": ["text"],
            "operation/reasoning": []}
    write(folder / "infographicsVQA_val_v1.0_withQT.json", json.dumps({"data": [item, {**item, "questionId": 1,
                                                                                       "image_local_name": None}]}))
    write(folder / "infographicsVQA_train_v1.0.json", json.dumps({"dataset_name": "infographicsVQA"}))  # no data
    report = P.convert_infographics_docvqa(folder, progress=False)
    out = folder / "infographicsVQA_val_v1.0_withQT_llava_jsonl/infographicsVQA_val_v1.0_withQT_llava.jsonl"
    assert read_jsonl(out) == [rec(98313, "DocVQA/Infographicsvqa/images/37313.jpeg",
                                   "Which social platform has heavy female audience?", "pinterest")]
    assert dict(report.skipped) == {"missing field 'image_local_name'": 1, "unexpected json layout": 1}


def test_dvqa_shipped_field_names(tmp_path):
    folder = tmp_path / "DVQA" / "qa"
    write(folder / "train_qa.json", json.dumps([
        {"question": "How many bars are there?", "question_id": 3, "template_id": "structure", "answer": "two",
         "image": "bar_train_00000001.png", "answer_bbox": []},
        {"question": "Accuracy?", "question_id": 4, "template_id": "data", "answer": "7",
         "image": "bar_train_00000001.png", "answer_bbox": [1.0, 2.0, 3.0, 4.0]},
        {"question_id": 5, "answer": "x", "image": "bar_train_00000002.png"},
    ]))
    write(folder / "val_easy_qa.json", "[]")  # not converted (Cerebras: train_qa only)
    report = P.convert_dvqa(folder, progress=False)
    assert read_jsonl(folder / "train_qa_llava_jsonl/train_qa_llava.jsonl") == [
        rec(3, "DVQA/images/bar_train_00000001.png", "How many bars are there?", "two"),
        rec(4, "DVQA/images/bar_train_00000001.png", "Accuracy?", "7")]
    assert dict(report.skipped) == {"missing field 'question'": 1}


# ---------------------------------------------------------------------------------------------- convert_json2jsonl


def test_convert_json2jsonl_sibling_folder_and_bad_entries(tmp_path):
    src = tmp_path / "LLaVA-Pretrain"
    lcs = [{"id": "004539375", "image": "00453/004539375.jpg", "conversations": [
        {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
        {"from": "gpt", "value": "select luxury furniture"}]}]
    mix = [{"id": "i6IyJda_0", "model": "", "conversations": [{"from": "human", "value": "Hi"},
                                                              {"from": "gpt", "value": "Hello"}]},
           {"id": "bad1", "image": "x.jpg"},
           {"id": "bad2", "image": "x.jpg", "conversations": [{"from": "human"}]},
           "not a record"]
    write(src / "blip_laion_cc_sbu_558k.json", json.dumps(lcs))
    write(src / "llava_v1_5_mix665k.json", json.dumps(mix, indent=2))
    write(src / "json_notes.json", json.dumps({"a": 1}))
    write(src / "broken.json", "[{")
    write(src / "readme.txt", "ignored")
    report = P.convert_json2jsonl(str(src) + "/", progress=False)
    out = tmp_path / "LLaVA-Pretrain_to_jsonl"
    assert sorted(p.name for p in out.iterdir()) == ["blip_laion_cc_sbu_558k.jsonl", "llava_v1_5_mix665k.jsonl"]
    assert read_jsonl(out / "blip_laion_cc_sbu_558k.jsonl") == lcs
    assert read_jsonl(out / "llava_v1_5_mix665k.jsonl") == mix[:1]
    assert dict(report.skipped) == {"missing field 'conversations'": 1, "conversation turn without a text 'value'": 1,
                                    "record is not a JSON object": 1, "unexpected json layout": 1,
                                    "malformed json file": 1}
    assert "id 'bad1'" in report.examples["missing field 'conversations'"][0]


# ---------------------------------------------------------------------------------------------- parquet sets


def write_synthdog(folder: Path, name: str, rows: list[tuple]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "image": pa.array([{"bytes": b, "path": None} for b, _ in rows], image_type),
        "ground_truth": pa.array([g for _, g in rows], pa.string()),
    })
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / name, row_group_size=2)  # several row groups: streaming is exercised


def gt(text):
    return json.dumps({"gt_parse": {"text_sequence": text}}, ensure_ascii=False)


@pytest.fixture()
def synthdog(tmp_path):
    data = tmp_path / "synthdog-en" / "data"
    jpeg = png_bytes((10, 120, 200), (12, 10), fmt="JPEG")
    write_synthdog(data, "train-00000-of-00084-aaaa.parquet", [
        (jpeg, gt("first text")),
        (jpeg, "{'gt_parse': {'text_sequence': 'python literal'}}"),  # eval() would take it; JSON does not
        (b"\x89PNG broken", gt("bad bytes")),
        (None, gt("no bytes")),
        (png_bytes(size=(5, 5), mode="CMYK", fmt="JPEG"), gt("true false null \u00e9")),
    ])
    write_synthdog(data, "train-00001-of-00084-bbbb.parquet", [(jpeg, gt(f"shard one {i}")) for i in range(5)])
    write_synthdog(data, "train-00002-of-00084-cccc.parquet", [(jpeg, gt("outside the range"))])
    write(data / "README-not-a-shard.parquet", b"PAR1")
    return tmp_path, data


def synthdog_args(tmp_path, data, **kw):
    args = dict(input_dir=data, output_jsonl_dir=tmp_path / "jsonl", output_image_dir=tmp_path / "root/synthdog/images",
                image_prefix="synthdog/images", output_parquet_dir=tmp_path / "pq", parquet_range=[0, 2], seed=7,
                progress=False)
    args.update(kw)
    return args


def test_synthdog_records_images_and_bad_rows(synthdog):
    import pyarrow.parquet as pq

    tmp_path, data = synthdog
    report = P.convert_synthdog_en(**synthdog_args(tmp_path, data))
    shard0 = read_jsonl(tmp_path / "jsonl/train-00000-of-00084-aaaa.jsonl")
    assert [r["id"] for r in shard0] == ["0000000", "0000004"]
    assert shard0[0]["image"] == "synthdog/images/train/00000/0000000.png"
    assert shard0[0]["conversations"][1] == {"from": "gpt", "value": "first text"}
    assert shard0[1]["conversations"][1]["value"] == "true false null \u00e9"
    for r in shard0:
        question = r["conversations"][0]["value"]
        assert question.startswith("<image>\n") and question[len("<image>\n"):] in P.CAPTION_QUESTIONS
    img = Image.open(tmp_path / "root" / shard0[0]["image"])
    assert img.format == "PNG" and img.size == (12, 10)
    assert Image.open(tmp_path / "root" / shard0[1]["image"]).mode == "RGB"  # CMYK converted for PNG
    shard1 = read_jsonl(tmp_path / "jsonl/train-00001-of-00084-bbbb.jsonl")
    assert [r["id"] for r in shard1] == [f"{i:07d}" for i in range(5)]  # ids restart per shard (Cerebras)
    assert not (tmp_path / "jsonl/train-00002-of-00084-cccc.jsonl").exists()  # outside --parquet_range
    assert dict(report.skipped) == {"ground_truth without gt_parse.text_sequence": 1, "undecodable image bytes": 1,
                                    "missing image bytes": 1, "unexpected parquet file name": 1}
    assert report.examples["undecodable image bytes"] == ["train-00000-of-00084-aaaa.parquet row 2 (id 0000002)"]
    side = pq.read_table(tmp_path / "pq/train-00000-of-00084-aaaa.parquet")
    assert side.column_names == ["image", "ground_truth", "id", "llava"]
    assert side.column("id").to_pylist() == ["0000000", "0000004"]
    assert side.column("llava").to_pylist()[0] == shard0[0]


def test_synthdog_prompts_follow_the_seed_per_shard(synthdog):
    tmp_path, data = synthdog
    P.convert_synthdog_en(**synthdog_args(tmp_path, data, output_parquet_dir=None))
    first = (tmp_path / "jsonl/train-00001-of-00084-bbbb.jsonl").read_text()
    P.convert_synthdog_en(**synthdog_args(tmp_path, data, output_jsonl_dir=tmp_path / "only1", parquet_range=[1, 2]))
    assert (tmp_path / "only1/train-00001-of-00084-bbbb.jsonl").read_text() == first
    prompts = set()
    for seed in range(4):
        P.convert_synthdog_en(**synthdog_args(tmp_path, data, output_jsonl_dir=tmp_path / f"s{seed}", seed=seed,
                                              parquet_range=[1, 2], output_parquet_dir=None))
        prompts.add((tmp_path / f"s{seed}/train-00001-of-00084-bbbb.jsonl").read_text())
    assert len(prompts) > 1


def test_parquet_usage_errors(synthdog):
    tmp_path, data = synthdog
    with pytest.raises(P.UsageError, match="does not end with --image_prefix"):
        P.convert_synthdog_en(**synthdog_args(tmp_path, data, image_prefix="other/images"))
    with pytest.raises(P.UsageError, match="selects none"):
        P.convert_synthdog_en(**synthdog_args(tmp_path, data, parquet_range=[50, 60]))
    with pytest.raises(P.UsageError, match="two numbers"):
        P.convert_synthdog_en(**synthdog_args(tmp_path, data, parquet_range=[0]))


def write_arxivcap(path: Path, rows: list[list[dict]]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pair = pa.struct([("sub_caption", pa.string()), ("image_file", pa.string()),
                      ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      ("image_ocr", pa.list_(pa.string()))])
    entry = pa.struct([("caption", pa.string()), ("cil_pairs", pa.list_(pair))])
    table = pa.table({"arxiv_id": pa.array([f"id{i}" for i in range(len(rows))]),
                      "caption_images": pa.array(rows, pa.list_(entry))})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def cil(image_file, data, sub=""):
    return {"sub_caption": sub, "image_file": image_file, "image": {"bytes": data, "path": None}, "image_ocr": []}


def test_arxivcap_one_record_per_line_and_saved_figures(tmp_path):
    jpeg = png_bytes((0, 200, 0), fmt="JPEG")
    png = png_bytes((0, 0, 200))
    data = tmp_path / "ArxivCap" / "data"
    write_arxivcap(data / "arXiv_src_0005_001.parquet", [
        [{"caption": "single figure", "cil_pairs": [cil("arXiv_src_0005_060/0005.1_0.jpg", jpeg)]},
         {"caption": "two panels", "cil_pairs": [cil("arXiv_src_0005_060/0005.1_1.jpg", jpeg, "(a)"),
                                                 cil("arXiv_src_0005_060/0005.1_2.jpg", png, "(b)")]}],
        [],  # a paper without figures
        [{"caption": "broken", "cil_pairs": [cil("arXiv_src_0005_060/0005.3_0.jpg", b"garbage")]}],
        [{"caption": "escape", "cil_pairs": [cil("../../outside.jpg", jpeg)]}],
        [{"caption": "second single", "cil_pairs": [cil("arXiv_src_0005_060/0005.5_0.jpg", jpeg)]}],
    ])
    write_arxivcap(data / "arXiv_src_2112_001.parquet", [[{"caption": "out of range", "cil_pairs": []}]])
    report = P.convert_arxivcap(data, tmp_path / "jsonl", tmp_path / "root/ArxivCap/images", "ArxivCap/images",
                                output_parquet_dir=tmp_path / "pq", parquet_range=[3, 11], progress=False)
    lines = (tmp_path / "jsonl/arXiv_src_0005_001.jsonl").read_text().splitlines()
    q = P.ARXIVCAP_QUESTIONS["Single-Figure Captioning"]
    assert [json.loads(line) for line in lines] == [
        rec("0005.1_0", "ArxivCap/images/arXiv_src_0005_060/0005.1_0.jpg", q, "single figure"),
        rec("0005.5_0", "ArxivCap/images/arXiv_src_0005_060/0005.5_0.jpg", q, "second single")]
    figures = tmp_path / "root/ArxivCap/images/arXiv_src_0005_060"
    assert (figures / "0005.1_0.jpg").read_bytes() == jpeg  # JPEG bytes kept as they are
    assert Image.open(figures / "0005.1_2.jpg").format == "JPEG"  # PNG bytes re-encoded to match the name
    assert not (tmp_path / "outside.jpg").exists() and not (tmp_path / "root/outside.jpg").exists()
    assert not (tmp_path / "jsonl/arXiv_src_2112_001.jsonl").exists()
    assert dict(report.skipped) == {"undecodable image bytes": 1, "image path leaves the image root": 1}
    assert report.notes["multi-figure captions (not converted, as in Cerebras)"] == 1
    import pyarrow.parquet as pq

    side = pq.read_table(tmp_path / "pq/arXiv_src_0005_001.parquet")
    assert side.column("llava").to_pylist()[0] == [json.loads(lines[0])]
    assert side.column("llava").to_pylist()[1] == []


# ---------------------------------------------------------------------------------------------- run-level behaviour


def test_strict_stops_at_first_bad_record_with_location(tmp_path, capsys):
    root = chartqa_folder(tmp_path)
    rc = P.main(["chartqa", "--dataset_folder", str(root), "--output_dir", str(tmp_path / "out"), "--strict",
                 "--no_progress"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "train/train_human.json record 2" in err and "missing field 'label'" in err
    assert not list((tmp_path / "out").rglob("*.jsonl"))  # the interrupted file was not put in place
    assert not list((tmp_path / "out").rglob(".*partial*"))


def test_cli_exit_codes_and_summary(tmp_path, capsys):
    root = chartqa_folder(tmp_path)
    assert P.main(["chartqa", "--dataset_folder", str(root), "--output_dir", str(tmp_path / "o"), "--no_progress"]) == 0
    err = capsys.readouterr().err
    assert "chartqa: wrote 4 records to 2 file(s)" in err and "missing field 'label': 1 (e.g." in err
    empty = tmp_path / "empty_qa"
    write(empty / "train_qa.json", "[]")
    assert P.main(["dvqa", "--dataset_folder", str(empty), "--no_progress"]) == 1
    assert "nothing converted" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        P.main(["sp_docvqa", "--dataset_folder", str(tmp_path / "missing"), "--no_progress"])
    assert exc.value.code == 2 and "no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        P.main(["chartqa"])
    assert exc.value.code == 2


def test_interrupted_write_leaves_no_output(tmp_path):
    def records():
        yield {"id": 1}
        raise KeyboardInterrupt

    report = P.Report("x")
    with pytest.raises(KeyboardInterrupt):
        P.write_jsonl(tmp_path / "out.jsonl", records(), report)
    assert list(tmp_path.iterdir()) == [] and report.written == 0


# ---------------------------------------------------------------------------------------------- reference data


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="../shared/reference_data not present")
def test_every_subcommand_on_reference_data(tmp_path):
    R, O = REFERENCE, tmp_path
    quiet = dict(progress=False)
    ai2d = P.convert_ai2d(R / "ai2d/questions", O / "ai2d", image_root=R, **quiet)  # ai2d/images/ is under R
    assert ai2d.written == 20 and not ai2d.skipped
    records = read_jsonl(O / "ai2d/ai2d_llava.jsonl")
    assert {r["image"] for r in records} <= {f"ai2d/images/{p.name}" for p in (R / "ai2d/images").iterdir()}
    assert all(r["conversations"][1]["value"][:3] in ("a) ", "b) ", "c) ", "d) ") for r in records)

    arxivqa = P.convert_arxivqa(R / "arxivqa/arxivqa.jsonl", O / "arxivqa", **quiet)
    assert arxivqa.written == 4
    assert dict(arxivqa.skipped) == {"label letter beyond the options": 1, "empty label and rationale": 1}

    chartqa = P.convert_chartqa(R / "chartqa", output_dir=O / "chartqa", **quiet)
    assert chartqa.written == 56 and len(chartqa.outputs) == 6 and not chartqa.skipped
    assert all(isinstance(r["conversations"][1]["value"], str)
               for p in chartqa.outputs for r in read_jsonl(p))

    sp = P.convert_sp_docvqa(R / "docvqa_sp/spdocvqa_qas", output_dir=O / "sp", **quiet)
    assert sp.written == 2 and all("/documents/" not in r["image"] for p in sp.outputs for r in read_jsonl(p))
    info = P.convert_infographics_docvqa(R / "docvqa_infographics/infographicsvqa_qas", output_dir=O / "info",
                                         **quiet)
    assert info.written == 3
    dvqa = P.convert_dvqa(R / "dvqa/qa", output_dir=O / "dvqa", **quiet)
    assert dvqa.written == 4

    sd = P.convert_synthdog_en(R / "synthdog_en/data", O / "sd", O / "root/synthdog_en/images", "synthdog_en/images",
                               output_parquet_dir=O / "sdpq", **quiet)
    assert sd.written == 4 and not sd.skipped
    for p in sd.outputs:
        assert p.suffix == ".jsonl"
        for r in read_jsonl(p):
            assert Image.open(O / "root" / r["image"]).format == "PNG"

    ac = P.convert_arxivcap(R / "arxivcap/data", O / "ac", O / "root/ArxivCap/images", "ArxivCap/images", **quiet)
    assert ac.written == 3 and not ac.skipped
    for p in ac.outputs:
        for r in read_jsonl(p):  # one record per line, not a list
            assert set(r) == {"id", "image", "conversations"} and (O / "root" / r["image"]).is_file()

    for folder, n in (("llava_pretrain", 7), ("llava_mix665k", 4), ("sharegpt4v/data/sharegpt4v", 6)):
        rep = P.convert_json2jsonl(R / folder, output_dir=O / "j2j" / folder, **quiet)
        assert rep.written == n and not rep.skipped, folder
    mix = read_jsonl(O / "j2j/llava_mix665k/llava_v1_5_mix665k.jsonl")
    assert mix == json.loads((R / "llava_mix665k/llava_v1_5_mix665k.json").read_text())
