"""Build the smallest SD1 checkpoint that real Forge (dfdcbab6) accepts, with random seeded weights.

    <forge>/venv/bin/python tests/real_webui/make_forge_checkpoint.py [--forge DIR] [--dtype fp16|fp32] OUT.safetensors

Forge detects the model family with huggingface_guess, which takes a UNet as SD1.5 only with 320 base channels,
768-wide context and non-linear transformer projections; it then builds the UNet from the detected layout, and the
VAE and CLIP-L from its bundled full-size configs (backend/huggingface/runwayml/stable-diffusion-v1-5). So:
  - UNet: reduced (channel_mult [1, 2], one res block and one transformer per level, 8 heads), built with
    Forge's own backend.nn.unet.IntegratedUNet2DConditionModel so the key names are exactly Forge's (compvis);
  - VAE: Forge's IntegratedAutoencoderKL (LDM key layout) from the bundled vae/config.json;
  - CLIP-L: transformers CLIPTextModel from the bundled text_encoder/config.json (keys text_model.*).
Keys are prefixed model.diffusion_model., first_stage_model., cond_stage_model.transformer. (the original
SD1 single-file layout). The script checks with huggingface_guess.guess() that the result is SD15 and that the
layout it guesses is the one built. It must run with the Forge venv's python; the Forge folder, its
packages_3rdparty and repositories/huggingface_guess go on sys.path.
"""
import argparse
import os
import sys
import time

UNET_CONFIG = dict(
    in_channels=4,
    out_channels=4,
    model_channels=320,
    num_res_blocks=[1, 1],
    channel_mult=[1, 2],
    transformer_depth=[1, 1],
    transformer_depth_output=[1, 1, 1, 1],
    transformer_depth_middle=1,
    use_spatial_transformer=True,
    context_dim=768,
    num_heads=8,
    num_head_channels=-1,
    use_linear_in_transformer=False,
    adm_in_channels=None,
)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output .safetensors path")
    ap.add_argument("--forge", default=os.environ.get("FORGE_DIR") or os.getcwd(),
                    help="Forge folder (default: $FORGE_DIR or the current folder)")
    ap.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16",
                    help="stored dtype (fp16: 0.63 GB, fp32: 1.26 GB; on the CPU Forge keeps UNet+VAE in fp32, "
                         "CLIP in fp16, whatever the file holds)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    forge = os.path.abspath(a.forge)
    bundled = os.path.join(forge, "backend", "huggingface", "runwayml", "stable-diffusion-v1-5")
    if not os.path.isdir(bundled):
        sys.exit(f"make_forge_checkpoint: not a Forge folder (no {bundled})")
    # As Forge does (modules/paths.py, modules_forge/initialization.py): backend.utils imports the vendored gguf.
    vendored = os.path.join(forge, "packages_3rdparty")
    for p in (vendored, os.path.join(forge, "repositories", "huggingface_guess"), forge):
        if p not in sys.path:
            sys.path.insert(0, p)
    # backend.args parses sys.argv (parse_known_args) at import: give it a CPU-only command line.
    sys.argv = [sys.argv[0], "--always-cpu"]

    t0 = time.time()
    import huggingface_guess
    import torch
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.nn.vae import IntegratedAutoencoderKL
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(a.seed)
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    sd = {}
    with torch.no_grad():
        unet = IntegratedUNet2DConditionModel(**UNET_CONFIG)
        vae = IntegratedAutoencoderKL.from_config(IntegratedAutoencoderKL.load_config(os.path.join(bundled, "vae")))
        clip = CLIPTextModel(CLIPTextConfig.from_pretrained(os.path.join(bundled, "text_encoder")))
        for prefix, module in (("model.diffusion_model.", unet), ("first_stage_model.", vae),
                               ("cond_stage_model.transformer.", clip)):
            for k, v in module.state_dict().items():
                if k.endswith("position_ids"):
                    continue
                # No weight may stay all-zero: a zero-initialised output layer would make the UNet's output
                # constant, and a LoRA would then change nothing.
                if v.dim() > 1 and v.is_floating_point() and not v.any():
                    v = torch.randn_like(v) * 0.02
                sd[prefix + k] = v.detach().to(dtype).contiguous()
        counts = {"unet": sum(p.numel() for p in unet.parameters()),
                  "vae": sum(p.numel() for p in vae.parameters()),
                  "clip": sum(p.numel() for p in clip.parameters())}
        del unet, vae, clip

    # Same check Forge's loader makes (backend/loader.py:split_state_dict -> huggingface_guess.guess).
    guess = huggingface_guess.guess(sd)
    name = type(guess).__name__ if guess is not None else None
    if name != "SD15":
        sys.exit(f"make_forge_checkpoint: huggingface_guess says {name!r}, not 'SD15'")
    got = {k: guess.unet_config.get(k) for k in ("model_channels", "context_dim", "channel_mult", "num_res_blocks",
                                                  "transformer_depth", "transformer_depth_output",
                                                  "transformer_depth_middle", "use_linear_in_transformer")}
    want = {k: UNET_CONFIG[k] for k in got}
    if {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in got.items()} != want:
        sys.exit(f"make_forge_checkpoint: guessed UNet layout {got} differs from the one built {want}")

    out = os.path.abspath(a.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    # One metadata key only: safetensors writes the metadata map in random order, and Forge keys its hash cache on
    # the file's sha256 (the same seed should give the same file).
    save_file(sd, out, metadata={"format": "pt"})
    print(f"make_forge_checkpoint: {out}: SD15 per huggingface_guess, params {counts}, {len(sd)} tensors, "
          f"{a.dtype}, {os.path.getsize(out) / 1e9:.2f} GB, {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
