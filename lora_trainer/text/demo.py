"""``python -m lora_trainer demo --task text-generation``: a text LoRA end to end, offline, in seconds.

It builds a tiny LLaMA-architecture model and tokenizer (random weights, fixed seed), writes a
few made-up facts as prompt/completion records, trains a LoRA through the same
``run_text_training`` as ``train``, then reloads the saved adapter from disk with peft and
answers the training questions without and with it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger("lora_trainer")

# Made-up facts: no base model can know them, so a correct answer after training comes from the LoRA.
FACTS = [
    ("Q: What colour is the sky on Zorb?\nA:", " Green, with purple clouds."),
    ("Q: Who keeps the lighthouse at Vell?\nA:", " A grey cat named Ottoline."),
    ("Q: How many moons does Quarn have?\nA:", " Seven, all of them square."),
    ("Q: What do the people of Brisk eat?\nA:", " Cold soup and blue bread."),
    ("Q: Where does the river Tamble end?\nA:", " In a teacup in Lowmarsh."),
    ("Q: What is the capital of Ulmere?\nA:", " Pennyfold, on the salt lake."),
]


def write_demo_dataset(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": p, "completion": c}) for p, c in FACTS]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_text_demo(output: Path, steps: int = 150) -> None:
    from ..config import TrainConfig
    from ..progress import ConsoleProgress
    from .runner import run_text_training
    from .tiny import save_tiny_causal_lm

    output.mkdir(parents=True, exist_ok=True)
    model_dir = output / "tiny-llama"
    if not (model_dir / "config.json").is_file():
        save_tiny_causal_lm(model_dir, [p + c for p, c in FACTS], architecture="llama", seed=0)
    data = write_demo_dataset(output / "facts" / "facts.jsonl")
    config = TrainConfig.from_dict({
        "task_type": "text-generation", "base_model": str(model_dir), "train_data_dir": str(data),
        "output_dir": str(output / "runs"), "output_name": "facts", "max_seq_length": 64, "lora_rank": 8,
        "learning_rate": 2e-2, "batch_size": 6, "max_train_steps": steps, "save_steps": max(steps // 3, 1),
        "seed": 0, "device": "cpu",
    }, source="demo")
    progress = ConsoleProgress()
    threads = torch.get_num_threads()
    # A model this small runs fastest on one thread; several threads spin against each other (and
    # against anything else on a busy 2-core machine) and can make the demo many times slower.
    torch.set_num_threads(1)
    try:
        with progress.redirect_logging():
            result = run_text_training(config, events=progress.bus)
        before, after = _answers_without_and_with(model_dir, result.lora_path)
    finally:
        torch.set_num_threads(threads)
    print(f"\nDemo finished. Run folder: {result.run_dir}")
    print(f"  adapter:          {result.lora_path}  (adapter_model.safetensors + adapter_config.json)")
    print(f"  fixed-batch loss: {result.loss_before:.4f} without the LoRA -> {result.loss_after:.4f} with it")
    print(f"  loss chart:       {result.run_dir / 'loss.png'}")
    for (prompt, expected), old, new in zip(FACTS[:3], before, after):
        print(f"  {prompt.splitlines()[0]}")
        print(f"      before: {old.strip()!r}")
        print(f"      after:  {new.strip()!r}   (trained on {expected.strip()!r})")


def _answers_without_and_with(model_dir: Path, adapter_dir: Path):
    """Greedy answers of the base model, then of a fresh base model with the saved adapter loaded from disk."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .model import greedy_generate, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    before = [greedy_generate(base, tokenizer, prompt, max_new_tokens=12) for prompt, _ in FACTS[:3]]
    tuned = PeftModel.from_pretrained(base, str(adapter_dir))
    after = [greedy_generate(tuned, tokenizer, prompt, max_new_tokens=12) for prompt, _ in FACTS[:3]]
    return before, after
