"""Records to token sequences: what the model reads (``input_ids``) and what it is scored on (``labels``).

- plain text: every token is trained. Documents (each followed by EOS) are concatenated and cut
  into sequences of ``max_seq_length`` tokens (packing), so nothing is truncated or dropped; a long
  document simply continues in the next sequence.
- prompt/completion: only the completion (and the EOS after it) is trained; prompt tokens get
  label ``IGNORE``. Prompt and completion are tokenized separately, so the boundary is exact.
- chat: only the assistant turns (with the template's end-of-turn tokens) are trained. The
  conversation is rendered with the tokenizer's chat template (a plain "role: text" layout when
  it has none) and assistant spans are found by rendering each prefix of the conversation.

Prompt/completion and chat records longer than ``max_seq_length`` are dropped, not truncated (a
cut answer teaches the model to stop mid-sentence); they are counted and reported. Batches are
padded to their longest sequence (at most ``max_seq_length``), pads masked out of attention and loss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import torch

from ..errors import DatasetError, ModelError
from .records import RecordSet, TextRecord

logger = logging.getLogger("lora_trainer")

IGNORE = -100  # label of a token the loss skips (PyTorch's cross_entropy default ignore_index)


@dataclass(frozen=True)
class TokenSequence:
    input_ids: Tuple[int, ...]
    labels: Tuple[int, ...]  # same length; IGNORE where the token is not trained


@dataclass
class TokenizedData:
    sequences: List[TokenSequence]
    max_seq_length: int
    counts: Dict[str, int] = field(default_factory=dict)  # records per kind that made it in
    empty: int = 0  # records skipped as empty (in the files, or with nothing to train after tokenizing)
    too_long: int = 0  # prompt/completion and chat records dropped for being longer than max_seq_length
    longest: int = 0  # tokens of the longest dropped record
    used_fallback_chat_format: bool = False

    def summary(self) -> List[str]:
        """Log lines describing what was read, packed, padded and dropped."""
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items()))
        trained = sum(sum(1 for t in s.labels if t != IGNORE) for s in self.sequences)
        lines = [f"text data: {kinds} record(s) -> {len(self.sequences)} sequence(s) of at most "
                 f"{self.max_seq_length} tokens, {trained} trained tokens"]
        if self.counts.get("text"):
            lines.append("plain text is packed: documents are joined with EOS and cut every "
                         f"{self.max_seq_length} tokens (long documents continue, nothing is truncated)")
        if self.empty:
            lines.append(f"skipped {self.empty} empty record(s) (no text, no completion or no assistant answer)")
        if self.too_long:
            lines.append(f"dropped {self.too_long} prompt/completion or chat record(s) longer than max_seq_length="
                         f"{self.max_seq_length} tokens (longest {self.longest}); raise max_seq_length to keep them")
        if self.used_fallback_chat_format:
            lines.append("the tokenizer has no chat template: conversations are written as 'role: text' lines")
        return lines


def tokenize_records(records: RecordSet, tokenizer, max_seq_length: int) -> TokenizedData:
    """Encode every record; raise DatasetError when nothing is left to train on."""
    data = TokenizedData([], max_seq_length, empty=records.empty)
    documents: List[List[int]] = []
    for record in records.records:
        if record.kind == "text":
            documents.append(encode_text(tokenizer, record.text))
            data.counts["text"] = data.counts.get("text", 0) + 1
            continue
        if record.kind == "prompt":
            ids, labels = encode_prompt_completion(tokenizer, record.prompt, record.completion)
        else:
            ids, labels = encode_chat(tokenizer, record)
            data.used_fallback_chat_format |= not getattr(tokenizer, "chat_template", None)
        if all(t == IGNORE for t in labels):
            data.empty += 1
        elif len(ids) > max_seq_length:
            data.too_long += 1
            data.longest = max(data.longest, len(ids))
        else:
            data.sequences.append(TokenSequence(tuple(ids), tuple(labels)))
            data.counts[record.kind] = data.counts.get(record.kind, 0) + 1
    data.sequences += pack_documents(documents, max_seq_length)
    if not data.sequences:
        raise DatasetError(_nothing_left_message(data, records))
    return data


def _nothing_left_message(data: TokenizedData, records: RecordSet) -> str:
    where = records.files[0] if len(records.files) == 1 else f"{len(records.files)} data files"
    if data.too_long:
        return (f"{where}: all {data.too_long} record(s) are longer than max_seq_length={data.max_seq_length} "
                f"tokens (longest {data.longest}); raise max_seq_length or shorten them")
    return f"{where}: no record has any token to train on; check that completions and assistant turns are not empty"


# -- the three formats ---------------------------------------------------------------------------

def encode_text(tokenizer, text: str) -> List[int]:
    """Token ids of one document (with the tokenizer's BOS, if it adds one) followed by EOS."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def encode_prompt_completion(tokenizer, prompt: str, completion: str) -> Tuple[List[int], List[int]]:
    """(ids, labels): the prompt (with BOS) masked out, the completion and EOS trained."""
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"]) if prompt else \
        _bos(tokenizer)
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        completion_ids.append(tokenizer.eos_token_id)
    return prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids


def encode_chat(tokenizer, record: TextRecord) -> Tuple[List[int], List[int]]:
    """(ids, labels) of a conversation: tokens overlapping an assistant span are trained, all others masked."""
    text, spans = render_chat(tokenizer, record)
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise ModelError("chat data needs a fast tokenizer (a tokenizer.json in the model folder) to find the "
                         "assistant tokens; use prompt/completion records instead") from None
    ids = list(encoded["input_ids"])
    labels = [token if any(start < end_span and end > start_span and end > start for start_span, end_span in spans)
              else IGNORE
              for token, (start, end) in zip(ids, encoded["offset_mapping"])]
    return ids, labels


def render_chat(tokenizer, record: TextRecord) -> Tuple[str, List[Tuple[int, int]]]:
    """The conversation as text, and the (start, end) character spans of its assistant turns."""
    messages = [{"role": role, "content": content} for role, content in record.messages]
    if not getattr(tokenizer, "chat_template", None):
        return _render_plain(tokenizer, messages)
    full = _apply_template(tokenizer, messages, False, record)
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _apply_template(tokenizer, messages[:i], True, record) if i else ""
        through = _apply_template(tokenizer, messages[:i + 1], False, record)
        if full.startswith(through) and through.startswith(before) and len(before) >= cursor:
            start, end = len(before), len(through)
        else:  # a template that rewrites earlier turns: fall back to finding the answer's text
            start = full.find(message["content"], cursor)
            if start < 0:
                raise DatasetError(f"{record.source}: cannot find assistant message {i + 1} in the text the chat "
                                   "template renders; use prompt/completion records for this model")
            end = start + len(message["content"])
            eos = tokenizer.eos_token or ""
            if eos and full.startswith(eos, end):
                end += len(eos)
        spans.append((start, end))
        cursor = end
    return full, spans


def _apply_template(tokenizer, messages: List[dict], generation_prompt: bool, record: TextRecord) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja raises its own errors (e.g. "roles must alternate user/assistant")
        raise DatasetError(f"{record.source}: the model's chat template rejects this conversation "
                           f"({type(exc).__name__}: {exc}); fix the messages' roles or order") from None


def _render_plain(tokenizer, messages: List[dict]) -> Tuple[str, List[Tuple[int, int]]]:
    text, spans = tokenizer.bos_token or "", []
    for message in messages:
        text += f"{message['role']}: "
        if message["role"] == "assistant":
            start = len(text)
            text += message["content"] + (tokenizer.eos_token or "")
            spans.append((start, len(text)))
        else:
            text += message["content"]
        text += "\n"
    return text, spans


def _bos(tokenizer) -> List[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def pack_documents(documents: Sequence[Sequence[int]], max_seq_length: int) -> List[TokenSequence]:
    """Concatenate documents and cut the stream every ``max_seq_length`` tokens (a last piece of < 2 is dropped)."""
    stream = [token for document in documents for token in document]
    out = []
    for start in range(0, len(stream), max_seq_length):
        piece = tuple(stream[start:start + max_seq_length])
        if len(piece) >= 2:  # a single token has nothing to predict
            out.append(TokenSequence(piece, piece))
    return out


# -- batches -------------------------------------------------------------------------------------

def collate(sequences: Sequence[TokenSequence], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: input_ids, attention_mask (0 on pads) and labels (IGNORE on pads)."""
    width = max(len(s.input_ids) for s in sequences)
    ids, mask, labels = [], [], []
    for s in sequences:
        pad = width - len(s.input_ids)
        ids.append(list(s.input_ids) + [pad_id] * pad)
        mask.append([1] * len(s.input_ids) + [0] * pad)
        labels.append(list(s.labels) + [IGNORE] * pad)
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long)}


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from tokens <= t, over the labels that are not IGNORE."""
    shifted = logits[:, :-1, :].float()
    targets = labels[:, 1:].to(logits.device)
    return torch.nn.functional.cross_entropy(shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1),
                                             ignore_index=IGNORE)
