"""A probe extension of the real-WebUI suite (tests/real_webui/suite.py): shows over HTTP what the WebUI really did.

GET /lora-trainer-probe/v1/model   the loaded model: a hash of the UNet and text-encoder weights, how many of their
                                   tensors require grad, the Model box of the Train LoRA tab
GET /lora-trainer-probe/v1/family  the loaded model's engine, huggingface_guess class, is_* flags and Model box
GET /lora-trainer-probe/v1/lora    A1111: the LoRA modules its Lora extension matched at the last generation;
       ?file=PATH                  Forge: the keys of PATH its LoRA loader matches against the loaded model
Never installed for users; the suite copies it into extensions/ next to the extension under test.
"""

import hashlib
import sys

from modules import script_callbacks, sd_models, shared


def _parts():
    model = sd_models.model_data.sd_model
    if model is None:
        model = shared.sd_model  # A1111 loads lazily
    objects = getattr(model, "forge_objects", None)
    if objects is not None:
        return model, objects.unet.model.diffusion_model, objects.clip.cond_stage_model
    return model, model.model.diffusion_model, model.cond_stage_model


def _digest(module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def on_app_started(_demo, app):
    @app.get("/lora-trainer-probe/v1/model")
    def model_state():
        model, unet, text = _parts()
        from lora_trainer.webui_host import describe_model

        return {"unet_hash": _digest(unet), "text_hash": _digest(text),
                "unet_requires_grad": sum(p.requires_grad for p in unet.parameters()),
                "text_requires_grad": sum(p.requires_grad for p in text.parameters()),
                "unet_tensors": sum(1 for _ in unet.parameters()),
                "inference_tensors": [n for n, p in [*unet.named_parameters(), *text.named_parameters()]
                                      if p.is_inference()][:5],
                "frozen": [n for n, p in [*unet.named_parameters(), *text.named_parameters()]
                           if not p.requires_grad][:5],
                "model_box": describe_model(sd_models.model_data, shared.opts.data.get("sd_model_checkpoint")),
                "checkpoint": str(getattr(getattr(model, "sd_checkpoint_info", None), "title", ""))}

    @app.get("/lora-trainer-probe/v1/family")
    def family():  # cheap: no hashing (a Flux model holds 16 billion values, shared between its blocks)
        from lora_trainer.webui_host import describe_model

        model = sd_models.model_data.sd_model
        first = next(iter(model.forge_objects.unet.model.parameters())) if getattr(model, "forge_objects", None) \
            else None
        return {"engine": type(model).__name__, "model_config": type(getattr(model, "model_config", None)).__name__,
                "flags": {f: getattr(model, f, None) for f in ("is_sd1", "is_sd2", "is_sdxl", "is_sd3", "is_flux")},
                "model_box": describe_model(sd_models.model_data, shared.opts.data.get("sd_model_checkpoint")),
                "first_unet_tensor_is_inference": None if first is None else first.is_inference()}

    @app.get("/lora-trainer-probe/v1/lora")
    def lora_matches(file: str = ""):
        networks = sys.modules.get("networks")
        if file:  # Forge: its own key maps and matcher, as load_lora_for_models uses them
            from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet
            from backend.utils import load_torch_file

            model, _, _ = _parts()
            tensors = load_torch_file(file, safe_load=True)
            modules = {k.split(".", 1)[0] for k in tensors}
            unet, rest = load_lora(tensors, model_lora_keys_unet(model.forge_objects.unet.model, {}))
            clip, rest = load_lora(rest, model_lora_keys_clip(model.forge_objects.clip.cond_stage_model, {}))
            return {"modules_in_file": len(modules), "matched": len(unet) + len(clip), "unmatched": sorted(rest)[:5]}
        loaded = getattr(networks, "loaded_networks", [])
        return {"loaded": [{"name": n.name, "matched": len(n.modules)} for n in loaded]}


script_callbacks.on_app_started(on_app_started)
