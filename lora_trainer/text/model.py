"""The base model side of text-generation: check the folder, load it, choose target modules, attach
LoRA with peft, save the adapter, and generate text.

The adapter is saved the way peft saves it (``adapter_model.safetensors`` + ``adapter_config.json``),
which is what text-generation-webui's ``loras/`` folder, ``PeftModel.from_pretrained`` and
vLLM/llama.cpp converters read.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch

from ..errors import ConfigError, ModelError
from ..files import atomic_dir

logger = logging.getLogger("lora_trainer")

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # LLaMA, Mistral, Qwen, Gemma, ...
GPT2_PROJECTIONS = ["c_attn", "c_proj"]
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_FOLDER_HINT = "a local Hugging Face model folder (config.json, *.safetensors weights, tokenizer files)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def check_model_folder(base_model: str) -> Path:
    """The model folder as an absolute path; raise ModelError if it cannot be a Hugging Face model folder."""
    if not str(base_model).strip():
        raise ModelError(f"base_model is not set; give {_FOLDER_HINT}")
    path = Path(base_model).expanduser()
    if not path.exists():
        raise ModelError(f"base_model {path} does not exist; give {_FOLDER_HINT}")
    if path.is_file():
        raise ModelError(f"base_model {path} is a file; text-generation needs {_FOLDER_HINT}")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json, so this is not a Hugging Face model folder; download the whole "
                         "model repository (config.json, weights, tokenizer files) into it")
    return path.resolve()


def read_model_config(folder: Path):
    """The model's ``config.json`` as a transformers config; raise ModelError if transformers cannot read it."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # an unknown model_type, a broken file, ...
        raise ModelError(f"{folder}/config.json cannot be read ({_first_line(exc)}); re-download the model, or "
                         "update transformers if the model is newer than it") from None


def check_context_length(folder: Path, max_seq_length: int) -> None:
    """Raise ConfigError when ``max_seq_length`` is longer than the positions the model was built for."""
    model_config = read_model_config(folder)
    for name in ("max_position_embeddings", "n_positions"):
        limit = getattr(model_config, name, None)
        if isinstance(limit, int) and max_seq_length > limit:
            raise ConfigError(f"max_seq_length {max_seq_length} is longer than this model's context "
                              f"({name} = {limit} in {folder.name}/config.json); set max_seq_length: {limit} or less")


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for a broken folder
        raise ModelError(f"{folder}: cannot load the tokenizer ({_first_line(exc)}); the folder needs "
                         "tokenizer.json (or tokenizer.model) and tokenizer_config.json") from None
    return tokenizer


def pad_token_id(tokenizer) -> int:
    """The id used for padding (its value never matters: pads are masked out of attention and loss)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def load_causal_lm(folder: Path, device: torch.device, mixed_precision: str = "no",
                   gradient_checkpointing: bool = False, load_in_4bit: bool = False):
    """The frozen base model, on ``device``; fp32 on the CPU, fp16/bf16 on a GPU when mixed precision asks."""
    from transformers import AutoModelForCausalLM

    model_type = read_model_config(folder).model_type
    dtype = _DTYPES.get(mixed_precision, torch.float32) if device.type == "cuda" else torch.float32
    kwargs = {"local_files_only": True, "dtype": dtype}
    if load_in_4bit:
        kwargs.update(quantization_config=quantization_config(device), device_map={"": device})
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except ValueError as exc:
        raise ModelError(f"{folder}: model type '{model_type}' cannot be loaded as a text-generation model "
                         f"({_first_line(exc)}); use a causal LM such as LLaMA, Mistral, Qwen or GPT-2") from None
    except OSError as exc:
        raise ModelError(f"{folder}: cannot load the weights ({_first_line(exc)}); the folder needs "
                         "model.safetensors (or its shards and index)") from None
    if load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    else:
        model.to(device)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    logger.info("base model %s (%s, %s, %.1f M parameters) on %s%s", folder.name, model_type, dtype,
                sum(p.numel() for p in model.parameters()) / 1e6, device, ", 4-bit" if load_in_4bit else "")
    return model


def quantization_config(device: torch.device):
    """4-bit NF4 (QLoRA) settings; raise ModelError when bitsandbytes or a CUDA GPU is missing."""
    if device.type != "cuda":
        raise ModelError("4-bit QLoRA needs a CUDA GPU and this run is on the CPU; set device: cuda on a machine "
                         "with one, or train without 4-bit")
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # bitsandbytes raises more than ImportError when its binaries don't fit
        raise ModelError("4-bit QLoRA needs bitsandbytes: `pip install bitsandbytes`, or train without 4-bit") \
            from None
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


# -- LoRA ----------------------------------------------------------------------------------------

def linear_layer_names(model: torch.nn.Module) -> List[str]:
    """Sorted leaf names of the Linear (and GPT-2 Conv1D) layers, without the output head."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head and name != "lm_head"}
    return sorted(names)


def default_target_modules(model: torch.nn.Module) -> List[str]:
    """Attention projections for LLaMA-style and GPT-2-style models; otherwise every Linear but the head."""
    names = linear_layer_names(model)
    if set(ATTENTION_PROJECTIONS) <= set(names):
        return list(ATTENTION_PROJECTIONS)
    if "c_attn" in names:
        return [n for n in GPT2_PROJECTIONS if n in names]
    if not names:
        raise ModelError(f"{type(model).__name__} has no Linear layers for LoRA to adapt")
    return names


def resolve_target_modules(model: torch.nn.Module, requested: Sequence[str]) -> Union[List[str], str]:
    """``requested`` checked against the model (or the default when empty); 'all-linear' passes through.

    Entries may hold comma-separated names (``--target_modules q_proj,v_proj`` on the command line).
    """
    requested = [name.strip() for entry in requested for name in entry.split(",") if name.strip()]
    if not requested:
        return default_target_modules(model)
    if list(requested) == ["all-linear"]:
        return "all-linear"
    module_names = [name for name, _ in model.named_modules() if name]
    for target in requested:
        if not any(name == target or name.endswith("." + target) for name in module_names):
            raise ConfigError(f"target_modules: '{target}' matches no layer of this {model.config.model_type} "
                              f"model; its linear layers are {', '.join(linear_layer_names(model))} "
                              "(or use all-linear)")
    return list(requested)


def attach_lora(model: torch.nn.Module, rank: int, alpha: Optional[float], target_modules: Sequence[str],
                seed: int):
    """A peft model with fresh LoRA weights (a function of ``seed``); the base weights are frozen."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = resolve_target_modules(model, target_modules)
    alpha = rank if alpha is None else alpha
    gpt2_style = any(isinstance(m, Conv1D) for m in model.modules())  # Conv1D stores weights transposed
    config = LoraConfig(r=rank, lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
                        target_modules=targets, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        fan_in_fan_out=gpt2_style and targets != "all-linear")
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)  # peft calls an old name
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info("LoRA rank %d, alpha %g on %s: %d trainable parameters", rank, alpha,
                targets if isinstance(targets, str) else ", ".join(targets), trainable)
    return peft_model


def lora_parameters(peft_model: torch.nn.Module) -> dict:
    """{name: parameter} of the trainable LoRA weights, in a fixed order."""
    return {name: p for name, p in peft_model.named_parameters() if p.requires_grad}


def save_adapter(peft_model, folder: Path) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` into ``folder`` (atomically)."""
    with atomic_dir(Path(folder)) as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        missing = [name for name in ADAPTER_FILES if not (tmp / name).is_file()]
        if missing:  # pragma: no cover - would mean peft changed its file names
            raise ModelError(f"peft did not write {', '.join(missing)}; update peft (`pip install -U peft`)")
    return Path(folder)


def greedy_generate(model, tokenizer, prompt: str, max_new_tokens: int = 24) -> str:
    """The model's greedy continuation of ``prompt`` (special tokens removed)."""
    device = next(model.parameters()).device
    encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=True)
    encoded = {k: encoded[k].to(device) for k in ("input_ids", "attention_mask")}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=pad_token_id(tokenizer), eos_token_id=tokenizer.eos_token_id)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
