"""LoRA files for the tiny SD1 model, written directly (random weights are enough for blending maths)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import torch

from lora_trainer.lora_file import save_lora_file
from lora_trainer.network import LoraNetwork


def random_lora_tensors(targets: Dict[str, torch.nn.Module], seed: int, rank: int, alpha: float,
                        conv_rank: Optional[int] = None, scale: float = 0.2) -> Dict[str, torch.Tensor]:
    """kohya tensors for ``targets`` with random downs AND ups (a fresh LoRA's ups are zero)."""
    network = LoraNetwork(targets, rank, alpha, conv_rank=conv_rank, conv_alpha=alpha, seed=seed)
    tensors = network.kohya_state_dict()
    generator = torch.Generator().manual_seed(seed + 1000)
    for key in tensors:
        if key.endswith(".lora_up.weight"):
            tensors[key] = torch.randn(tensors[key].shape, generator=generator) * scale
    return tensors


def sd1_metadata(name: str, **extra: str) -> Dict[str, str]:
    meta = {"ss_base_model_version": "sd_v1", "ss_v2": "False", "ss_output_name": name,
            "modelspec.architecture": "stable-diffusion-v1/lora", "ss_network_module": "networks.lora"}
    meta.update(extra)
    return meta


def write_random_lora(path: Path, targets, seed: int, rank: int = 4, alpha: float = 2.0,
                      metadata: Optional[Dict[str, str]] = None, conv_rank: Optional[int] = None) -> Path:
    tensors = random_lora_tensors(targets, seed, rank, alpha, conv_rank)
    return save_lora_file(Path(path), tensors, metadata if metadata is not None else sd1_metadata(Path(path).stem))


def tag_frequency(**tags: int) -> str:
    return json.dumps({"10_shapes": tags})


def load_trained_state(network: LoraNetwork, run_dir: Path) -> LoraNetwork:
    """Copy the exact fp32 parameters of a run's last checkpoint (not the saved file) into ``network``."""
    from lora_trainer.checkpoints import list_checkpoints, load_checkpoint_state

    state = load_checkpoint_state(list_checkpoints(run_dir)[-1][1])
    with torch.no_grad():
        params = dict(network.named_parameters())
        assert params.keys() == state["network"].keys()
        for name, value in state["network"].items():
            params[name].copy_(value)
    return network


def network_as_trained(targets: Dict[str, torch.nn.Module], rank: int, run_dir: Path) -> LoraNetwork:
    """A LoRA network over ``targets`` holding the run's parameters as trained."""
    return load_trained_state(LoraNetwork(targets, rank), run_dir)
