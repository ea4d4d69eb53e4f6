"""Tiny causal language models and tokenizers, built offline from code, for the demo and the tests.

The tokenizer is a byte-level BPE trained in milliseconds on the given texts (so any text
encodes); the model is a randomly initialised LLaMA- or GPT-2-architecture network with a
hidden size of 64 and 2 layers. Both are saved as an ordinary Hugging Face model folder, the
same kind of folder a user points ``base_model`` at.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

# A Zephyr-style template: every turn ends with the EOS token, so a trained model learns to stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Larger than the usual 0.02: with a hidden size of 64 and a frozen output head, 0.02 caps the logits
# near +-1, so no LoRA could make the model confident; 0.1 leaves room to learn in a few seconds.
INIT_RANGE = 0.1
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]


def build_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 400, add_bos: bool = True,
                         chat_template: bool = True):
    """A ``PreTrainedTokenizerFast``: byte-level BPE trained on ``texts``, with <s>, </s> and <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    if add_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>")
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_causal_lm(folder: Path, texts: Iterable[str], architecture: str = "llama", seed: int = 0,
                        chat_template: bool = True) -> Path:
    """Write a tiny random model and its tokenizer to ``folder`` (a Hugging Face model folder)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    folder = Path(folder)
    tokenizer = build_tiny_tokenizer(texts, add_bos=architecture == "llama", chat_template=chat_template)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if architecture == "llama":
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             initializer_range=INIT_RANGE, tie_word_embeddings=False, **ids)
    elif architecture == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=512,
                            initializer_range=INIT_RANGE, **ids)
    else:
        raise ValueError(f"unknown tiny architecture {architecture!r}; use llama or gpt2")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
