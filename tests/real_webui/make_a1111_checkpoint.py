"""Build a tiny SD1 checkpoint that a real AUTOMATIC1111 1.10.1 loads, with the WebUI's own ldm code.

    cd WEBUI && venv/bin/python make_a1111_checkpoint.py OUT.safetensors [--webui WEBUI] [--hf-home DIR] [--seed N]

Run it with the WebUI's venv python. It writes:
  * ``--hf-home``/hub/models--openai--clip-vit-large-patch14/: a fake Hugging Face cache entry (refs/main + one
    snapshot) with a tiny CLIPConfig (text width 32, 2 layers, vocab 49408) and the real CLIP tokenizer files,
    built from open_clip's bundled BPE table. A1111 reads this config and tokenizer at every model load.
  * OUT.safetensors: the whole state_dict of ldm's LatentDiffusion built from the WebUI's
    configs/v1-inference.yaml, shrunk (UNet model_channels 32, num_heads 2, context_dim 32; VAE ch 32). Kept:
    channel_mult, num_res_blocks 2 and attention_resolutions, so A1111's LoRA name mapping holds.
    ldm zero-initialises the UNet's output conv and every proj_out: every all-zero parameter is refilled with
    seeded random values, or the UNet's output would not depend on its input and a LoRA would change nothing.
  * OUT.yaml: the shrunk config, beside the checkpoint under the same stem (A1111 picks it up).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CLIP_NAME = "openai/clip-vit-large-patch14"
CONTEXT_DIM = 32
TEXT_CONFIG = dict(hidden_size=CONTEXT_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=CONTEXT_DIM,
                   pad_token_id=1, bos_token_id=0, eos_token_id=2)
VISION_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                     patch_size=16, hidden_act="quick_gelu", projection_dim=CONTEXT_DIM)


def write_hf_cache(hf_home: Path) -> Path:
    """The snapshot folder of openai/clip-vit-large-patch14 in ``hf_home``'s hub cache (written if incomplete)."""
    from transformers import CLIPConfig

    sys.path.insert(0, str(REPO_ROOT))
    from lora_trainer.backbones.tokenizer_files import TOKENIZER_FILES, write_clip_tokenizer

    repo = hf_home / "hub" / ("models--" + CLIP_NAME.replace("/", "--"))
    revision = hashlib.sha1(b"lora_trainer tests: tiny " + CLIP_NAME.encode()).hexdigest()
    snapshot = repo / "snapshots" / revision
    if not all((snapshot / name).is_file() for name in ("config.json",) + TOKENIZER_FILES):
        snapshot.mkdir(parents=True, exist_ok=True)
        CLIPConfig(text_config=TEXT_CONFIG, vision_config=VISION_CONFIG,
                   projection_dim=CONTEXT_DIM).save_pretrained(snapshot)
        write_clip_tokenizer(snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def shrunk_config(webui: Path):
    from omegaconf import OmegaConf

    config = OmegaConf.load(webui / "configs" / "v1-inference.yaml")
    unet = config.model.params.unet_config.params
    unet.model_channels = 32
    unet.num_heads = 2
    unet.context_dim = CONTEXT_DIM
    config.model.params.first_stage_config.params.ddconfig.ch = 32
    return config


def refill_zeros(model, seed: int) -> int:
    """Give every all-zero parameter seeded random values (about the scale of a default init)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.numel() and not param.any():
                fan_in = param[0].numel() if param.dim() > 1 else param.numel()
                scale = 1.0 / math.sqrt(fan_in) if param.dim() > 1 else 0.02
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
                count += 1
    return count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="OUT.safetensors (OUT.yaml is written beside it)")
    parser.add_argument("--webui", type=Path, default=Path(os.environ.get("A1111_DIR") or Path.cwd()),
                        help="the A1111 folder (default: $A1111_DIR or the current folder)")
    parser.add_argument("--hf-home", type=Path, default=None, help="HF_HOME to fill (default: $HF_HOME)")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)

    webui = args.webui.resolve()
    ldm_root = webui / "repositories" / "stable-diffusion-stability-ai"
    if not (ldm_root / "ldm" / "models" / "diffusion" / "ddpm.py").is_file():
        parser.error(f"{ldm_root}: no ldm code there; pass --webui <A1111 folder>")
    hf_home = args.hf_home or (Path(os.environ["HF_HOME"]) if os.environ.get("HF_HOME") else None)
    if hf_home is None:
        parser.error("give --hf-home or set HF_HOME")
    os.environ["HF_HOME"] = str(hf_home.resolve())  # before transformers is imported: it reads it once
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"

    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    snapshot = write_hf_cache(hf_home.resolve())
    print(f"HF cache: {snapshot}")

    import transformers

    # ldm's FrozenCLIPEmbedder calls CLIPTextModel.from_pretrained(CLIP_NAME): the cache has a config, no
    # weights, so build from the config (random weights) as A1111 itself does at load time.
    def from_config(cls, name, *a, **kw):
        return cls(transformers.CLIPTextConfig.from_pretrained(name))

    transformers.CLIPTextModel.from_pretrained = classmethod(from_config)

    sys.path.insert(0, str(ldm_root))
    from ldm.util import instantiate_from_config

    config = shrunk_config(webui)
    torch.manual_seed(args.seed)
    model = instantiate_from_config(config.model).eval()
    refilled = refill_zeros(model, args.seed + 1)
    state = {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
             for k, v in model.state_dict().items()}

    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out)
    OmegaConf.save(config, out.with_suffix(".yaml"))
    params = sum(v.numel() for v in state.values())
    print(f"wrote {out} ({len(state)} tensors, {params / 1e6:.2f} M values, {refilled} all-zero parameters refilled)"
          f" and {out.with_suffix('.yaml')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
