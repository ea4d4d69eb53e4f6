"""The Train LoRA tab, shared by the WebUI extension (scripts/lora_trainer_tab.py) and ``python -m lora_trainer ui``.

Only ``compat``, ``widgets``, ``tab``, ``dataset_panel`` and ``app`` import gradio; the rest (``controller``,
``dataset_manager``, ``downloads``, ``fields``, ``dataset_checks``, ``estimate``, ``presets``, ``context``) is
plain Python the tests drive without a browser.
"""
