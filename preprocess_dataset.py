"""Stage 1: convert raw multimodal datasets into LLaVA json-lines records, or draw the demo dataset.

Every subcommand writes records of the form

    {"id": ..., "image": "<path relative to the common image root>",
     "conversations": [{"from": "human", "value": "<image>\\n<question>"}, {"from": "gpt", "value": "<answer>"}]}

with the prompt templates and image-path prefixes of Cerebras ModelZoo's preprocess_dataset.py, minus its
bugs: convert_json2jsonl works, arxivcap writes one record per line, synthdog writes `.jsonl`, `ground_truth`
is parsed with json.loads, template choices come from `--seed`, arxivqa with an empty label does not crash.

Commands (one per dataset; `python preprocess_dataset.py <dataset> --help` lists the options):

    python preprocess_dataset.py ai2d --question_dir ai2d/questions --output_jsonl_dir out/ai2d
    python preprocess_dataset.py arxivqa --input_file ArxivQA/arxivqa.jsonl --output_jsonl_dir out/arxivqa
    python preprocess_dataset.py chartqa --dataset_folder ChartQA_Dataset
    python preprocess_dataset.py sp_docvqa --dataset_folder DocVQA/spdocvqa_qas
    python preprocess_dataset.py infographics_docvqa --dataset_folder DocVQA/infographicsvqa_qas
    python preprocess_dataset.py dvqa --dataset_folder DVQA/qa
    python preprocess_dataset.py synthdog_en --input_dir synthdog-en/data --output_jsonl_dir out/synthdog \\
        --output_parquet_dir out/synthdog_parquet --parquet_range 0 84 \\
        --output_image_dir ROOT/synthdog_en/images --image_prefix synthdog_en/images
    python preprocess_dataset.py arxivcap --input_dir ArxivCap/data --output_jsonl_dir out/arxivcap \\
        --output_parquet_dir out/arxivcap_parquet --parquet_range 3 11 \\
        --output_image_dir ROOT/ArxivCap/images --image_prefix ArxivCap/images
    python preprocess_dataset.py convert_json2jsonl --input_dir LLaVA-Pretrain_json
    python preprocess_dataset.py synthetic_shapes --output_dir demo_data        # the demo dataset

Common options: `--image_root DIR` checks that every record's image exists under DIR and is readable
(the same folder the HDF5 stage calls `dataset.image_dir`); `--strict` stops at the first bad record;
`--no_progress` hides the progress bars. Bad records are skipped, counted per reason and summarised at the
end; a run that converts nothing exits with status 1. Outputs appear under their final name only when
complete.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import json
import math
import os
import posixpath
import random
import shutil
import string
import sys
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator

IMAGE_TOKEN = "<image>"

# Where each dataset's images live under the common image root (Cerebras' prefixes, spec 1.2-1.7).
IMAGE_PREFIXES = {
    "ai2d": "ai2d/images",
    "arxivqa": "ArxivQA",
    "chartqa": "ChartQA_Dataset/{split}/png",
    "sp_docvqa": "DocVQA/sp_docvqa/images",
    "infographics_docvqa": "DocVQA/Infographicsvqa/images",
    "dvqa": "DVQA/images",
}

AI2D_OPTION_LABELS = ["a", "b", "c", "d"]
ARXIVQA_LABEL_INDEX = {letter: i for i, letter in enumerate("ABCDEFGHI")}
CHARTQA_SPLITS = ["train", "val", "test"]
CHARTQA_SUBSETS = ["human", "augmented"]
SP_DOCVQA_SPLITS = ["train_v1.0_withQT", "val_v1.0_withQT"]
INFOGRAPHICS_SPLITS = ["train_v1.0", "val_v1.0_withQT"]
DVQA_SUBSETS = ["train_qa"]

# The brief-caption prompts used by synthdog_en (verbatim from Cerebras) and by LCS-558K.
CAPTION_QUESTIONS = [
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
]

# ArxivCap question templates (Cerebras); only the single-figure one produces records.
ARXIVCAP_QUESTIONS = {
    "Single-Figure Captioning": "Create a caption for the provided figure.",
    "Multiple-Figure Captioning": "Create a caption for the provided figures.",
    "Title Generation": "According to the figures and captions, generate a title for this paper. Title:",
    "Contextualized Captioning": None,
}

VICUNA_V1_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
USER_PREFIX, ASSISTANT_PREFIX = "USER:", "ASSISTANT:"

# PNG zlib level for images we write: 1 is several times faster than the default 6 and still lossless.
PNG_COMPRESS_LEVEL = 1


# --------------------------------------------------------------------------------------------------
# Bad-input bookkeeping, atomic outputs, progress
# --------------------------------------------------------------------------------------------------


class UsageError(Exception):
    """The command line or the input layout is wrong; the run cannot start (exit status 2)."""


class BadRecord(Exception):
    """One input record (or file) cannot be converted. `reason` groups the summary; `detail` says more."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


class StrictStop(Exception):
    """Raised under --strict at the first bad record, with its location."""


class Report:
    """Counts written records and skipped input per reason, keeping a few example locations each."""

    def __init__(self, name: str, strict: bool = False, max_examples: int = 3):
        self.name, self.strict, self.max_examples = name, strict, max_examples
        self.written = 0
        self.skipped: Counter = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)
        self.notes: Counter = Counter()  # informational counts (e.g. multi-figure captions not converted)
        self.outputs: list[Path] = []

    def skip(self, err: BadRecord, where: str) -> None:
        if self.strict:
            raise StrictStop(f"{where}: {err} (run without --strict to skip and count such records)")
        self.skipped[err.reason] += 1
        if len(self.examples[err.reason]) < self.max_examples:
            self.examples[err.reason].append(where)

    def note(self, what: str, n: int = 1) -> None:
        self.notes[what] += n

    def summary(self) -> str:
        lines = [f"{self.name}: wrote {self.written} records to {len(self.outputs)} file(s)"]
        lines += [f"  {p}" for p in self.outputs]
        if self.skipped:
            lines.append(f"skipped {sum(self.skipped.values())} bad input item(s):")
            for reason, n in self.skipped.most_common():
                lines.append(f"  {reason}: {n} (e.g. {'; '.join(self.examples[reason])})")
        for what, n in self.notes.most_common():
            lines.append(f"note: {what}: {n}")
        return "\n".join(lines)


def partial_name(path: Path) -> Path:
    """A hidden temporary name next to `path` that no reader globbing for *.jsonl / *.png picks up.

    Partial files of the same output left by a killed run (whose process is gone) are removed here."""
    remove_stale_partials(path)
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_partials(path: Path) -> None:
    """Delete `.<name>.partial-<pid>` files/folders next to `path` whose writing process no longer runs."""
    folder = path.parent
    if not folder.is_dir():
        return
    prefix = f".{path.name}.partial-"
    for leftover in folder.iterdir():
        pid = leftover.name[len(prefix):]
        if not leftover.name.startswith(prefix) or not pid.isdigit() or int(pid) == os.getpid():
            continue
        if _process_alive(int(pid)):
            continue  # another run is writing the same output right now: not ours to delete
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output(path: Path, mode: str = "w"):
    """Open a temporary file next to `path`; rename it to `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def progress_bar(iterable, progress: bool, desc: str, total: int | None = None, unit: str = "rec"):
    if not progress:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, mininterval=0.5, leave=False)


class _NothingToWrite(Exception):
    """Raised inside atomic_output when no record came, so that no empty file is put in place."""


def write_jsonl(path: Path, records: Iterable[dict], report: Report) -> int:
    """Write records one per line (json.dumps defaults, as Cerebras); an empty result leaves no file."""
    n = 0
    path = Path(path)
    with atomic_output(path) as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
            n += 1
        if n == 0:
            raise _NothingToWrite
    report.written += n
    report.outputs.append(path)
    return n


def write_jsonl_or_note(path: Path, records: Iterable[dict], report: Report) -> int:
    try:
        return write_jsonl(path, records, report)
    except _NothingToWrite:
        report.note(f"no records converted, file not written: {path}")
        return 0


# --------------------------------------------------------------------------------------------------
# Record helpers
# --------------------------------------------------------------------------------------------------


def llava_record(record_id, image: str | None, question: str, answer: str) -> dict:
    """One human/gpt pair with the image token prepended to the question, as every Cerebras converter does."""
    record = {"id": record_id}
    if image is not None:
        record["image"] = image
    record["conversations"] = [
        {"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"},
        {"from": "gpt", "value": answer},
    ]
    return record


def field(item, key: str, kinds: tuple = (str,)):
    """item[key], checked to be present and of one of `kinds` (bool never counts as a number)."""
    if not isinstance(item, dict):
        raise BadRecord("record is not a JSON object", f"found {type(item).__name__}")
    value = item.get(key)
    if value is None:
        raise BadRecord(f"missing field '{key}'")
    if isinstance(value, bool) or not isinstance(value, kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise BadRecord(f"field '{key}' is not {names}", f"found {type(value).__name__} {str(value)[:60]!r}")
    return value


def text_field(item, key: str) -> str:
    """A text answer; plain JSON numbers are accepted and written as text."""
    value = field(item, key, (str, int, float))
    return value if isinstance(value, str) else json.dumps(value)


def first_answer(item, key: str = "answers") -> str:
    answers = field(item, key, (list,))
    if not answers:
        raise BadRecord(f"empty '{key}' list")
    if not isinstance(answers[0], str):
        raise BadRecord(f"'{key}[0]' is not str", f"found {answers[0]!r}")
    return answers[0]


def safe_relpath(path: str) -> str:
    """Normalise a relative image path; refuse absolute paths and paths that climb out with '..'."""
    norm = posixpath.normpath(path.replace("\\", "/"))
    if posixpath.isabs(norm) or norm == ".." or norm.startswith("../") or (len(norm) > 1 and norm[1] == ":"):
        raise BadRecord("image path leaves the image root", f"found {path!r}")
    return norm


class ImageChecker:
    """Checks record images under an image root: inside it, present, and a readable image header.

    With root None only the path check runs (no files are touched), as in Cerebras.
    """

    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root is not None else None
        self._cache: dict[str, str | None] = {}

    def check(self, image: str) -> None:
        rel = safe_relpath(image)
        if self.root is None:
            return
        if rel not in self._cache:
            self._cache[rel] = self._problem(self.root / rel)
        problem = self._cache[rel]
        if problem:
            raise BadRecord(problem, f"{self.root / rel}")

    @staticmethod
    def _problem(path: Path) -> str | None:
        if not path.is_file():
            return "missing image"
        from PIL import Image

        try:
            with Image.open(path) as im:  # reads the header only
                im.size
        except Exception:  # Pillow raises many types for bad files; all mean the same here
            return "unreadable image"
        return None


def converted(
    items: Iterable,
    make_records: Callable[[int, object], list[dict]],
    where: Callable[[int, object], str],
    report: Report,
    images: ImageChecker,
) -> Iterator[dict]:
    """Yield the records made from each item; an item that raises BadRecord is counted and skipped."""
    for index, item in enumerate(items):
        try:
            records = make_records(index, item)
            for record in records:
                if "image" in record:
                    images.check(record["image"])
        except BadRecord as err:
            report.skip(err, where(index, item))
            continue
        yield from records


def where_with_id(source: str, id_key: str | None) -> Callable[[int, object], str]:
    def where(index: int, item) -> str:
        if id_key and isinstance(item, dict) and id_key in item:
            return f"{source} record {index} ({id_key} {item[id_key]!r})"
        return f"{source} record {index}"

    return where


def load_json(path: Path, report: Report):
    """json.load a whole file; a malformed file is counted as bad input and None is returned."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        report.skip(BadRecord("malformed json file", str(err)), str(path))
    return None


def iter_json_lines(path: Path, report: Report) -> Iterator[tuple[int, dict]]:
    """Stream (line_number, object) from a json-lines file; malformed lines are counted and skipped.

    Lines are decoded one by one, so a line with invalid UTF-8 bytes costs only that line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                report.skip(BadRecord("undecodable text", f"not valid UTF-8: {err}"), f"{path} line {lineno}")
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                report.skip(BadRecord("malformed json line", str(err)), f"{path} line {lineno}")


def require_dir(path, option: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{option} {path}: no such folder; pass the folder that holds the dataset files")
    return path


# --------------------------------------------------------------------------------------------------
# ai2d, arxivqa, chartqa, sp_docvqa, infographics_docvqa, dvqa (json annotations, images on disk)
# --------------------------------------------------------------------------------------------------


def ai2d_record(image_name: str, question: str, q) -> dict:
    """One AI2D question (spec 1.2): options labelled "a) ...", the answer is the correct labelled option."""
    answer_texts = field(q, "answerTexts", (list,))
    if len(answer_texts) > len(AI2D_OPTION_LABELS):
        raise BadRecord("more than 4 options", f"{len(answer_texts)} answerTexts")
    options = [f"{label}) {text}" for label, text in zip(AI2D_OPTION_LABELS, answer_texts)]
    correct = field(q, "correctAnswer", (int,))
    if not 0 <= correct < len(options):
        raise BadRecord("answer index out of range", f"correctAnswer {correct} with {len(options)} options")
    return llava_record(
        field(q, "questionId", (str, int)),
        f"{IMAGE_PREFIXES['ai2d']}/{image_name}",
        question + " " + " ".join(options),
        options[correct],
    )


def convert_ai2d(question_dir, output_jsonl_dir, *, image_root=None, strict=False, progress=True) -> Report:
    """Every question file in `question_dir` -> `output_jsonl_dir/ai2d_llava.jsonl`.

    Files are read in sorted name order (Cerebras used unsorted os.listdir), questions in file order.
    """
    report = Report("ai2d", strict)
    files = sorted(p for p in require_dir(question_dir, "--question_dir").iterdir() if p.is_file())
    images = ImageChecker(image_root)

    def where(path: Path):
        def at(index: int, qa) -> str:
            qid = qa[1].get("questionId") if isinstance(qa[1], dict) else None
            return f"{path.name} question {index}" + (f" (questionId {qid!r})" if qid is not None else "")
        return at

    def records() -> Iterator[dict]:
        for path in progress_bar(files, progress, "ai2d", unit="file"):
            doc = load_json(path, report)
            if doc is None:
                continue
            try:
                image_name = field(doc, "imageName")
                questions = field(doc, "questions", (dict,))
            except BadRecord as err:
                report.skip(err, str(path))
                continue
            yield from converted(list(questions.items()), lambda i, qa: [ai2d_record(image_name, *qa)],
                                 where(path), report, images)

    write_jsonl_or_note(Path(output_jsonl_dir) / "ai2d_llava.jsonl", records(), report)
    return report


def arxivqa_answer(item) -> str:
    """The gpt value for one ArxivQA line (spec 1.3), with the empty-label crash fixed."""
    options = field(item, "options", (list,))
    label = item.get("label") or ""
    rationale = item.get("rationale") or ""
    if not isinstance(label, str) or not isinstance(rationale, str):
        raise BadRecord("label or rationale is not str", f"label {label!r}, rationale {rationale!r}")
    if label == "" and rationale == "":
        raise BadRecord("empty label and rationale")
    if label == "":
        return rationale  # Cerebras crashes here (label[0]); the rationale is the only answer there is
    if label[0] not in ARXIVQA_LABEL_INDEX:
        return label + " " + rationale
    index = ARXIVQA_LABEL_INDEX[label[0]]
    if index >= len(options):
        raise BadRecord("label letter beyond the options", f"label {label!r} with {len(options)} options")
    return str(options[index]) + " " + rationale


def arxivqa_record(item) -> dict:
    options = field(item, "options", (list,))
    if not all(isinstance(o, str) for o in options):
        raise BadRecord("field 'options' is not a list of str", f"found {options!r:.80}")
    question = field(item, "question") + " " + " ".join(options)
    return llava_record(
        field(item, "id", (str, int)),
        f"{IMAGE_PREFIXES['arxivqa']}/{field(item, 'image')}",
        question,
        arxivqa_answer(item),
    )


def convert_arxivqa(input_file, output_jsonl_dir, *, image_root=None, strict=False, progress=True) -> Report:
    """ArxivQA json lines (streamed) -> `output_jsonl_dir/arxivqa_llava.jsonl`."""
    report = Report("arxivqa", strict)
    input_file = Path(input_file)
    if not input_file.is_file():
        raise UsageError(f"--input_file {input_file}: no such file; pass ArxivQA's arxivqa.jsonl")
    lines = progress_bar(iter_json_lines(input_file, report), progress, "arxivqa")
    records = converted(
        lines,
        lambda _, line: [arxivqa_record(line[1])],
        lambda _, line: f"{input_file} line {line[0]}" + (
            f" (id {line[1]['id']!r})" if isinstance(line[1], dict) and "id" in line[1] else ""),
        report,
        ImageChecker(image_root),
    )
    write_jsonl_or_note(Path(output_jsonl_dir) / "arxivqa_llava.jsonl", records, report)
    return report


def chartqa_record(index: int, item, split: str) -> dict:
    return llava_record(
        index,
        IMAGE_PREFIXES["chartqa"].format(split=split) + "/" + field(item, "imgname"),
        field(item, "query"),
        text_field(item, "label"),
    )


def sp_docvqa_record(item) -> dict:
    image = field(item, "image")  # "documents/xxx.png": the folder on disk has no documents/ level
    return llava_record(
        field(item, "questionId", (int, str)),
        f"{IMAGE_PREFIXES['sp_docvqa']}/{posixpath.basename(image)}",
        field(item, "question"),
        first_answer(item),
    )


def infographics_record(item) -> dict:
    return llava_record(
        field(item, "questionId", (int, str)),
        f"{IMAGE_PREFIXES['infographics_docvqa']}/{field(item, 'image_local_name')}",
        field(item, "question"),
        first_answer(item),
    )


def dvqa_record(item) -> dict:
    return llava_record(
        field(item, "question_id", (int, str)),
        f"{IMAGE_PREFIXES['dvqa']}/{field(item, 'image')}",
        field(item, "question"),
        text_field(item, "answer"),
    )


def _convert_json_files(
    name: str,
    dataset_folder,
    jobs: list[tuple[str, str, Callable[[int, object], dict]]],
    *,
    top_key: str | None,
    id_key: str | None,
    output_dir=None,
    image_root=None,
    strict=False,
    progress=True,
) -> Report:
    """Shared loop of the json-list converters: each job is (input rel path, output rel path, record maker).

    Outputs go next to the inputs as in Cerebras, or under `output_dir` with the same relative layout.
    """
    report = Report(name, strict)
    folder = require_dir(dataset_folder, "--dataset_folder")
    out_root = Path(output_dir) if output_dir is not None else folder
    images = ImageChecker(image_root)
    for in_rel, out_rel, make in jobs:
        src = folder / in_rel
        if not src.is_file():
            report.note(f"input file not found, skipped: {src}")
            continue
        data = load_json(src, report)
        if data is None:
            continue
        if top_key is not None:
            data = data.get(top_key) if isinstance(data, dict) else None
        if not isinstance(data, list):
            want = f"an object with a '{top_key}' list" if top_key else "a list of records"
            report.skip(BadRecord("unexpected json layout", f"expected {want}"), str(src))
            continue
        items = progress_bar(data, progress, f"{name} {in_rel}", total=len(data))
        records = converted(items, lambda i, it, make=make: [make(i, it)], where_with_id(in_rel, id_key),
                            report, images)
        write_jsonl_or_note(out_root / out_rel, records, report)
    return report


def convert_chartqa(dataset_folder, *, output_dir=None, image_root=None, strict=False, progress=True) -> Report:
    """{split}/{split}_{subset}.json -> {split}/{split}_{subset}_llava_jsonl/{split}_{subset}_llava.jsonl."""
    jobs = []
    for split in CHARTQA_SPLITS:
        for subset in CHARTQA_SUBSETS:
            stem = f"{split}_{subset}"
            jobs.append((f"{split}/{stem}.json", f"{split}/{stem}_llava_jsonl/{stem}_llava.jsonl",
                         lambda i, item, split=split: chartqa_record(i, item, split)))
    return _convert_json_files("chartqa", dataset_folder, jobs, top_key=None, id_key="imgname",
                               output_dir=output_dir, image_root=image_root, strict=strict, progress=progress)


def convert_sp_docvqa(dataset_folder, *, output_dir=None, image_root=None, strict=False, progress=True) -> Report:
    """{split}.json (top-level "data") -> {split}_llava_jsonl/{split}_llava.jsonl."""
    jobs = [(f"{s}.json", f"{s}_llava_jsonl/{s}_llava.jsonl", lambda i, item: sp_docvqa_record(item))
            for s in SP_DOCVQA_SPLITS]
    return _convert_json_files("sp_docvqa", dataset_folder, jobs, top_key="data", id_key="questionId",
                               output_dir=output_dir, image_root=image_root, strict=strict, progress=progress)


def convert_infographics_docvqa(dataset_folder, *, output_dir=None, image_root=None, strict=False,
                                progress=True) -> Report:
    """infographicsVQA_{split}.json -> infographicsVQA_{split}_llava_jsonl/infographicsVQA_{split}_llava.jsonl."""
    jobs = []
    for s in INFOGRAPHICS_SPLITS:
        stem = f"infographicsVQA_{s}"
        jobs.append((f"{stem}.json", f"{stem}_llava_jsonl/{stem}_llava.jsonl",
                     lambda i, item: infographics_record(item)))
    return _convert_json_files("infographics_docvqa", dataset_folder, jobs, top_key="data", id_key="questionId",
                               output_dir=output_dir, image_root=image_root, strict=strict, progress=progress)


def convert_dvqa(dataset_folder, *, output_dir=None, image_root=None, strict=False, progress=True) -> Report:
    """train_qa.json -> train_qa_llava_jsonl/train_qa_llava.jsonl."""
    jobs = [(f"{s}.json", f"{s}_llava_jsonl/{s}_llava.jsonl", lambda i, item: dvqa_record(item)) for s in DVQA_SUBSETS]
    return _convert_json_files("dvqa", dataset_folder, jobs, top_key=None, id_key="question_id",
                               output_dir=output_dir, image_root=image_root, strict=strict, progress=progress)


# --------------------------------------------------------------------------------------------------
# convert_json2jsonl (LLaVA json lists such as blip_laion_cc_sbu_558k.json, llava_v1_5_mix665k.json)
# --------------------------------------------------------------------------------------------------


def check_llava_entry(entry) -> list[dict]:
    """A LLaVA record is passed through unchanged once its shape is checked."""
    conversations = field(entry, "conversations", (list,))
    if not conversations:
        raise BadRecord("empty 'conversations'")
    for turn in conversations:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise BadRecord("conversation turn without a text 'value'", f"found {str(turn)[:80]!r}")
    if "image" in entry:
        field(entry, "image")
    return [entry]


def json2jsonl_output_dir(input_dir) -> Path:
    """Cerebras' sibling folder `<input_dir>_to_jsonl`."""
    input_dir = Path(os.path.abspath(input_dir))
    return input_dir.with_name(input_dir.name + "_to_jsonl")


def convert_json2jsonl(input_dir, *, output_dir=None, image_root=None, strict=False, progress=True) -> Report:
    """Every `input_dir/*.json` (a list of records) -> `<output_dir>/<name>.jsonl`, one record per line."""
    report = Report("convert_json2jsonl", strict)
    folder = require_dir(input_dir, "--input_dir")
    out_dir = Path(output_dir) if output_dir is not None else json2jsonl_output_dir(folder)
    files = sorted(folder.glob("*.json"))
    if not files:
        raise UsageError(f"--input_dir {folder}: no *.json files found")
    images = ImageChecker(image_root)
    for path in files:
        data = load_json(path, report)
        if data is None:
            continue
        if not isinstance(data, list):
            report.skip(BadRecord("unexpected json layout", "expected a list of records"), str(path))
            continue
        items = progress_bar(data, progress, path.name, total=len(data))
        records = converted(items, lambda i, e: check_llava_entry(e), where_with_id(path.name, "id"), report, images)
        # Only the extension changes (Cerebras replaced every "json" in the name).
        write_jsonl_or_note(out_dir / (path.stem + ".jsonl"), records, report)
    return report


# --------------------------------------------------------------------------------------------------
# synthdog_en and arxivcap (parquet with embedded images)
# --------------------------------------------------------------------------------------------------


def check_image_prefix(output_image_dir, image_prefix: str) -> None:
    """The records say `image_prefix/...` while the files go to `output_image_dir/...`: the latter must end
    with the former, so that the image root is output_image_dir minus the prefix. (Cerebras only tested
    substring containment, which lets mismatched paths through.)"""
    prefix_parts = [p for p in posixpath.normpath(image_prefix.replace("\\", "/")).split("/") if p not in ("", ".")]
    if any(p == ".." for p in prefix_parts) or posixpath.isabs(image_prefix):
        raise UsageError(f"--image_prefix {image_prefix!r} must be a relative path without '..'")
    dir_parts = Path(os.path.abspath(output_image_dir)).parts
    if prefix_parts and list(dir_parts[-len(prefix_parts):]) != prefix_parts:
        raise UsageError(
            f"--output_image_dir {output_image_dir} does not end with --image_prefix {image_prefix!r}; the records "
            "hold image_prefix/<file> relative to the image root, so pass an output_image_dir like "
            f"<image root>/{'/'.join(prefix_parts)}")


def select_parquet_files(input_dir, key: Callable[[str], int], parquet_range, report: Report) -> list[Path]:
    """*.parquet in `input_dir` sorted by the number `key` reads from the name, kept if start <= n < end."""
    folder = require_dir(input_dir, "--input_dir")
    numbered = []
    for path in folder.glob("*.parquet"):
        try:
            numbered.append((key(path.name), path.name, path))
        except (ValueError, IndexError):
            report.skip(BadRecord("unexpected parquet file name"), str(path))
    if not numbered:
        raise UsageError(f"--input_dir {folder}: no *.parquet files with the expected names found")
    numbered.sort()
    if parquet_range is None:
        return [p for _, _, p in numbered]
    if len(parquet_range) != 2:
        raise UsageError(f"--parquet_range takes two numbers, START END (END excluded); got {parquet_range}")
    start, end = parquet_range
    chosen = [p for n, _, p in numbered if start <= n < end]
    if not chosen:
        raise UsageError(f"--parquet_range {start} {end} selects none of the file numbers "
                         f"{sorted({n for n, _, _ in numbered})}")
    return chosen


def synthdog_file_number(name: str) -> int:
    return int(name.split("-")[1])  # train-00003-of-00084-<hash>.parquet -> 3


def arxivcap_file_number(name: str) -> int:
    return int(name.split("_")[2])  # arXiv_src_2112_001.parquet -> 2112 (Cerebras' key)


def decode_image(data):
    """PIL image from embedded bytes, fully decoded so that broken data is found here."""
    from PIL import Image

    if not isinstance(data, (bytes, bytearray)) or not data:
        raise BadRecord("missing image bytes")
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Exception as err:  # Pillow raises many types for bad data; all mean "cannot decode"
        raise BadRecord("undecodable image bytes", f"{type(err).__name__}: {err}") from None
    return im


def save_png(im, path: Path) -> None:
    if im.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
        im = im.convert("RGB")  # e.g. CMYK JPEGs
    with atomic_output(path, "wb") as f:
        im.save(f, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def save_image_bytes(data: bytes, im, path: Path) -> None:
    """Keep the original bytes when they already are in the format the file name says; else re-encode."""
    ext_format = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}.get(path.suffix.lower())
    with atomic_output(path, "wb") as f:
        if ext_format == im.format or ext_format is None:
            f.write(data)
        else:
            if ext_format == "JPEG" and im.mode not in ("L", "RGB", "CMYK"):
                im = im.convert("RGB")
            im.save(f, format=ext_format)


def llava_arrow_type():
    import pyarrow as pa

    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    return pa.struct([("id", pa.string()), ("image", pa.string()), ("conversations", pa.list_(turn))])


class ParquetSidecar:
    """Optional processed-parquet output (Cerebras' --output_parquet_dir): the kept input rows plus `id` and
    `llava` columns, uncompressed, written to a temporary name and renamed on close."""

    def __init__(self, path: Path | None, llava_type):
        self.path, self.llava_type, self.writer, self.tmp = path, llava_type, None, None

    def write(self, batch, keep: list[int], ids: list, llava: list) -> None:
        if self.path is None or not keep:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_batches([batch]).take(pa.array(keep, pa.int64()))
        table = table.replace_schema_metadata(None)
        table = table.append_column("id", pa.array(ids, pa.string()))
        table = table.append_column("llava", pa.array(llava, self.llava_type))
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = partial_name(self.path)
            self.writer = pq.ParquetWriter(self.tmp, table.schema, compression="none")
        self.writer.write_table(table)

    def close(self, ok: bool) -> None:
        if self.writer is not None:
            self.writer.close()
            if ok:
                os.replace(self.tmp, self.path)
            elif self.tmp.exists():
                self.tmp.unlink()


def synthdog_record(row_id: str, ground_truth, question: str, image_prefix: str) -> dict:
    """One SynthDoG row (spec 1.8); ground_truth is a JSON string {"gt_parse": {"text_sequence": ...}}."""
    if not isinstance(ground_truth, str):
        raise BadRecord("missing ground_truth")
    try:
        text = json.loads(ground_truth)["gt_parse"]["text_sequence"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise BadRecord("ground_truth without gt_parse.text_sequence",
                        f"{type(err).__name__}: {ground_truth[:80]!r}") from None
    if not isinstance(text, str):
        raise BadRecord("ground_truth without gt_parse.text_sequence", f"text_sequence is {text!r:.60}")
    return llava_record(row_id, posixpath.join(image_prefix, f"{row_id}.png"), question, text)


def iter_parquet_batches(path: Path, columns: list[str] | None, required: list[str], batch_size: int,
                         report: Report):
    """Yield the row count, then record batches of one parquet file (streamed row group by row group).

    `columns` None reads every column. An unreadable file, or one without the `required` columns, is counted.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        missing = [c for c in required if c not in pf.schema_arrow.names]
        if missing:
            raise BadRecord("parquet file without the expected columns",
                            f"missing {missing}, has {pf.schema_arrow.names}")
        yield pf.metadata.num_rows
        for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
            yield batch
    except (pa.ArrowException, OSError) as err:
        report.skip(BadRecord("unreadable parquet file", f"{type(err).__name__}: {err}"), str(path))
    except BadRecord as err:
        report.skip(err, str(path))


def convert_parquet_file(path: Path, output_jsonl: Path, sidecar: ParquetSidecar, convert_row, *,
                         columns: list[str] | None, required: list[str], batch_size: int, unit: str,
                         report: Report, progress: bool, where: Callable[[int], str] | None = None) -> None:
    """Shared loop of synthdog_en and arxivcap: every row of one parquet file -> `output_jsonl` (+ sidecar).

    `convert_row(row, item)` returns (records, sidecar id, sidecar llava value) or raises BadRecord, which is
    counted at `where(row)` (default "<file> row <n>")."""
    def records() -> Iterator[dict]:
        batches = iter_parquet_batches(path, columns, required, batch_size, report)
        total = next(batches, None)
        bar = progress_bar(None, progress, path.name, total=total, unit=unit) if progress else None
        row = 0
        for batch in batches:
            keep, ids, out = [], [], []
            for i, item in enumerate(batch.to_pylist()):
                row += 1
                try:
                    recs, row_id, llava = convert_row(row - 1, item)
                except BadRecord as err:
                    report.skip(err, where(row - 1) if where else f"{path.name} row {row - 1}")
                    continue
                keep.append(i)
                ids.append(row_id)
                out.append(llava)
                yield from recs
            sidecar.write(batch, keep, ids, out)
            if bar is not None:
                bar.update(batch.num_rows)
        if bar is not None:
            bar.close()

    ok = False
    try:
        write_jsonl_or_note(output_jsonl, records(), report)
        ok = True
    finally:
        sidecar.close(ok)


def convert_synthdog_en(input_dir, output_jsonl_dir, output_image_dir, image_prefix, *, output_parquet_dir=None,
                        parquet_range=None, seed=0, strict=False, progress=True) -> Report:
    """SynthDoG-EN parquet shards -> one `.jsonl` per shard + PNGs under output_image_dir/<split>/<shard>/."""
    report = Report("synthdog_en", strict)
    check_image_prefix(output_image_dir, image_prefix)
    files = select_parquet_files(input_dir, synthdog_file_number, parquet_range, report)
    for path in files:
        split, shard = path.name.split("-")[:2]
        image_dir = Path(output_image_dir) / split / shard
        prefix = posixpath.join(image_prefix, split, shard)
        # One stream per shard: a shard's prompts do not depend on which other shards are selected.
        rng = random.Random(f"synthdog_en:{seed}:{path.name}")

        def convert_row(row: int, item: dict, rng=rng, image_dir=image_dir, prefix=prefix):
            row_id = f"{row:07d}"
            question = rng.choice(CAPTION_QUESTIONS)  # drawn for every row: stable streams
            record = synthdog_record(row_id, item.get("ground_truth"), question, prefix)
            image = item.get("image") or {}
            data = image.get("bytes") if isinstance(image, dict) else None
            save_png(decode_image(data), image_dir / f"{row_id}.png")
            return [record], row_id, record

        sidecar = ParquetSidecar(
            Path(output_parquet_dir) / (path.stem + ".parquet") if output_parquet_dir else None, llava_arrow_type())
        convert_parquet_file(path, Path(output_jsonl_dir) / (path.stem + ".jsonl"), sidecar, convert_row,
                             columns=None, required=["image", "ground_truth"], batch_size=64, unit="img",
                             report=report, progress=progress,
                             where=lambda row, name=path.name: f"{name} row {row} (id {row:07d})")
    return report


def arxivcap_records(caption_images, image_prefix: str, report: Report, save: Callable[[str, object], None]):
    """Records for one ArxivCap row; every figure image is saved, single-figure captions become records."""
    if not isinstance(caption_images, list):
        raise BadRecord("missing field 'caption_images'")
    records = []
    for entry in caption_images:
        pairs = field(entry, "cil_pairs", (list,))
        if not pairs:
            raise BadRecord("caption without images")
        for pair in pairs:
            image_file = safe_relpath(field(pair, "image_file"))
            image = field(pair, "image", (dict,))
            save(image_file, image.get("bytes"))
        if len(pairs) == 1:  # image_file is that one figure's
            records.append(llava_record(
                PurePosixPath(image_file).stem,
                posixpath.join(image_prefix, image_file),
                ARXIVCAP_QUESTIONS["Single-Figure Captioning"],
                field(entry, "caption"),
            ))
        else:
            report.note("multi-figure captions (not converted, as in Cerebras)")
    return records


def convert_arxivcap(input_dir, output_jsonl_dir, output_image_dir, image_prefix, *, output_parquet_dir=None,
                     parquet_range=None, strict=False, progress=True) -> Report:
    """ArxivCap parquet files -> one `.jsonl` per file (one record per line) + figures under output_image_dir."""
    report = Report("arxivcap", strict)
    check_image_prefix(output_image_dir, image_prefix)
    files = select_parquet_files(input_dir, arxivcap_file_number, parquet_range, report)
    list_type = None
    if output_parquet_dir:
        import pyarrow as pa

        list_type = pa.list_(llava_arrow_type())

    def save(image_file: str, data) -> None:
        im = decode_image(data)
        save_image_bytes(data, im, Path(output_image_dir) / image_file)

    def convert_row(row: int, item: dict):
        recs = arxivcap_records(item.get("caption_images"), image_prefix, report, save)
        return recs, str(row), recs

    for path in files:
        sidecar = ParquetSidecar(Path(output_parquet_dir) / path.name if output_parquet_dir else None, list_type)
        convert_parquet_file(path, Path(output_jsonl_dir) / (path.stem + ".jsonl"), sidecar, convert_row,
                             columns=None if output_parquet_dir else ["caption_images"],
                             required=["caption_images"], batch_size=8, unit="row", report=report,
                             progress=progress)
    return report


# --------------------------------------------------------------------------------------------------
# A small Llama-style tokenizer (used by the demo dataset and by tests of later stages)
# --------------------------------------------------------------------------------------------------

# SentencePiece settings that mirror Llama-2's tokenizer.model (BPE, byte fallback, split digits, identity
# normalisation, dummy prefix "▁"), with ids unk 0 / bos 1 / eos 2 and no pad piece.
SPM_TRAINER_SETTINGS = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    add_dummy_prefix=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    character_coverage=1.0,
    hard_vocab_limit=False,  # a small corpus gives fewer pieces instead of an error
    max_sentence_length=16384,
    input_sentence_size=0,  # use every sentence, no sampling: the result depends on the texts only
    shuffle_input_sentence=False,
    num_threads=1,  # multi-threaded training may order ties differently
    minloglevel=2,
)


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
    # One sentence per line, so "\n" never becomes a piece and is byte-encoded as <0x0A>, as in Llama-2.
    # A line of printable ASCII first gives every letter, digit and sign a piece of its own.
    yield string.ascii_letters + string.digits + string.punctuation
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def write_llama_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1000) -> Path:
    """Train a small SentencePiece BPE model on `texts` and save it as a Hugging Face Llama tokenizer folder.

    The folder holds tokenizer.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json and
    loads offline with AutoTokenizer.from_pretrained(out_dir) (fast or slow, legacy Llama-2 behaviour):
    bos 1, eos 2, unk 0, no pad token, "▁" is a piece, "\\n" encodes as <0x0A>. Deterministic for given texts.
    `vocab_size` is an upper bound: a small corpus yields fewer pieces.
    """
    import sentencepiece as spm
    from transformers import LlamaTokenizer, LlamaTokenizerFast

    out_dir = Path(out_dir)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(texts), model_writer=model, vocab_size=vocab_size,
            **SPM_TRAINER_SETTINGS)
    except RuntimeError as err:
        raise ValueError(f"sentencepiece training failed for vocab_size={vocab_size}: {err}; "
                         "a larger vocab_size (>= 300) or more text is needed") from None
    # Build the folder under a temporary name, then move the files into out_dir.
    tmp = partial_name(out_dir)
    tmp.mkdir(parents=True, exist_ok=False)
    try:
        (tmp / "tokenizer.model").write_bytes(model.getvalue())
        slow = LlamaTokenizer(vocab_file=str(tmp / "tokenizer.model"), legacy=True, add_bos_token=True,
                              add_eos_token=False, clean_up_tokenization_spaces=False)
        slow.save_pretrained(str(tmp))
        fast = LlamaTokenizerFast.from_pretrained(str(tmp), from_slow=True, legacy=True)
        fast.save_pretrained(str(tmp))
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in sorted(tmp.iterdir()):
            os.replace(f, out_dir / f.name)
    finally:
        for f in tmp.iterdir() if tmp.exists() else ():
            f.unlink()
        if tmp.exists():
            tmp.rmdir()
    return out_dir


# --------------------------------------------------------------------------------------------------
# A small byte-level BPE tokenizer with a chat template (Llama-3 or Qwen2 style; demo and tests)
# --------------------------------------------------------------------------------------------------

# Pre-tokenizer split in the manner of today's byte-level BPE tokenizers: words with their leading space, and runs of
# newlines as one piece, so "\n\n" becomes one token as in Llama-3 and Qwen.
BPE_SPLIT_PATTERN = r" ?[^\s]+|\s*[\r\n]+|\s+(?!\S)|\s+"

# family -> (special tokens, BOS added in front of every encoding or None, EOS, pad or None, chat template key)
BPE_CHAT_FAMILIES = {
    "llama3": (("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
               "<|begin_of_text|>", "<|eot_id|>", None, "llama3"),
    "qwen2": (("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>", "<|endoftext|>", "qwen2"),
}


def write_bpe_chat_tokenizer(texts: Iterable[str], out_dir: str | Path, family: str, vocab_size: int = 1000) -> Path:
    """Train a small byte-level BPE tokenizer on `texts` with `family`'s special tokens and chat template
    (create_hdf5_dataset.CHAT_TEMPLATES) and save it as a Hugging Face tokenizer folder (tokenizer.json,
    tokenizer_config.json with the template). llama3: BOS <|begin_of_text|> added, EOS <|eot_id|>, no pad;
    qwen2: no BOS, EOS <|im_end|>, pad <|endoftext|>. Deterministic for given texts."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from create_hdf5_dataset import CHAT_TEMPLATES

    specials, bos, eos, pad, template = BPE_CHAT_FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(BPE_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   chat_template=CHAT_TEMPLATES[template], clean_up_tokenization_spaces=False)
    out_dir = Path(out_dir)
    tmp = partial_name(out_dir)
    fast.save_pretrained(str(tmp))
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(tmp.iterdir()):
        os.replace(f, out_dir / f.name)
    tmp.rmdir()
    return out_dir


# --------------------------------------------------------------------------------------------------
# synthetic_shapes: the demo dataset
# --------------------------------------------------------------------------------------------------

SHAPES = ["circle", "square", "triangle", "star", "cross"]
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
COLORS = {  # saturated colours, far from the grey backgrounds and from each other
    "red": (215, 35, 35),
    "green": (30, 165, 60),
    "blue": (35, 85, 225),
    "yellow": (240, 210, 30),
    "purple": (145, 50, 195),
}
# Named single-shape positions as (column, row) cells of a 3x3 grid.
POSITIONS = {"top": (1, 0), "left": (0, 1), "center": (1, 1), "right": (2, 1), "bottom": (1, 2)}
POSITION_PHRASES = {"top": "at the top", "left": "on the left", "center": "in the center",
                    "right": "on the right", "bottom": "at the bottom"}
COUNT_WORDS = ["one", "two", "three", "four"]
BACKGROUNDS = ["plain", "gradient", "noisy"]
SUPERSAMPLE = 4  # shapes are drawn at 4x and downscaled, for smooth edges

ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."  # mix665k's short-answer cue

# Question wordings per type; the answer is always one word from the type's vocabulary.
QUESTIONS = {
    "color": ["What color is the shape?", "What is the color of the shapes?", "Which color do the shapes have?"],
    "shape": ["What shape is it?", "What kind of shape is in the image?", "Which shape is drawn?"],
    "count": ["How many shapes are there?", "How many shapes are in the image?", "What is the number of shapes?"],
    "position": ["Where is the shape?", "Where is the shape located in the image?",
                 "In which part of the image is the shape?"],
}
ANSWERS = {"color": list(COLORS), "shape": SHAPES, "count": COUNT_WORDS, "position": list(POSITIONS)}

# Text-only records (no image; "model": "" as mix665k's ShareGPT entries): short answers, general knowledge.
TEXT_ONLY_QA = [
    ("How many sides does a triangle have?", "three"),
    ("How many sides does a square have?", "four"),
    ("What color do you get when you mix blue and yellow?", "green"),
    ("What color do you get when you mix red and blue?", "purple"),
    ("Which shape has no corners?", "circle"),
    ("What is one plus one?", "two"),
    ("What is two plus two?", "four"),
    ("What is the opposite of left?", "right"),
    ("What is the opposite of top?", "bottom"),
    ("What color is a ripe banana?", "yellow"),
    ("What color is fresh grass?", "green"),
    ("What color is the sky on a clear day?", "blue"),
]

QUESTIONS_FILE = "phase2/eval/questions.jsonl"
MULTI_TURN_SHARE = 0.25  # share of image records in phase 2 that ask 2-3 questions
TEXT_ONLY_SHARE = 0.03  # text-only records added per split, relative to the number of images


def _grey_tone(rng: random.Random) -> tuple[int, int, int]:
    level = rng.randint(60, 200)
    return tuple(max(0, min(255, level + rng.randint(-10, 10))) for _ in range(3))


def _tone_name(rgb) -> str:
    mean = sum(rgb) / 3
    return "dark gray" if mean < 105 else ("gray" if mean < 155 else "light gray")


def _background(kind: str, size: int, rng: random.Random, np):
    """An RGB uint8 array: a plain grey, a grey-to-grey gradient, or a grey with pixel noise (added later)."""
    a = _grey_tone(rng)
    if kind != "gradient":
        return np.broadcast_to(np.array(a, np.uint8), (size, size, 3)).copy(), a
    b = _grey_tone(rng)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    t = ramp[None, :] if rng.random() < 0.5 else ramp[:, None]
    t = np.broadcast_to(t, (size, size))[..., None]
    img = (np.array(a, np.float32) * (1 - t) + np.array(b, np.float32) * t).astype(np.uint8)
    return img, tuple((x + y) // 2 for x, y in zip(a, b))


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.75 * r), (cx - 0.95 * r, cy + 0.75 * r)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        return pts
    if shape == "cross":
        w = 0.32 * r
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    raise ValueError(shape)


def draw_shapes_image(scene: dict, size: int, rng: random.Random, np_rng, np):
    """Render one scene {shape, color, cells, background} to a PIL RGB image of size x size."""
    from PIL import Image, ImageDraw

    big = size * SUPERSAMPLE
    bg, _ = scene["_bg_array"]
    canvas = Image.fromarray(np.repeat(np.repeat(bg, SUPERSAMPLE, 0), SUPERSAMPLE, 1))
    draw = ImageDraw.Draw(canvas)
    cell = big / 3
    base = COLORS[scene["color"]]
    for col, row in scene["cells"]:
        r = cell * rng.uniform(0.26, 0.38)
        cx = (col + 0.5 + rng.uniform(-0.08, 0.08)) * cell
        cy = (row + 0.5 + rng.uniform(-0.08, 0.08)) * cell
        fill = tuple(max(0, min(255, c + rng.randint(-18, 18))) for c in base)
        if scene["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif scene["shape"] == "square":
            s = 0.85 * r
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        else:
            draw.polygon(_shape_polygon(scene["shape"], cx, cy, r), fill=fill)
    img = canvas.resize((size, size), Image.BOX)
    if scene["background"] == "noisy":
        arr = np.asarray(img).astype(np.int16) + np_rng.normal(0, 14, (size, size, 1)).astype(np.int16)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img


def sample_scene(rng: random.Random, size: int, np) -> dict:
    """Draw the scene description: all shapes of one image share kind and colour; 1-4 of them."""
    count = rng.randint(1, len(COUNT_WORDS))
    if count == 1:
        position = rng.choice(list(POSITIONS))
        cells = [POSITIONS[position]]
    else:
        position = None
        cells = rng.sample([(c, r) for r in range(3) for c in range(3)], count)
    scene = {"shape": rng.choice(SHAPES), "color": rng.choice(list(COLORS)), "count": count,
             "position": position, "cells": cells, "background": rng.choice(BACKGROUNDS)}
    scene["_bg_array"] = _background(scene["background"], size, rng, np)
    return scene


def scene_caption(scene: dict) -> str:
    tone = _tone_name(scene["_bg_array"][1])
    if scene["count"] == 1:
        what = f"a {scene['color']} {scene['shape']} {POSITION_PHRASES[scene['position']]}"
    else:
        what = f"{COUNT_WORDS[scene['count'] - 1]} {scene['color']} {SHAPE_PLURALS[scene['shape']]}"
    return f"{what}, on a {scene['background']} {tone} background."


def scene_answer(scene: dict, qtype: str) -> str:
    return {"color": scene["color"], "shape": scene["shape"], "count": COUNT_WORDS[scene["count"] - 1],
            "position": scene["position"]}[qtype]


def phase2_conversation(scene: dict, rng: random.Random) -> list[dict]:
    """Single question (75%) or 2-3 questions of different types; position only for one-shape images."""
    types = ["color", "shape", "count"] + (["position", "position"] if scene["count"] == 1 else [])
    if rng.random() < MULTI_TURN_SHARE:
        distinct = sorted(set(types))
        rng.shuffle(distinct)
        chosen = distinct[: rng.randint(2, min(3, len(distinct)))]
    else:
        chosen = [rng.choice(types)]  # "position" listed twice: asked as often as the others overall
    turns = []
    for k, qtype in enumerate(chosen):
        question = rng.choice(QUESTIONS[qtype])
        human = f"{IMAGE_TOKEN}\n{question}{ANSWER_SUFFIX}" if k == 0 else question
        turns += [{"from": "human", "value": human}, {"from": "gpt", "value": scene_answer(scene, qtype)}]
    return turns


def benchmark_question(record_id: str, image_rel: str, scene: dict, first_turn: str) -> dict:
    """An image's first phase-2 question in the LLaVA repo's evaluation format (the text without <image>, which
    the prompt builder places), with its category and reference answer: what run.py --mode predict reads."""
    question = first_turn.replace(IMAGE_TOKEN, "").strip()
    qtype = next(q for q, wordings in QUESTIONS.items() if question.split("\n")[0] in wordings)
    return {"question_id": record_id, "image": image_rel, "text": question, "category": qtype,
            "answer": scene_answer(scene, qtype)}


def generate_split(split: str, n_images: int, out_dir: Path, image_size: int, seed: int, progress: bool):
    """Images + phase-1 and phase-2 records for one split; each split has its own random stream."""
    import numpy as np

    rng = random.Random(f"synthetic_shapes:{seed}:{split}")
    np_rng = np.random.default_rng([seed, {"train": 0, "eval": 1}.get(split, 2)])
    image_dir = out_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    phase1, phase2, questions = [], [], []
    stats = Counter()
    for i in progress_bar(range(n_images), progress, f"synthetic_shapes {split}", unit="img"):
        scene = sample_scene(rng, image_size, np)
        image_rel = f"{split}/{i:06d}.png"
        img = draw_shapes_image(scene, image_size, rng, np_rng, np)
        with atomic_output(out_dir / "images" / image_rel, "wb") as f:
            img.save(f, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        record_id = f"shapes_{split}_{i:06d}"
        request = rng.choice(CAPTION_QUESTIONS)
        # LCS-558K puts <image> after the request, CC3M-595K before: use both.
        human = f"{request}\n{IMAGE_TOKEN}" if rng.random() < 0.5 else f"{IMAGE_TOKEN}\n{request}"
        phase1.append({"id": record_id, "image": image_rel, "conversations": [
            {"from": "human", "value": human}, {"from": "gpt", "value": scene_caption(scene)}]})
        conversation = phase2_conversation(scene, rng)
        stats["multi_turn"] += len(conversation) > 2
        phase2.append({"id": record_id, "image": image_rel, "conversations": conversation})
        questions.append(benchmark_question(record_id, image_rel, scene, conversation[0]["value"]))
    n_text = max(2, round(TEXT_ONLY_SHARE * n_images))
    for k in range(n_text):
        question, answer = rng.choice(TEXT_ONLY_QA)
        phase2.append({"id": f"shapes_{split}_text_{k:04d}", "model": "", "conversations": [
            {"from": "human", "value": question + ANSWER_SUFFIX}, {"from": "gpt", "value": answer}]})
    stats.update(images=n_images, phase1_records=len(phase1), phase2_records=len(phase2), phase2_text_only=n_text)
    return phase1, phase2, questions, dict(stats)


def make_synthetic_shapes(output_dir, *, num_train=2000, num_eval=200, image_size=64, seed=0, vocab_size=1000,
                          progress=True, tokenizer: str = "llama") -> dict:
    """Write the demo dataset and return its manifest. Layout under `output_dir`:

        images/{train,eval}/<n>.png            image root = images/; records hold "train/000001.png"
        phase1/{train,eval}/data.jsonl         LCS-558K style caption records
        phase2/{train,eval}/data.jsonl         mix665k style questions (single, multi-turn, text-only)
        phase2/eval/questions.jsonl            each held-out image's first question in the LLaVA repo's
                                               evaluation format, with category and answer (run.py --mode predict)
        tokenizer/                             write_llama_tokenizer over every text + vicuna_v1 prompt
                                               (tokenizer="llama3"/"qwen2": write_bpe_chat_tokenizer)
        manifest.json                          counts, seed, image_size, question types and answers
    """
    if num_train < 1 or num_eval < 1:
        raise UsageError(f"--num_train and --num_eval must be >= 1 (got {num_train}, {num_eval})")
    if image_size < 16:
        raise UsageError(f"--image_size must be >= 16 pixels (got {image_size})")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = [VICUNA_V1_SYSTEM_PROMPT, USER_PREFIX, ASSISTANT_PREFIX]
    counts, files = {}, {}
    for split, n in (("train", num_train), ("eval", num_eval)):
        phase1, phase2, questions, counts[split] = generate_split(split, n, out, image_size, seed, progress)
        if split == "eval":
            with atomic_output(out / QUESTIONS_FILE) as f:
                f.writelines(json.dumps(q) + "\n" for q in questions)
        for phase, records in (("phase1", phase1), ("phase2", phase2)):
            path = out / phase / split / "data.jsonl"
            with atomic_output(path) as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
            files.setdefault(phase, {})[split] = path.relative_to(out).as_posix()
            texts += [t["value"].replace(IMAGE_TOKEN, "") for r in records for t in r["conversations"]]
    if tokenizer == "llama":
        write_llama_tokenizer(texts, out / "tokenizer", vocab_size=vocab_size)
    else:
        write_bpe_chat_tokenizer(texts, out / "tokenizer", tokenizer, vocab_size=vocab_size)
    manifest = {
        "dataset": "synthetic_shapes",
        "seed": seed,
        "image_size": image_size,
        "image_root": "images",
        "tokenizer": "tokenizer",
        "files": files,
        "questions": QUESTIONS_FILE,
        "counts": counts,
        "question_types": {q: {"questions": QUESTIONS[q], "answers": ANSWERS[q]} for q in QUESTIONS},
        "answer_suffix": ANSWER_SUFFIX,
        "text_only_answers": sorted({a for _, a in TEXT_ONLY_QA}),
        "shapes": SHAPES,
        "colors": list(COLORS),
        "positions": list(POSITIONS),
        "backgrounds": BACKGROUNDS,
        "caption_questions": CAPTION_QUESTIONS,
    }
    with atomic_output(out / "manifest.json") as f:  # written last: its presence means the set is complete
        json.dump(manifest, f, indent=2)
    return manifest


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

# Subcommand help texts as in Cerebras (spec 1.1), plus the demo dataset.
HELP = {
    "ai2d": "Pre-process AI2D dataset",
    "arxivcap": "Pre-process ArxivCAP dataset",
    "arxivqa": "Pre-process ArxivQA dataset",
    "chartqa": "Pre-process ChartQA dataset",
    "sp_docvqa": "Pre-process SP-DocVQA dataset",
    "infographics_docvqa": "Pre-process Infographics-DocVQA dataset",
    "dvqa": "Pre-process DVQA dataset",
    "synthdog_en": "Pre-process Synthdog_EN dataset",
    "convert_json2jsonl": "Pre-process json files to jsonl files",
    "synthetic_shapes": "Draw the synthetic shapes demo dataset (images, phase-1/2 records, tokenizer)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Pre-process LLaVa datasets", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="dataset")

    def add(name: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=HELP[name], description=HELP[name])
        p.add_argument("--no_progress", action="store_true", help="hide progress bars")
        if name != "synthetic_shapes":
            p.add_argument("--strict", action="store_true",
                           help="stop at the first bad record and name it, instead of skipping and counting")
        return p

    def image_root(p):
        p.add_argument("--image_root", default=None,
                       help="common image root (the HDF5 stage's dataset.image_dir); when given, records whose "
                            "image is missing or unreadable under it are skipped")

    def output_dir(p, default: str):
        p.add_argument("--output_dir", default=None, help=f"write outputs here instead of {default}, "
                                                          "keeping the same relative layout")

    p = add("ai2d")
    p.add_argument("--question_dir", required=True, help="AI2D questions/ folder (one json file per image)")
    p.add_argument("--output_jsonl_dir", required=True, help="folder for ai2d_llava.jsonl")
    image_root(p)

    p = add("arxivqa")
    p.add_argument("--input_file", required=True, help="ArxivQA arxivqa.jsonl")
    p.add_argument("--output_jsonl_dir", required=True, help="folder for arxivqa_llava.jsonl")
    image_root(p)

    for name, what in (("chartqa", "ChartQA_Dataset folder with train/, val/, test/"),
                       ("sp_docvqa", "folder with train_v1.0_withQT.json and val_v1.0_withQT.json"),
                       ("infographics_docvqa", "folder with infographicsVQA_{train_v1.0,val_v1.0_withQT}.json"),
                       ("dvqa", "DVQA qa/ folder with train_qa.json")):
        p = add(name)
        p.add_argument("--dataset_folder", required=True, help=what)
        output_dir(p, "the dataset folder (as Cerebras)")
        image_root(p)

    for name in ("synthdog_en", "arxivcap"):
        p = add(name)
        p.add_argument("--input_dir", required=True, help="folder with the dataset's *.parquet files")
        p.add_argument("--output_jsonl_dir", required=True, help="folder for one .jsonl per parquet file")
        p.add_argument("--output_parquet_dir", default=None,
                       help="optional folder for processed parquet copies (input rows + id + llava columns)")
        p.add_argument("--parquet_range", type=int, nargs="+", default=None, metavar="N",
                       help="START END: only files whose number n has START <= n < END (default: all)")
        p.add_argument("--output_image_dir", required=True,
                       help="where the extracted images go; must end with --image_prefix")
        p.add_argument("--image_prefix", required=True,
                       help="path of --output_image_dir relative to the common image root, used in the records")
        if name == "synthdog_en":
            p.add_argument("--seed", type=int, default=0, help="seed of the caption-question choice")

    p = add("convert_json2jsonl")
    p.add_argument("--input_dir", required=True, help="folder of LLaVA *.json files (each a list of records)")
    output_dir(p, "<input_dir>_to_jsonl (as Cerebras)")
    image_root(p)

    p = add("synthetic_shapes")
    p.add_argument("--output_dir", required=True, help="folder for images/, phase1/, phase2/, tokenizer/")
    p.add_argument("--num_train", type=int, default=2000, help="training images (default 2000)")
    p.add_argument("--num_eval", type=int, default=200, help="held-out images (default 200)")
    p.add_argument("--image_size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--vocab_size", type=int, default=1000, help="tokenizer vocabulary upper bound (default 1000)")
    p.add_argument("--tokenizer", choices=["llama", *BPE_CHAT_FAMILIES], default="llama",
                   help="llama: SentencePiece like Llama-2 (vicuna_v1 data); llama3 / qwen2: byte-level BPE with that "
                        "family's special tokens and chat template (system_prompt_style: chat_template)")
    return parser


def run(args: argparse.Namespace) -> Report | dict:
    progress = not args.no_progress
    common = dict(strict=getattr(args, "strict", False), progress=progress)
    d = args.dataset
    if d == "ai2d":
        return convert_ai2d(args.question_dir, args.output_jsonl_dir, image_root=args.image_root, **common)
    if d == "arxivqa":
        return convert_arxivqa(args.input_file, args.output_jsonl_dir, image_root=args.image_root, **common)
    if d in ("chartqa", "sp_docvqa", "infographics_docvqa", "dvqa"):
        fn = {"chartqa": convert_chartqa, "sp_docvqa": convert_sp_docvqa,
              "infographics_docvqa": convert_infographics_docvqa, "dvqa": convert_dvqa}[d]
        return fn(args.dataset_folder, output_dir=args.output_dir, image_root=args.image_root, **common)
    if d == "synthdog_en":
        return convert_synthdog_en(args.input_dir, args.output_jsonl_dir, args.output_image_dir, args.image_prefix,
                                   output_parquet_dir=args.output_parquet_dir, parquet_range=args.parquet_range,
                                   seed=args.seed, **common)
    if d == "arxivcap":
        return convert_arxivcap(args.input_dir, args.output_jsonl_dir, args.output_image_dir, args.image_prefix,
                                output_parquet_dir=args.output_parquet_dir, parquet_range=args.parquet_range,
                                **common)
    if d == "convert_json2jsonl":
        return convert_json2jsonl(args.input_dir, output_dir=args.output_dir, image_root=args.image_root, **common)
    if d == "synthetic_shapes":
        return make_synthetic_shapes(args.output_dir, num_train=args.num_train, num_eval=args.num_eval,
                                     image_size=args.image_size, seed=args.seed, vocab_size=args.vocab_size,
                                     tokenizer=args.tokenizer,
                                     progress=progress)
    raise UsageError("Dataset currently not supported. Feel free to adapt codebase to include your dataset.")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except UsageError as err:
        parser.exit(2, f"{parser.prog} {args.dataset}: error: {err}\n")
    except StrictStop as err:
        print(f"{args.dataset}: stopped (--strict) at {err}", file=sys.stderr)
        return 1
    if isinstance(result, dict):  # synthetic_shapes manifest
        c = result["counts"]
        print(f"synthetic_shapes: wrote {c['train']['images']} train + {c['eval']['images']} eval images and "
              f"records to {args.output_dir}", file=sys.stderr)
        return 0
    print(result.summary(), file=sys.stderr)
    if result.written == 0:
        print(f"{args.dataset}: nothing converted; check the input paths and the skipped reasons above",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
