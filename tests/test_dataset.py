import logging
import os
import unicodedata
from pathlib import Path

import pytest
from PIL import Image

from lora_trainer.dataset import DatasetScan, ImageRecord, scan_dataset
from lora_trainer.errors import DatasetError


def image(path: Path, size=(32, 16), color=(200, 10, 10), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, fmt)
    return path


def text(path: Path, content: str, encoding="utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding=encoding)
    return path


def snapshot(root: Path) -> dict:
    """Every file and folder under root with its size and mtime: to prove a scan writes nothing."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.stat(os.path.join(folder, name))
            out[os.path.relpath(os.path.join(folder, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def kohya_dir(tmp_path):
    root = tmp_path / "data"
    image(root / "a.png", (64, 32))
    text(root / "a.txt", "cat, sitting")
    image(root / "b.JPEG", (16, 48), fmt="JPEG")
    text(root / "b.caption", "dog")
    image(root / "10_brand" / "c.png")
    text(root / "10_brand" / "c.txt", "brand logo, red, \n")
    image(root / "10_brand" / "d.webp", fmt="WEBP")
    text(root / "10_brand" / "d.txt", "brand logo\nblue\n")  # one tag per line
    image(root / "misc" / "e.bmp")
    text(root / "misc" / "e.txt", "cat")
    # ignored: hidden files and folders, notebook checkpoints, deeper folders, other extensions
    image(root / ".hidden.png")
    image(root / ".cache" / "x.png")
    image(root / ".ipynb_checkpoints" / "a-checkpoint.png")
    image(root / "misc" / "deeper" / "f.png")
    text(root / "notes.md", "not an image")
    return root


def test_kohya_layout(kohya_dir):
    before = snapshot(kohya_dir)
    scan = scan_dataset(str(kohya_dir), repeats=3)
    assert snapshot(kohya_dir) == before  # nothing written, nothing touched
    assert isinstance(scan, DatasetScan) and scan.root == kohya_dir.resolve()
    assert scan.caption_source == ".txt"
    root = kohya_dir.resolve()
    assert scan.records == [
        ImageRecord(root / "10_brand" / "c.png", "brand logo, red,", 10, 32, 16, "10_brand"),
        ImageRecord(root / "10_brand" / "d.webp", "brand logo, blue", 10, 32, 16, "10_brand"),
        ImageRecord(root / "a.png", "cat, sitting", 3, 64, 32, "data"),
        ImageRecord(root / "b.JPEG", "dog", 3, 16, 48, "data"),
        ImageRecord(root / "misc" / "e.bmp", "cat", 3, 32, 16, "misc"),
    ]
    assert all(r.path.is_absolute() for r in scan.records)
    assert scan.num_images() == 5
    assert scan.num_samples() == 10 + 10 + 3 + 3 + 3
    assert scan.missing_captions() == []
    assert scan.skipped == []
    assert scan.dataset_dirs() == {
        "10_brand": {"n_repeats": 10, "img_count": 2},
        "data": {"n_repeats": 3, "img_count": 2},
        "misc": {"n_repeats": 3, "img_count": 1},
    }
    assert scan.tag_frequency() == {
        "10_brand": {"brand logo": 2, "red": 1, "blue": 1},
        "data": {"cat": 1, "sitting": 1, "dog": 1},
        "misc": {"cat": 1},
    }


def test_record_is_frozen(kohya_dir):
    record = scan_dataset(str(kohya_dir)).records[0]
    with pytest.raises(AttributeError):
        record.caption = "changed"


def test_caption_extension_without_dot_and_zero_repeat_folder(tmp_path):
    root = tmp_path / "d"
    image(root / "0_x" / "a.png")
    text(root / "0_x" / "a.cap", "hello")
    image(root / "3_" / "b.png")
    text(root / "3_" / "b.cap", "world")
    scan = scan_dataset(str(root), caption_extension="cap", repeats=2)
    assert [(r.subset, r.repeats, r.caption) for r in scan.records] == [("0_x", 2, "hello"), ("3_", 2, "world")]
    assert scan.caption_source == ".cap"


def test_exif_rotated_image_size(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20)).save(root / "r.jpg", exif=exif)
    text(root / "r.txt", "x")
    record = scan_dataset(str(root)).records[0]
    assert (record.width, record.height) == (20, 40)


def test_metadata_csv(tmp_path, caplog):
    root = tmp_path / "data"
    odd = "a, b \"quoted\" é.png"
    image(root / odd)
    image(root / "plain.png")
    image(root / "10_sub" / "ü.png")
    image(root / "uncaptioned.png")
    text(root / "plain.txt", "sidecar is ignored when metadata exists")
    csv_text = (
        "\ufeffFile_Name,Score,Caption\n"
        '"a, b ""quoted"" é.png",5,"tag one, tag two"\n'
        "plain.png,1,simple\n"
        "10_sub/ü.png,3,\"multi\nline\"\n"
        "\n"
        "missing.png,0,gone\n"
    )
    text(root / "metadata.csv", csv_text)
    before = snapshot(root)
    with caplog.at_level(logging.WARNING, logger="lora_trainer"):
        scan = scan_dataset(str(root))
    assert snapshot(root) == before
    assert scan.caption_source == "metadata.csv"
    by_name = {r.path.relative_to(scan.root).as_posix(): r for r in scan.records}
    assert by_name[odd].caption == "tag one, tag two"
    assert by_name["plain.png"].caption == "simple"
    assert by_name["10_sub/ü.png"].caption == "multi\nline"
    assert by_name["10_sub/ü.png"].repeats == 10
    assert by_name["uncaptioned.png"].caption == ""
    assert scan.missing_captions() == [scan.root / "uncaptioned.png"]
    assert scan.skipped == [(scan.root / "missing.png", "listed in metadata.csv but not found")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("missing.png" in w for w in warnings)
    assert any("1 of 4 images have no caption" in w and "uncaptioned.png" in w for w in warnings)


def test_metadata_csv_plain_header_and_nfd_names(tmp_path):
    root = tmp_path / "data"
    image(root / "café.png")
    nfd = unicodedata.normalize("NFD", "café.png")
    text(root / "metadata.csv", f"filename,prompt\n{nfd},coffee\n./café.png,later wins\n")
    scan = scan_dataset(str(root))
    assert [r.caption for r in scan.records] == ["later wins"]


def test_metadata_csv_without_usable_header(tmp_path):
    root = tmp_path / "data"
    image(root / "a.png")
    text(root / "metadata.csv", "a.png,a caption\n")
    with pytest.raises(DatasetError, match=r"metadata\.csv line 1: the header must name the columns filename,prompt"):
        scan_dataset(str(root))


def test_metadata_jsonl(tmp_path):
    root = tmp_path / "data"
    image(root / "a.png")
    image(root / "5_s" / "b.png")
    text(root / "metadata.jsonl",
         '{"file_name": "a.png", "text": "first"}\n\n{"filename": "5_s/b.png", "prompt": "second", "x": 1}\n')
    scan = scan_dataset(str(root))
    assert scan.caption_source == "metadata.jsonl"
    assert [(r.caption, r.repeats) for r in scan.records] == [("second", 5), ("first", 1)]


def test_metadata_jsonl_bad_line_names_line_number(tmp_path):
    root = tmp_path / "data"
    image(root / "a.png")
    path = text(root / "metadata.jsonl", '{"file_name": "a.png", "text": "ok"}\n\n{"file_name": "b.png", text}\n')
    with pytest.raises(DatasetError) as exc_info:
        scan_dataset(str(root))
    message = str(exc_info.value)
    assert message.startswith(f"{path.resolve()} line 3: not valid JSON")
    assert "\n" not in message


def test_metadata_jsonl_line_not_an_object(tmp_path):
    root = tmp_path / "data"
    image(root / "a.png")
    text(root / "metadata.jsonl", '["a.png", "x"]\n')
    with pytest.raises(DatasetError, match="line 1: expected an object"):
        scan_dataset(str(root))


def test_csv_preferred_over_jsonl(tmp_path):
    root = tmp_path / "data"
    image(root / "a.png")
    text(root / "metadata.csv", "filename,prompt\na.png,from csv\n")
    text(root / "metadata.jsonl", '{"file_name": "a.png", "text": "from jsonl"}\n')
    assert scan_dataset(str(root)).records[0].caption == "from csv"


def test_explicit_metadata_path_is_relative_to_cwd(tmp_path, monkeypatch):
    root = tmp_path / "data"
    image(root / "a.png")
    text(root / "a.txt", "sidecar")
    text(tmp_path / "captions" / "mine.jsonl", '{"file_name": "a.png", "text": "explicit"}\n')
    monkeypatch.chdir(tmp_path)
    scan = scan_dataset("data", metadata_path="captions/mine.jsonl")
    assert scan.records[0].caption == "explicit"
    assert scan.caption_source == "metadata.jsonl"
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset("data", metadata_path="captions/nope.csv")
    text(tmp_path / "captions" / "mine.txt", "x")
    with pytest.raises(DatasetError, match=r"must be a \.csv"):
        scan_dataset("data", metadata_path="captions/mine.txt")


def test_missing_captions_warn(tmp_path, caplog):
    root = tmp_path / "data"
    image(root / "a.png")
    text(root / "a.txt", "x")
    image(root / "b.png")
    image(root / "c.png")
    text(root / "c.txt", "   \n")  # blank counts as missing
    with caplog.at_level(logging.WARNING, logger="lora_trainer"):
        scan = scan_dataset(str(root))
    assert [r.caption for r in scan.records] == ["x", "", ""]
    assert scan.missing_captions() == [scan.root / "b.png", scan.root / "c.png"]
    assert any("2 of 3 images have no caption" in r.getMessage() for r in caplog.records)


def test_no_captions_at_all_is_an_error(tmp_path):
    root = tmp_path / "data"
    image(root / "a.png")
    image(root / "x" / "b.png")
    with pytest.raises(DatasetError) as exc_info:
        scan_dataset(str(root))
    assert str(exc_info.value) == (
        f"no captions found in {root.resolve()}: add metadata.csv (filename,prompt), metadata.jsonl or .txt files, "
        f"or run `python -m lora_trainer caption {root.resolve()}`")


def test_metadata_naming_no_image_is_an_error(tmp_path):
    root = tmp_path / "data"
    image(root / "a.png")
    text(root / "metadata.csv", "filename,prompt\nother.png,x\n")
    with pytest.raises(DatasetError, match="no captions found"):
        scan_dataset(str(root))


def test_unreadable_images_are_skipped_with_one_warning(tmp_path, caplog):
    root = tmp_path / "data"
    image(root / "good.png")
    text(root / "good.txt", "fine")
    (root / "zero.png").write_bytes(b"")
    text(root / "notes.png", "I am text")
    full = (root / "good.png").read_bytes()
    (root / "sub").mkdir()
    (root / "sub" / "head.png").write_bytes(full[:20])
    before = snapshot(root)
    with caplog.at_level(logging.WARNING, logger="lora_trainer"):
        scan = scan_dataset(str(root))
    assert snapshot(root) == before
    assert [r.path.name for r in scan.records] == ["good.png"]
    assert sorted(p.relative_to(scan.root).as_posix() for p, _ in scan.skipped) == \
        ["notes.png", "sub/head.png", "zero.png"]
    reasons = {p.name: why for p, why in scan.skipped}
    assert reasons["zero.png"] == "cannot be read as an image (empty file)"
    assert "not an image" in reasons["notes.png"]
    unreadable = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(unreadable) == 1
    assert all(name in unreadable[0] for name in ("zero.png", "notes.png", "sub/head.png"))


def test_only_unreadable_images_is_an_error(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "zero.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="no readable images"):
        scan_dataset(str(root))


def test_empty_folder(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    text(root / "readme.txt", "no images here")
    with pytest.raises(DatasetError, match="no images found in"):
        scan_dataset(str(root))
    assert sorted(p.name for p in root.iterdir()) == ["readme.txt"]


def test_folder_missing_or_a_file(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(str(tmp_path / "nope"))
    assert not (tmp_path / "nope").exists()  # never created
    file = image(tmp_path / "one.png")
    with pytest.raises(DatasetError, match="is a file"):
        scan_dataset(str(file))
    with pytest.raises(DatasetError, match="not set"):
        scan_dataset("")


def test_record_order_is_sorted_by_relative_path(tmp_path):
    root = tmp_path / "data"
    names = ["z.png", "b/a.png", "a.png", "2_m/x.png", "b.png"]
    for name in names:
        image(root / name)
        text((root / name).with_suffix(".txt"), name)
    scan = scan_dataset(str(root))
    assert [r.caption for r in scan.records] == ["2_m/x.png", "a.png", "b.png", "b/a.png", "z.png"]


def test_an_uncaptioned_image_in_a_repeat_folder_takes_its_class_as_kohya_does(tmp_path):
    root = tmp_path / "data"
    image(root / "10_sks dog" / "a.png")
    image(root / "10_sks dog" / "b.png")
    (root / "10_sks dog" / "b.txt").write_text("sks dog, running")
    image(root / "plain" / "c.png")
    (root / "plain" / "c.txt").write_text("a cat")
    captions = {r.path.name: r.caption for r in scan_dataset(str(root)).records}
    assert captions == {"a.png": "sks dog", "b.png": "sks dog, running", "c.png": "a cat"}
