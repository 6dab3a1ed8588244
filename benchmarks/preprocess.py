"""Throughput of preprocess_dataset.py: records/s for chartqa and convert_json2jsonl on 100,000 generated
records, and images/s for synthdog_en image extraction, each next to a bare reference loop measured in the
same run (the least work the step needs: json.load + json.dumps per record; PIL decode + PNG save at
Pillow's default level, which is what Cerebras does).

Run: python benchmarks/preprocess.py [--records 100000] [--images 200] [--image_size 640x480]
"""

import argparse
import io
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import preprocess_dataset as P  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def chartqa_input(folder: Path, n: int) -> None:
    rng = random.Random(0)
    items = [{"imgname": f"{rng.randrange(20000)}.png", "query": f"What is the value of bar {i % 37} in 2019?",
              "label": str(rng.randrange(1000))} for i in range(n)]
    (folder / "train").mkdir(parents=True)
    (folder / "train/train_human.json").write_text(json.dumps(items))


def mix665k_input(folder: Path, n: int) -> None:
    rng = random.Random(1)
    items = []
    for i in range(n):
        turns = []
        for k in range(rng.randint(1, 3)):
            q = ("<image>\n" if k == 0 else "") + f"What is shown in region {k} of picture {i}?"
            turns += [{"from": "human", "value": q}, {"from": "gpt", "value": "A red bus driving down the street."}]
        items.append({"id": f"{i:012d}", "image": f"coco/train2017/{i:012d}.jpg", "conversations": turns})
    folder.mkdir(parents=True)
    (folder / "llava_v1_5_mix665k.json").write_text(json.dumps(items, indent=2))


def synthdog_input(folder: Path, n: int, size: tuple[int, int]) -> bytes:
    """One parquet shard of n rows sharing a document-like JPEG (text-ish strokes on paper)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    w, h = size
    paper = (230 + rng.normal(0, 6, (h, w, 1))).clip(0, 255).astype(np.uint8).repeat(3, 2)
    im = Image.fromarray(paper)
    draw = ImageDraw.Draw(im)
    for y in range(20, h - 20, 18):
        x = 20
        while x < w - 60:
            word = int(rng.integers(12, 60))
            draw.rectangle([x, y, x + word, y + 9], fill=(40, 40, 40))
            x += word + 8
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    data = buf.getvalue()
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    gt = json.dumps({"gt_parse": {"text_sequence": "Anarchism is a political philosophy and movement."}})
    table = pa.table({"image": pa.array([{"bytes": data, "path": None}] * n, image_type),
                      "ground_truth": pa.array([gt] * n)})
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "train-00000-of-00084-bench.parquet", row_group_size=64)
    return data


def reference_json_lines(items: list, out: Path) -> None:
    with open(out, "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--image_size", default="640x480", help="WxH of the synthdog benchmark images")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.image_size.split("x"))
    n = args.records

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"records: {n}, synthdog images: {args.images} of {size[0]}x{size[1]}")

        chartqa_input(tmp / "chartqa", n)
        report, t = timed(lambda: P.convert_chartqa(tmp / "chartqa", output_dir=tmp / "out_c", progress=False))
        assert report.written == n
        items, t_ref = timed(lambda: json.loads((tmp / "chartqa/train/train_human.json").read_text()))
        _, t_ref2 = timed(lambda: reference_json_lines(
            [P.llava_record(i, "ChartQA_Dataset/train/png/" + it["imgname"], it["query"], it["label"])
             for i, it in enumerate(items)], tmp / "ref_c.jsonl"))
        t_ref += t_ref2
        print(f"chartqa            : {n / t:10.0f} records/s  (reference loop {n / t_ref:10.0f} records/s, "
              f"ratio {t_ref / t:.2f})")

        mix665k_input(tmp / "mix", n)
        report, t = timed(lambda: P.convert_json2jsonl(tmp / "mix", output_dir=tmp / "out_j", progress=False))
        assert report.written == n
        items, t_ref = timed(lambda: json.loads((tmp / "mix/llava_v1_5_mix665k.json").read_text()))
        _, t_ref2 = timed(lambda: reference_json_lines(items, tmp / "ref_j.jsonl"))
        t_ref += t_ref2
        print(f"convert_json2jsonl : {n / t:10.0f} records/s  (reference loop {n / t_ref:10.0f} records/s, "
              f"ratio {t_ref / t:.2f})")

        m = args.images
        data = synthdog_input(tmp / "sd", m, size)
        report, t = timed(lambda: P.convert_synthdog_en(
            tmp / "sd", tmp / "out_s", tmp / "root/synthdog/images", "synthdog/images", progress=False))
        assert report.written == m

        def reference_images():
            from PIL import Image

            for i in range(m):
                Image.open(io.BytesIO(data)).save(tmp / f"ref_{i}.png")

        _, t_ref = timed(reference_images)
        print(f"synthdog_en images : {m / t:10.1f} images/s   (reference PIL decode + default PNG save "
              f"{m / t_ref:.1f} images/s, ratio {t_ref / t:.2f})")


if __name__ == "__main__":
    main()
