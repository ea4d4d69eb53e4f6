"""text/sequences.py: which tokens are trained (label masks), packing, padding, dropping too-long records."""

import pytest

from lora_trainer.errors import DatasetError
from lora_trainer.text.records import RecordSet, TextRecord
from lora_trainer.text.sequences import (
    IGNORE,
    collate,
    encode_chat,
    encode_prompt_completion,
    pack_documents,
    tokenize_records,
)

pytest.importorskip("transformers")

CORPUS = ["Q: What is the capital of Ulmere?\nA: Pennyfold, on the salt lake.",
          "You are terse. Say hello. Hello! And goodbye? Bye.", "a plain document about salt lakes"]


@pytest.fixture(scope="module")
def tokenizer():
    from lora_trainer.text.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer(CORPUS)


def trained_segments(tokenizer, ids, labels):
    """Decoded runs of consecutive trained tokens."""
    segments, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE:
            if current:
                segments.append(current)
            current = []
        else:
            assert label == token  # a trained position predicts exactly its own token
            current.append(token)
    if current:
        segments.append(current)
    return [tokenizer.decode(s) for s in segments]


def chat(*turns):
    return TextRecord(source="test:1", messages=tuple(turns))


def test_prompt_tokens_are_masked_out_of_prompt_completion_labels(tokenizer):
    prompt, completion = "Q: What is the capital of Ulmere?\nA:", " Pennyfold, on the salt lake."
    ids, labels = encode_prompt_completion(tokenizer, prompt, completion)
    prompt_ids = tokenizer(prompt)["input_ids"]
    assert ids[:len(prompt_ids)] == prompt_ids and ids[0] == tokenizer.bos_token_id
    assert labels[:len(prompt_ids)] == [IGNORE] * len(prompt_ids)
    assert labels[len(prompt_ids):] == ids[len(prompt_ids):]
    assert ids[-1] == tokenizer.eos_token_id  # the model learns to stop after the answer
    assert trained_segments(tokenizer, ids, labels) == [completion + "</s>"]


def test_chat_trains_only_the_assistant_turns_of_the_template(tokenizer):
    record = chat(("system", "You are terse."), ("user", "Say hello."), ("assistant", "Hello!"),
                  ("user", "And goodbye?"), ("assistant", "Bye."))
    ids, labels = encode_chat(tokenizer, record)
    assert tokenizer.decode(ids) == ("<s><|system|>\nYou are terse.</s>\n<|user|>\nSay hello.</s>\n<|assistant|>\n"
                                     "Hello!</s>\n<|user|>\nAnd goodbye?</s>\n<|assistant|>\nBye.</s>\n")
    # Each answer with its end-of-turn token is trained; system, user and the assistant headers are not.
    assert trained_segments(tokenizer, ids, labels) == ["Hello!</s>\n", "Bye.</s>\n"]
    assistant_header = tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert all(label == IGNORE for token, label in zip(ids, labels) if token == assistant_header)


def test_chat_template_that_rewrites_earlier_turns_falls_back_to_finding_the_answers(tokenizer):
    # This template closes only the last turn with <|system|>, so a rendered prefix is not a prefix of the whole.
    template = tokenizer.chat_template
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% else %}<|system|>{% endif %}")
    try:
        ids, labels = encode_chat(tokenizer, chat(("user", "Say hello."), ("assistant", "Hello!"),
                                                  ("user", "And goodbye?"), ("assistant", "Bye.")))
    finally:
        tokenizer.chat_template = template
    # The first answer is found by its text (plus EOS); the last one still ends where the whole render ends.
    assert trained_segments(tokenizer, ids, labels) == ["Hello!</s>", "Bye.</s><|system|>"]


def test_chat_without_a_template_uses_role_lines_and_still_masks(tokenizer):
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        ids, labels = encode_chat(tokenizer, chat(("user", "Say hello."), ("assistant", "Hello!")))
        data = tokenize_records(RecordSet([chat(("user", "Say hello."), ("assistant", "Hello!"))], []),
                                tokenizer, 64)
    finally:
        tokenizer.chat_template = template
    assert tokenizer.decode(ids) == "<s>user: Say hello.\nassistant: Hello!</s>\n"
    # Byte-level BPE glues the space after "assistant:" to the answer's first token, which is trained.
    assert trained_segments(tokenizer, ids, labels) == [" Hello!</s>"]
    assert data.used_fallback_chat_format and any("no chat template" in line for line in data.summary())


def test_plain_text_is_packed_into_full_sequences_and_every_token_trained(tokenizer):
    documents = [[1, 10, 11, 12, 2], [1, 20, 21, 2], [1, 30, 2]]
    packed = pack_documents(documents, 5)
    assert [s.input_ids for s in packed] == [(1, 10, 11, 12, 2), (1, 20, 21, 2, 1), (30, 2)]
    assert all(s.labels == s.input_ids for s in packed)
    records = RecordSet([TextRecord("t:1", text=CORPUS[2] * 5), TextRecord("t:2", text=CORPUS[1])], [])
    data = tokenize_records(records, tokenizer, 16)
    assert all(len(s.input_ids) == 16 for s in data.sequences[:-1]) and data.too_long == 0
    assert sum(len(s.input_ids) for s in data.sequences) == sum(
        len(tokenizer(r.text)["input_ids"]) + 1 for r in records.records)  # +1: EOS after each document


def test_too_long_supervised_records_are_dropped_and_reported(tokenizer):
    short = TextRecord("d:1", prompt="Q:", completion=" A.")
    long = TextRecord("d:2", prompt=CORPUS[0] * 4, completion=" Pennyfold.")
    data = tokenize_records(RecordSet([short, long, long], [], empty=1), tokenizer, 24)
    assert len(data.sequences) == 1 and data.too_long == 2 and data.longest > 24 and data.empty == 1
    summary = " ".join(data.summary())
    assert "dropped 2 prompt/completion or chat record(s) longer than max_seq_length=24" in summary
    assert "skipped 1 empty record(s)" in summary


def test_all_records_too_long_is_a_one_line_error(tmp_path, tokenizer):
    long = TextRecord("d:1", prompt=CORPUS[0] * 4, completion=" Pennyfold.")
    with pytest.raises(DatasetError) as exc:
        tokenize_records(RecordSet([long, long], [tmp_path / "data.jsonl"]), tokenizer, 16)
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'data.jsonl'}: all 2 record(s) are longer than max_seq_length=16")
    assert "raise max_seq_length" in message


def test_collate_pads_right_and_masks_pads(tokenizer):
    data = tokenize_records(RecordSet([TextRecord("d:1", prompt="Q:", completion=" A."),
                                       TextRecord("d:2", prompt=CORPUS[0], completion=" Pennyfold.")], []),
                            tokenizer, 64)
    short, long = sorted(data.sequences, key=lambda s: len(s.input_ids))
    batch = collate([short, long], pad_id=tokenizer.pad_token_id)
    width = len(long.input_ids)
    assert batch["input_ids"].shape == (2, width)
    pads = width - len(short.input_ids)
    assert batch["attention_mask"][0].tolist() == [1] * len(short.input_ids) + [0] * pads
    assert batch["labels"][0].tolist()[-pads:] == [IGNORE] * pads
    assert batch["input_ids"][0].tolist()[-pads:] == [tokenizer.pad_token_id] * pads
    assert batch["labels"][1].tolist() == list(long.labels)
