"""Build a FLUX.1-dev-layout single-file checkpoint that real Forge (dfdcbab6) loads as its Flux engine, small
enough for a CPU-only machine, with random seeded weights.

    <forge>/venv/bin/python tests/real_webui/make_forge_flux_checkpoint.py [--forge DIR] OUT.ckpt

Forge recognises Flux with huggingface_guess (key ``double_blocks.0.img_attn.norm.key_norm.scale``) and then builds
the transformer from hard-coded full sizes (hidden 3072, 19 double + 38 single blocks, context 4096, vec 768,
guidance_in present -> FLUX.1-dev), and T5-XXL (24 blocks), CLIP-L and the 16-channel VAE from its bundled configs
(backend/huggingface/black-forest-labs/FLUX.1-dev). That is about 17 G parameters, so the blocks SHARE storage:
  - every double block's tensors are double block 0's, every single block's are single block 0's, every T5 block's
    are block 0's (except block 0's own relative_attention_bias, which only block 0 has);
  - the file is a torch.save pickle (.ckpt), which writes a shared storage once (safetensors refuses shared
    tensors); Forge reads it with torch.load, which gives back shared storages;
  - each component is stored in the dtype Forge stores it in (asked from Forge's own memory_management under
    ``--always-cpu``: UNet fp32, T5/CLIP fp16, VAE fp32). ForgeOperations.Linear does
    ``Parameter(state_dict[k].to(self.dummy))``: with equal dtypes ``.to`` is a no-op and the sharing survives in
    memory; with another dtype every block would get its own copy (the UNet alone would need ~48 GB).
Modules are built with Forge's own classes (IntegratedFluxTransformer2DModel with one block of each kind,
IntegratedT5 with one block, Forge's IntegratedAutoencoderKL, transformers' CLIPTextModel) so key names are Forge's;
the full-size key set and shapes are checked against Forge's classes built on the meta device (no memory).
Key prefixes are the single-file Flux ones huggingface_guess's Flux class expects: model.diffusion_model.,
text_encoders.clip_l.transformer., text_encoders.t5xxl.transformer., vae. The script checks that
huggingface_guess.guess() says Flux (guidance_embed True) and that clip_target finds clip_l and t5xxl.
Run it with the Forge venv's python: ~20 s, ~4.9 GB RAM at peak, writes 3.41 GB.
"""
import argparse
import hashlib
import os
import sys
import time

FLUX_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "text_encoders.clip_l.transformer."
T5_PREFIX = "text_encoders.t5xxl."  # + IntegratedT5's own keys (transformer.encoder...., transformer.shared.weight)
VAE_PREFIX = "vae."


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output .ckpt path")
    ap.add_argument("--forge", default=os.environ.get("FORGE_DIR") or os.getcwd(),
                    help="Forge folder (default: $FORGE_DIR or the current folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--forge-args", default="--always-cpu",
                    help="the Forge command-line flags whose storage dtypes the file should match "
                         "(default: --always-cpu)")
    a = ap.parse_args(argv)
    if not a.out.lower().endswith(".ckpt"):
        sys.exit("make_forge_flux_checkpoint: OUT must end in .ckpt (safetensors cannot store shared tensors)")

    forge = os.path.abspath(a.forge)
    bundled = os.path.join(forge, "backend", "huggingface", "black-forest-labs", "FLUX.1-dev")
    if not os.path.isdir(bundled):
        sys.exit(f"make_forge_flux_checkpoint: not a Forge folder (no {bundled})")
    for p in (os.path.join(forge, "packages_3rdparty"), os.path.join(forge, "repositories", "huggingface_guess"),
              forge):
        if p not in sys.path:
            sys.path.insert(0, p)
    # backend.args parses sys.argv (parse_known_args) at import.
    sys.argv = [sys.argv[0]] + a.forge_args.split()

    t0 = time.time()
    import huggingface_guess
    import torch
    from backend import memory_management
    from backend.nn.flux import IntegratedFluxTransformer2DModel
    from backend.nn.t5 import IntegratedT5
    from backend.nn.vae import IntegratedAutoencoderKL
    from backend.utils import read_arbitrary_config
    from huggingface_guess import model_list
    from huggingface_guess.detection import detect_unet_config
    from transformers import CLIPTextConfig, CLIPTextModel

    # The full-size config exactly as Forge gets it (detection.py only looks at key names for Flux).
    probe = {FLUX_PREFIX + "double_blocks.0.img_attn.norm.key_norm.scale": torch.empty(0),
             FLUX_PREFIX + "guidance_in.in_layer.weight": torch.empty(0)}
    full_cfg = detect_unet_config(probe, FLUX_PREFIX)
    full_cfg.pop("image_model")
    depth, depth_single = full_cfg["depth"], full_cfg["depth_single_blocks"]
    t5_cfg = read_arbitrary_config(os.path.join(bundled, "text_encoder_2"))
    t5_layers = t5_cfg["num_layers"]

    # Storage dtypes Forge will use (backend/loader.py: load_huggingface_component).
    unet_dtype = memory_management.unet_dtype(model_params=12_000_000_000,
                                              supported_dtypes=model_list.Flux.supported_inference_dtypes)
    te_dtype = memory_management.text_encoder_dtype()
    vae_dtype = memory_management.vae_dtype()
    dtypes = {"unet": unet_dtype, "t5": te_dtype, "clip": te_dtype, "vae": vae_dtype}

    def fix(v, dtype):
        # No weight may stay all-zero, no uninitialised memory (T5LayerNorm uses torch.empty: set to ones below).
        if v.dim() > 1 and v.is_floating_point() and not v.any():
            v = torch.randn_like(v) * 0.02
        return v.detach().to(dtype).contiguous()

    torch.manual_seed(a.seed)
    sd = {}
    counts = {}
    with torch.no_grad():
        # Transformer: one double and one single block, replicated by reference.
        flux = IntegratedFluxTransformer2DModel(**dict(full_cfg, depth=1, depth_single_blocks=1))
        small = {k: fix(v, unet_dtype) for k, v in flux.state_dict().items()}
        counts["unet_unique"] = sum(p.numel() for p in flux.parameters())
        del flux
        for k, v in small.items():
            for kind, n in (("double_blocks.0.", depth), ("single_blocks.0.", depth_single)):
                if k.startswith(kind):
                    for i in range(n):
                        sd[FLUX_PREFIX + kind.replace("0", str(i)) + k[len(kind):]] = v
                    break
            else:
                sd[FLUX_PREFIX + k] = v
        del small

        # T5-XXL: one block (block 0 carries the relative attention bias), replicated by reference.
        t5 = IntegratedT5(dict(t5_cfg, num_layers=1))
        for m in t5.modules():
            if type(m).__name__ == "T5LayerNorm":
                m.weight.fill_(1.0)
        counts["t5_unique"] = sum(p.numel() for p in t5.parameters())
        for k, v in t5.state_dict().items():
            if k == "logit_scale":
                continue
            v = fix(v, te_dtype)
            blk = "transformer.encoder.block.0."
            if k.startswith(blk):
                for i in range(t5_layers):
                    if i > 0 and "relative_attention_bias" in k:
                        continue
                    sd[T5_PREFIX + blk.replace("0", str(i)) + k[len(blk):]] = v
            else:
                sd[T5_PREFIX + k] = v
        del t5

        clip = CLIPTextModel(CLIPTextConfig.from_pretrained(os.path.join(bundled, "text_encoder")))
        counts["clip"] = sum(p.numel() for p in clip.parameters())
        for k, v in clip.state_dict().items():
            if not k.endswith("position_ids"):
                sd[CLIP_PREFIX + k] = fix(v, te_dtype)
        del clip

        vae = IntegratedAutoencoderKL.from_config(IntegratedAutoencoderKL.load_config(os.path.join(bundled, "vae")))
        counts["vae"] = sum(p.numel() for p in vae.parameters())
        for k, v in vae.state_dict().items():
            sd[VAE_PREFIX + k] = fix(v, vae_dtype)
        del vae

        # Full-size key sets and shapes, from Forge's classes on the meta device.
        with torch.device("meta"):
            full_unet = IntegratedFluxTransformer2DModel(**full_cfg)
            want_unet = {k: tuple(v.shape) for k, v in full_unet.state_dict().items()}
            want_t5 = {k: tuple(v.shape) for k, v in IntegratedT5(t5_cfg).state_dict().items() if k != "logit_scale"}
    for prefix, want in ((FLUX_PREFIX, want_unet), (T5_PREFIX, want_t5)):
        got = {k[len(prefix):]: tuple(v.shape) for k, v in sd.items() if k.startswith(prefix)}
        if got != want:
            missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
            bad = sorted(k for k in set(want) & set(got) if want[k] != got[k])
            sys.exit(f"make_forge_flux_checkpoint: {prefix} keys differ from Forge's full-size model: "
                     f"missing {missing[:5]}, extra {extra[:5]}, shape {bad[:5]}")
    counts["unet_full"] = sum(torch.Size(s).numel() for s in want_unet.values())
    counts["t5_full"] = sum(torch.Size(s).numel() for s in want_t5.values())

    # Same checks Forge's loader makes (backend/loader.py: split_state_dict -> huggingface_guess.guess, clip_target).
    guess = huggingface_guess.guess(sd)
    name = type(guess).__name__ if guess is not None else None
    if name != "Flux" or guess.unet_config.get("guidance_embed") is not True \
            or guess.huggingface_repo != "black-forest-labs/FLUX.1-dev":
        sys.exit(f"make_forge_flux_checkpoint: huggingface_guess says {name!r}, not 'Flux' (FLUX.1-dev)")
    if guess.unet_key_prefix != [FLUX_PREFIX] or guess.vae_key_prefix != [VAE_PREFIX]:
        sys.exit(f"make_forge_flux_checkpoint: unexpected prefixes {guess.unet_key_prefix} {guess.vae_key_prefix}")
    targets = guess.clip_target(sd)
    if targets != {"clip_l": "text_encoder", "t5xxl": "text_encoder_2"}:
        sys.exit(f"make_forge_flux_checkpoint: clip_target found {targets}")

    storages = {}
    for v in sd.values():
        storages[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
    unique_bytes = sum(storages.values())

    out = os.path.abspath(a.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".part"
    # Through a file object: torch.save names the zip's top folder after the file name otherwise, so the same
    # build would hash differently under another name (Forge keys its hash cache on the sha256).
    with open(tmp, "wb") as f:
        torch.save(sd, f)
    os.replace(tmp, out)
    h = hashlib.sha256()
    with open(out, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    dt = {k: str(v).replace("torch.", "") for k, v in dtypes.items()}
    print(f"make_forge_flux_checkpoint: {out}: Flux (FLUX.1-dev) per huggingface_guess, {len(sd)} tensors in "
          f"{len(storages)} storages ({unique_bytes / 1e9:.2f} GB unique), params {counts}, dtypes {dt}, "
          f"{os.path.getsize(out) / 1e9:.2f} GB, sha256 {h.hexdigest()[:10]}, {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
