"""The caption editor API: odd file names and CSVs, bulk tag edits, saves with backups, nothing else written."""

import hashlib
import os
from pathlib import Path

import pytest
from PIL import Image

from lora_trainer.caption_editing import BACKUP_DIR, load_captions, normalize_caption
from lora_trainer.dataset import scan_dataset
from lora_trainer.errors import DatasetError

ODD_NAMES = ["a, b.png", 'quote "x".png', "space name.png", "café ü 日本.png", "10_brand/o'neil; 1.png"]


def image(path: Path, color=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)
    return path


def snapshot(root: Path) -> dict:
    """{relative path: sha256} of every file under root."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def scanned_captions(root: Path) -> dict:
    scan = scan_dataset(str(root))
    return {r.path.relative_to(scan.root).as_posix(): r.caption for r in scan.records}


@pytest.mark.parametrize("fmt", ["csv", "txt", "both"])
def test_odd_file_names_round_trip(tmp_path, fmt):
    for name in ODD_NAMES:
        image(tmp_path / name)
    captions = load_captions(tmp_path, fmt)
    assert sorted(captions.names()) == sorted(ODD_NAMES)
    wanted = {name: f'tag {i}, "quoted", it\'s, ü' for i, name in enumerate(ODD_NAMES)}
    for name, text in wanted.items():
        captions.set_caption(name, text)
    result = captions.save()
    assert result.backup_dir is None  # nothing existed, nothing replaced
    assert scanned_captions(tmp_path) == wanted  # exactly what training reads
    assert {e.name: e.caption for e in load_captions(tmp_path, fmt).images()} == wanted
    if fmt == "both":  # the .txt files agree with metadata.csv
        (tmp_path / "metadata.csv").unlink()
        assert scanned_captions(tmp_path) == wanted


def test_csv_with_bom_extra_columns_and_missing_rows(tmp_path):
    for name in ("a.png", "b.png", "c.png", "sub/d.png"):
        image(tmp_path / name)
    raw = '\ufefffile_name,score,text\r\n./a.png,5,"red, square"\r\nsub\\d.png,7,blue\r\n\r\nc.png\r\n'
    (tmp_path / "metadata.csv").write_bytes(raw.encode("utf-8"))
    captions = load_captions(tmp_path)
    assert captions.format == "csv"
    assert {e.name: e.caption for e in captions.images()} == {
        "a.png": "red, square", "b.png": "", "c.png": "", "sub/d.png": "blue"}
    captions.set_caption("b.png", "green")
    captions.set_caption("sub/d.png", "navy")
    captions.save()
    data = (tmp_path / "metadata.csv").read_bytes()
    assert data.startswith(b"\xef\xbb\xbf")  # BOM kept (Excel needs it for non-ASCII)
    assert data.decode("utf-8-sig").split("\r\n") == [
        "file_name,score,text", './a.png,5,"red, square"', "sub\\d.png,7,navy", "c.png", "b.png,,green", ""]
    assert scanned_captions(tmp_path) == {"a.png": "red, square", "b.png": "green", "c.png": "", "sub/d.png": "navy"}


@pytest.mark.parametrize("content, line", [
    ('filename,prompt\na.png,ok\nb.png,"bad"quote\n', 3),
    ("filename,prompt\na.png,ok\nb.png,ok\n,orphan caption\n", 4),
    ('filename,prompt\na.png,"never closed\n', 2),
    ("name,caption\na.png,x\n", 1),
])
def test_bad_csv_rejected_with_line_number(tmp_path, content, line):
    image(tmp_path / "a.png")
    image(tmp_path / "b.png")
    (tmp_path / "metadata.csv").write_text(content, encoding="utf-8")
    with pytest.raises(DatasetError) as err:
        load_captions(tmp_path)
    message = str(err.value)
    assert f"metadata.csv line {line}:" in message and "\n" not in message


def test_edit_and_bulk_tag_operations(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        image(tmp_path / name)
    (tmp_path / "a.txt").write_text("cat, red, cute", encoding="utf-8")
    (tmp_path / "b.txt").write_text("dog\nred\n", encoding="utf-8")  # tag per line
    captions = load_captions(tmp_path)
    assert captions.format == "txt"
    assert [e.caption for e in captions.images()] == ["cat, red, cute", "dog, red", ""]

    assert captions.tag_counts() == {"red": 2, "cat": 1, "cute": 1, "dog": 1}
    assert captions.prepend_tag("brandx") == 3
    assert captions.prepend_tag("brandx") == 0  # already first everywhere
    assert captions.replace_tag("red", "crimson, bright") == 2
    assert captions.remove_tag("cute") == 1
    captions.set_caption("c.png", "  bird \n  blue ")
    assert captions.caption("c.png") == "bird, blue"
    assert [e.caption for e in captions.images()] == [
        "brandx, cat, crimson, bright", "brandx, dog, crimson, bright", "bird, blue"]
    assert captions.prepend_tag("first, second", names=["a.png"]) == 1
    assert captions.caption("a.png") == "first, second, brandx, cat, crimson, bright"
    assert sorted(captions.changed()) == ["a.png", "b.png", "c.png"]
    with pytest.raises(DatasetError, match="one tag"):
        captions.remove_tag("a, b")
    with pytest.raises(DatasetError, match="not an image"):
        captions.set_caption("missing.png", "x")

    captions.save()
    assert captions.changed() == []
    assert scanned_captions(tmp_path) == {e.name: e.caption for e in captions.images()}
    assert (tmp_path / "c.txt").read_text(encoding="utf-8") == "bird, blue"


def test_save_backs_up_what_it_replaces(tmp_path):
    image(tmp_path / "a.png")
    image(tmp_path / "b.png")
    (tmp_path / "metadata.csv").write_text("filename,prompt\na.png,old a\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("old txt a", encoding="utf-8")
    captions = load_captions(tmp_path, "both")
    assert captions.save().written == [tmp_path / "a.txt"]  # "both" syncs the .txt to metadata.csv

    captions.set_caption("a.png", "new a")
    captions.set_caption("b.png", "new b")
    first = captions.save()
    assert first.written == sorted([tmp_path / "metadata.csv", tmp_path / "a.txt", tmp_path / "b.txt"])
    backup = first.backup_dir
    assert backup.parent == tmp_path / BACKUP_DIR
    assert (backup / "metadata.csv").read_text(encoding="utf-8") == "filename,prompt\na.png,old a\n"
    assert (backup / "a.txt").read_text(encoding="utf-8") == "old a"
    manifest = (backup / "manifest.txt").read_text(encoding="utf-8").splitlines()
    assert sorted(manifest) == ["created b.txt", "replaced a.txt", "replaced metadata.csv"]

    assert captions.save() == type(first)([], None)  # nothing changed: nothing written, no backup
    captions.remove_tag("new b")
    second = captions.save()
    assert second.backup_dir != backup and (second.backup_dir / "b.txt").read_text(encoding="utf-8") == "new b"
    assert scanned_captions(tmp_path)["a.png"] == "new a"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_only_caption_files_change(tmp_path):
    for name in ("a.png", "b.jpg", "sub/c.png"):
        image(tmp_path / name)
    (tmp_path / "notes.md").write_text("keep me", encoding="utf-8")
    (tmp_path / "a.txt").write_text("old", encoding="utf-8")
    before = snapshot(tmp_path)
    captions = load_captions(tmp_path, "both")
    assert snapshot(tmp_path) == before  # loading writes nothing
    for entry in captions.images():
        captions.set_caption(entry.name, "new caption")
    captions.save()
    after = snapshot(tmp_path)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert changed == {"metadata.csv", "a.txt", "b.txt", "sub/c.txt"} | {
        p for p in after if p.startswith(BACKUP_DIR + "/")}
    assert all(before[p] == after[p] for p in ("a.png", "b.jpg", "sub/c.png", "notes.md"))


def test_refuses_to_overwrite_a_csv_changed_on_disk(tmp_path):
    image(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text("filename,prompt\na.png,one\n", encoding="utf-8")
    captions = load_captions(tmp_path)
    (tmp_path / "metadata.csv").write_text("filename,prompt\na.png,edited elsewhere\n", encoding="utf-8")
    captions.set_caption("a.png", "two")
    with pytest.raises(DatasetError, match="changed on disk"):
        captions.save()
    assert "edited elsewhere" in (tmp_path / "metadata.csv").read_text(encoding="utf-8")


def test_jsonl_and_missing_folder_are_one_line_errors(tmp_path):
    image(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match="metadata.jsonl"):
        load_captions(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        load_captions(tmp_path / "nope")
    with pytest.raises(DatasetError, match="unknown"):
        load_captions(tmp_path, "yaml")


def test_normalize_caption():
    assert normalize_caption("  a  b \n\n c\r\n") == "a b, c"
    assert normalize_caption("") == ""
