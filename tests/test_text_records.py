"""text/records.py: .jsonl/.json/.csv/.txt into text, prompt/completion and chat records, with one-line errors."""

import json

import pytest

from lora_trainer.errors import DatasetError
from lora_trainer.text.records import read_records


def write_jsonl(path, items):
    path.write_text("\n".join(json.dumps(i) for i in items) + "\n", encoding="utf-8")
    return path


def one_line_error(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_jsonl_reads_the_three_kinds_and_counts_empty_records(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"text": "a plain document"},
        {"prompt": "Q: 2+2?\nA:", "completion": " 4"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"text": "   "},
        {"prompt": "Q: nothing?", "completion": ""},
        {"messages": [{"role": "user", "content": "no answer"}]},
    ])
    found = read_records(str(path))
    assert [r.kind for r in found.records] == ["text", "prompt", "chat"]
    assert found.empty == 3
    assert found.kinds == {"text": 1, "prompt": 1, "chat": 1}
    assert found.records[2].messages == (("user", "hi"), ("assistant", "hello"))
    assert found.records[1].source.endswith("mixed.jsonl:2")


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "broken"\n', encoding="utf-8")
    with pytest.raises(DatasetError) as exc:
        read_records(str(path))
    assert "data.jsonl:3: not valid JSON" in one_line_error(exc)


@pytest.mark.parametrize("item, expected", [
    ({"question": "x"}, "no 'text', 'prompt'/'completion' or 'messages' key (found: question)"),
    ({"prompt": "x"}, "has 'prompt' but no 'completion'"),
    ({"text": 3}, "'text' must be text, got int"),
    ({"messages": [{"role": "user"}]}, "message 1 needs a text 'role' and a text 'content'"),
    (["text"], "expected an object"),
])
def test_malformed_records_are_explained(tmp_path, item, expected):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "fine"}, item])
    with pytest.raises(DatasetError) as exc:
        read_records(str(path))
    message = one_line_error(exc)
    assert "data.jsonl:2" in message and expected in message


def test_empty_dataset_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"prompt": "p", "completion": " "}])
    with pytest.raises(DatasetError) as exc:
        read_records(str(path))
    assert "no training text found (2 empty record(s) skipped)" in one_line_error(exc)
    (tmp_path / "blank.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DatasetError):
        read_records(str(tmp_path / "blank.jsonl"))


def test_csv_with_text_or_prompt_completion_columns(tmp_path):
    (tmp_path / "pairs.csv").write_text('Prompt,Completion\n"Q: a, b?",A\n\nQ: c?,C\n', encoding="utf-8")
    pairs = read_records(str(tmp_path / "pairs.csv")).records
    assert [(r.prompt, r.completion) for r in pairs] == [("Q: a, b?", "A"), ("Q: c?", "C")]
    (tmp_path / "docs.csv").write_text("id,text\n1,first\n2,second\n", encoding="utf-8")
    assert [r.text for r in read_records(str(tmp_path / "docs.csv")).records] == ["first", "second"]
    (tmp_path / "bad.csv").write_text("question,answer\nx,y\n", encoding="utf-8")
    with pytest.raises(DatasetError) as exc:
        read_records(str(tmp_path / "bad.csv"))
    assert "bad.csv:1: the header needs a 'text' column" in one_line_error(exc)


def test_txt_file_is_split_on_blank_lines_and_a_folder_has_one_document_per_file(tmp_path):
    (tmp_path / "book.txt").write_text("first para\nline two\n\n \nsecond para\n\n\nthird\n", encoding="utf-8")
    assert [r.text for r in read_records(str(tmp_path / "book.txt")).records] == [
        "first para\nline two", "second para", "third"]
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("doc a\n\nstill a\n", encoding="utf-8")
    (folder / "sub" / "b.txt").write_text("doc b", encoding="utf-8")
    (folder / ".hidden.txt").write_text("skip me", encoding="utf-8")
    (folder / "image.png").write_bytes(b"\x89PNG")
    found = read_records(str(folder))
    assert [r.text for r in found.records] == ["doc a\n\nstill a", "doc b"]
    assert [p.name for p in found.files] == ["a.txt", "b.txt"]


def test_json_list_and_metadata_path(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"prompt": "p1", "completion": "c1"}, {"text": "t"}]), encoding="utf-8")
    found = read_records("ignored-because-metadata-path-wins", metadata_path=str(path))
    assert [r.kind for r in found.records] == ["prompt", "text"]


def test_missing_or_unusable_locations(tmp_path):
    with pytest.raises(DatasetError) as exc:
        read_records(str(tmp_path / "nope.jsonl"))
    assert "does not exist" in one_line_error(exc)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"\x89PNG")
    with pytest.raises(DatasetError) as exc:
        read_records(str(tmp_path / "images"))
    assert "no .jsonl, .json, .csv, .txt files" in one_line_error(exc)
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    with pytest.raises(DatasetError) as exc:
        read_records(str(tmp_path / "data.parquet"))
    assert "unsupported file type '.parquet'" in one_line_error(exc)
