"""A small DDIM sampler over the backbone protocol, for backbones that bring no pipeline of their own.

The standalone backbone renders with diffusers; inside the WebUI the host renders with the
WebUI's own pipeline. This is the fallback (and what tests of WebUI stand-ins use): deterministic
DDIM (eta 0) with classifier-free guidance, in plain torch.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch


def _cat(a, b):
    if isinstance(a, dict):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return torch.cat([a, b])


@torch.no_grad()
def ddim_sample(backbone, prompts: Sequence[str], negative_prompt: str, seed: int, steps: int,
                guidance_scale: float, size: Tuple[int, int]) -> List[PIL.Image.Image]:  # noqa: F821
    from PIL import Image

    width, height = size
    batch = len(prompts)
    sizes = [size] * batch
    cond = backbone.encode_prompts(list(prompts), sizes)
    uncond = backbone.encode_prompts([negative_prompt] * batch, sizes)
    ac = backbone.alphas_cumprod.double()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, 4, height // 8, width // 8, generator=generator, dtype=torch.float64)
    timesteps = torch.linspace(len(ac) - 1, 0, steps).round().long().tolist()
    for i, t in enumerate(timesteps):
        t_batch = torch.full((2 * batch,), t, dtype=torch.long, device=backbone.device)
        out = backbone.predict(torch.cat([x, x]).to(backbone.device, backbone.dtype), t_batch,
                               _cat(cond, uncond)).double().cpu()
        out_c, out_u = out.chunk(2)
        out = out_u + guidance_scale * (out_c - out_u)
        a_t = ac[t]
        if backbone.prediction_type == "v_prediction":
            eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x
        else:
            eps = out
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        a_prev = ac[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0, dtype=torch.float64)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    pixels = backbone.decode_latents(x.to(backbone.device, backbone.dtype)).float().cpu()
    pixels = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p) for p in pixels]
