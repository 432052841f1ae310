import io

import datasets
import pytest
from PIL import Image

from fifa_hf.data import RowReport, image_bytes, load_preference_dataset, map_to_pairs, to_preference_pairs


def png(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


RED, BLUE = png("red"), png("blue")


def pickapic_rows(**overrides):
    rows = {
        "caption": ["a", "b", "c", "d"],
        "jpg_0": [RED, RED, RED, RED],
        "jpg_1": [BLUE, BLUE, BLUE, BLUE],
        "label_0": [1.0, 0.0, 0.5, 1.0],
    }
    rows.update(overrides)
    return datasets.Dataset.from_dict(rows)


def test_pickapic_labels_orient_chosen_and_rejected():
    pairs, report = to_preference_pairs(pickapic_rows())
    assert pairs["prompt"] == ["a", "b", "d"]
    assert pairs["chosen"] == [RED, BLUE, RED]
    assert pairs["rejected"] == [BLUE, RED, BLUE]
    assert pairs["row_id"] == [0, 1, 3]
    assert report.dropped == {"tie": 1}


def test_ties_can_be_kept_and_are_flagged():
    pairs, report = to_preference_pairs(pickapic_rows(), drop_ties=False)
    assert len(pairs) == 4 and report.dropped == {}
    assert pairs["tie"] == [False, False, True, False]


def test_has_label_and_are_different_and_bad_labels_are_dropped_and_counted():
    rows = pickapic_rows(
        label_0=[1.0, 0.3, float("nan"), 0.0],
        label_1=[0.0, 0.7, float("nan"), 0.0],
        has_label=[False, True, True, True],
        are_different=[True, True, True, True],
    )
    pairs, report = to_preference_pairs(rows)
    assert len(pairs) == 0
    assert report.dropped == {"invalid_label": 3, "no_label": 1}
    rows = pickapic_rows(are_different=[False, True, True, True])
    assert to_preference_pairs(rows)[1].dropped == {"identical_images": 1, "tie": 1}


def test_empty_prompts_and_undecodable_images_are_dropped_not_crashing():
    rows = pickapic_rows(caption=["", None, "c", "  d "], jpg_0=[RED, RED, b"not an image", RED], label_0=[1.0] * 4)
    pairs, report = to_preference_pairs(rows)
    assert pairs["prompt"] == ["d"] and pairs["row_id"] == [3]
    assert (report.rows_in, report.rows_kept, report.dropped) == (4, 1, {"empty_prompt": 2, "undecodable_image": 1})


def test_verifying_images_drops_a_truncated_jpeg_whose_header_reads_fine():
    import numpy as np

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(buffer, "JPEG")
    whole = buffer.getvalue()
    truncated = whole[: len(whole) // 2]
    rows = datasets.Dataset.from_dict(
        {"prompt": ["a", "b", "c"], "chosen": [whole, truncated, whole], "rejected": [whole] * 3}
    )
    assert to_preference_pairs(rows)[1].rows_kept == 3  # the header check cannot tell
    pairs, report = to_preference_pairs(rows, verify_images=True)
    assert pairs["prompt"] == ["a", "c"] and report.dropped == {"undecodable_image": 1}


def test_an_empty_dataset_gives_an_empty_report_or_a_clear_error():
    empty = datasets.Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    pairs, report = to_preference_pairs(empty)
    assert len(pairs) == 0 and (report.rows_in, report.rows_kept) == (0, 0)
    with pytest.raises(ValueError, match=r"Missing column\(s\) \['prompt', 'chosen', 'rejected'\]"):
        to_preference_pairs(datasets.Dataset.from_dict({}))
    with pytest.raises(ValueError, match="The dataset is empty"):
        map_to_pairs(datasets.IterableDataset.from_generator(lambda: iter([])))


def test_trl_rows_with_bytes_pil_or_image_feature():
    for chosen, rejected in [([RED], [BLUE]), ([Image.open(io.BytesIO(RED))], [Image.open(io.BytesIO(BLUE))])]:
        rows = datasets.Dataset.from_dict({"prompt": ["p"], "chosen": chosen, "rejected": rejected})
        pairs, report = to_preference_pairs(rows)
        assert report.rows_kept == 1
        assert Image.open(io.BytesIO(pairs[0]["chosen"])).getpixel((0, 0)) == (255, 0, 0)
    rows = datasets.Dataset.from_dict({"prompt": ["p"], "chosen": [RED], "rejected": [BLUE]})
    rows = rows.cast_column("chosen", datasets.Image()).cast_column("rejected", datasets.Image())
    assert to_preference_pairs(rows)[0][0]["rejected"] == BLUE


def test_missing_caption_or_prompt_names_the_column():
    with pytest.raises(ValueError, match=r"Missing column\(s\) \['caption'\]"):
        to_preference_pairs(datasets.Dataset.from_dict({"jpg_0": [RED], "jpg_1": [BLUE], "label_0": [1.0]}))
    with pytest.raises(ValueError, match=r"Missing column\(s\) \['prompt'\]"):
        to_preference_pairs(datasets.Dataset.from_dict({"chosen": [RED], "rejected": [BLUE]}))


def test_row_report_must_add_up():
    assert str(RowReport("x", 3, 2, {"tie": 1, "no_label": 0})) == "x: 3 in, 2 kept, dropped: tie=1"
    with pytest.raises(ValueError, match="does not add up"):
        RowReport("x", 3, 1, {"tie": 1})
    report = RowReport.from_reasons("x", ["", "tie", "", "no_label", "tie"])
    assert (report.rows_in, report.rows_kept, report.dropped) == (5, 2, {"no_label": 1, "tie": 2})
    assert str(report) == "x: 5 in, 2 kept, dropped: no_label=1, tie=2"
    assert str(RowReport("x", 2, 2)) == "x: 2 in, 2 kept, dropped: none"


def test_load_from_disk_parquet_and_streaming(tmp_path, synthetic_pickapic):
    synthetic_pickapic.save_to_disk(tmp_path / "disk")
    synthetic_pickapic.to_parquet(tmp_path / "rows.parquet")
    from_disk = load_preference_dataset(tmp_path / "disk")
    from_parquet = load_preference_dataset(tmp_path / "rows.parquet")
    assert from_disk["caption"] == from_parquet["caption"] == synthetic_pickapic["caption"]
    assert load_preference_dataset(str(tmp_path / "r*.parquet"))["caption"] == synthetic_pickapic["caption"]
    streamed = load_preference_dataset(tmp_path / "rows.parquet", streaming=True)
    assert isinstance(streamed, datasets.IterableDataset)
    assert next(iter(streamed))["caption"] == synthetic_pickapic[0]["caption"]


def test_synthetic_rows_account_for_every_drop(synthetic_pickapic):
    pairs, report = to_preference_pairs(synthetic_pickapic)
    rows = synthetic_pickapic.to_pandas()
    expected = {
        "no_label": int((~rows["has_label"]).sum()),
        "identical_images": int((rows["has_label"] & ~rows["are_different"]).sum()),
        "tie": int((rows["has_label"] & rows["are_different"] & (rows["label_0"] == 0.5)).sum()),
    }
    assert report.dropped == {reason: count for reason, count in expected.items() if count}
    assert len(pairs) == report.rows_kept == len(rows) - sum(expected.values()) > 0


def test_image_files_on_disk_and_pil_images_become_encoded_bytes(tmp_path):
    (tmp_path / "red.png").write_bytes(RED)
    (tmp_path / "blue.png").write_bytes(BLUE)
    rows = datasets.Dataset.from_dict(
        {"prompt": ["p"], "chosen": [str(tmp_path / "red.png")], "rejected": [str(tmp_path / "blue.png")]}
    )
    rows = rows.cast_column("chosen", datasets.Image()).cast_column("rejected", datasets.Image())  # paths, no bytes
    pairs, report = to_preference_pairs(rows)
    assert report.rows_kept == 1 and (pairs[0]["chosen"], pairs[0]["rejected"]) == (RED, BLUE)
    encoded = image_bytes(Image.open(io.BytesIO(BLUE)))
    assert encoded.startswith(b"\x89PNG") and Image.open(io.BytesIO(encoded)).getpixel((0, 0)) == (0, 0, 255)
    assert image_bytes({"bytes": None, "path": None}) is None and image_bytes(None) is None


def test_one_split_of_a_dataset_repo_is_read_without_preparing_the_others(tmp_path):
    """Pick-a-Pic v2's 500-row validation split must not cost its 335 GB train split (a local repo stands in)."""
    repo = tmp_path / "pickapic_v2"
    (repo / "data").mkdir(parents=True)
    pickapic_rows().to_parquet(repo / "data" / "validation_unique-00000-of-00001.parquet")
    (repo / "data" / "train-00000-of-00001.parquet").write_bytes(b"not parquet: reading it would fail")
    (repo / "README.md").write_text("# Pick-a-Pic v2, in miniature\n")
    rows = load_preference_dataset(repo, split="validation_unique", cache_dir=str(tmp_path / "cache"))
    assert rows["caption"] == ["a", "b", "c", "d"]


def png_header(width: int, height: int) -> bytes:
    """A PNG that says it has that size and holds no pixels: all the default image check reads is there."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    size = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + size + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_the_header_check_names_oversized_images_as_the_decoder_does():
    from fifa_hf.data import image_problem
    from fifa_hf.images import MAX_PIXELS

    assert image_problem(png_header(64, 64)) == ""
    assert image_problem(png_header(10_000, MAX_PIXELS // 10_000 + 1)) == "image_too_large"  # above the limit
    assert image_problem(png_header(20_000, MAX_PIXELS // 10_000 + 1)) == "image_too_large"  # PIL's bomb error
    assert image_problem(b"not an image") == "undecodable_image"
