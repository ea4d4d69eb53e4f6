"""task_type text-generation: LoRA adapters for causal language models (transformers + peft).

transformers and peft are imported only inside this package, and only by the modules that need
them (``model``, ``sequences``, ``loop``, ``runner``, ``tiny``, ``demo``); ``records`` is plain Python.
Nothing outside ``lora_trainer/text/`` imports this package at module level, so the engine keeps
importing inside A1111's pinned environment.

Modules, in the order a run uses them:
  records    read .jsonl / .json / .txt / .csv into text, prompt/completion or chat records
  sequences  tokenize, mask prompt tokens, pack or pad to max_seq_length, batch
  model      check and load the base model folder, pick target modules, attach LoRA, save the adapter
  loop       the training loop (checkpoints, resume, metrics, events)
  runner     run_text_training: what ``python -m lora_trainer train`` calls for text-generation
  tiny       tiny offline models and tokenizers for the demo and tests
  demo       ``python -m lora_trainer demo --task text-generation``
"""
