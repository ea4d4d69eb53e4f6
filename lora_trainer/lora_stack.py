"""Several LoRA files on one model: find them by name, check them, attach them with their own weights.

Each file becomes one ``LoraNetwork`` (lycoris modules attached by forward replacement). Attaching a second
network to a layer wraps the first one's forward, so the layer computes ``W x + sum_i w_i * delta_i x``: the
blend A1111 computes by merging ``sum_i w_i * delta_i`` into the weight. Networks must come off in reverse
order, which ``attached_stack`` guarantees.

No diffusers here: the WebUI path may use it.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .errors import ModelError
from .lora_file import read_metadata
from .lora_formats import (
    describe_layout,
    family_from_keys,
    family_from_metadata,
    family_from_sidecar,
    family_label,
    kohya_view,
    load_tensors,
    lora_pairs,
    part_of,
    read_header,
    with_kohya_names,
)
from .network import LoraNetwork, lycoris_view, make_module, point_at

logger = logging.getLogger("lora_trainer")

LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt")
APPLICABLE_TYPES = ("lora", "locon", "loha", "lokr", "dora")


# ---- finding files by name ---------------------------------------------------------------------------------------
@dataclass
class LoraLibrary:
    """The LoRA files under a folder (recursive), by file stem and by ``ss_output_name`` alias, as A1111 lists them."""
    root: Path
    by_stem: Dict[str, List[Path]] = field(default_factory=dict)
    by_alias: Dict[str, List[Path]] = field(default_factory=dict)

    @classmethod
    def scan(cls, root: Path) -> LoraLibrary:
        root = Path(root)
        if not root.is_dir():
            raise ModelError(f"{root}: LoRA folder not found; pass --lora-dir with the folder holding your LoRAs")
        library = cls(root)
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in LORA_EXTENSIONS and p.is_file()):
            library.by_stem.setdefault(path.stem, []).append(path)
            alias = _alias_of(path)
            if alias and alias != path.stem:
                library.by_alias.setdefault(alias, []).append(path)
        return library

    def resolve(self, name: str) -> Path:
        """The file a prompt's ``<lora:name>`` means: a file stem first, then an alias; else one ModelError."""
        found = self.by_stem.get(name) or self.by_alias.get(name)
        if not found:
            known = sorted(set(self.by_stem) | set(self.by_alias))
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else (
                f"known: {', '.join(known[:8])}" if known else "the folder holds no .safetensors files")
            raise ModelError(f"<lora:{name}>: no LoRA named '{name}' in {self.root} (by file name or "
                             f"ss_output_name); {hint}")
        if len(found) > 1:
            logger.warning("<lora:%s>: %d files carry this name; using %s", name, len(found), found[0])
        return found[0]


def _alias_of(path: Path) -> str:
    if path.suffix.lower() != ".safetensors":
        return ""
    try:
        return str(read_metadata(path).get("ss_output_name", "")).strip()
    except (OSError, ValueError):
        return ""  # a broken file is reported when it is used, not while listing


# ---- one file, checked ---------------------------------------------------------------------------------------------
@dataclass
class LoraFile:
    path: Path
    tensors: Dict[str, torch.Tensor]
    metadata: Dict[str, str]
    family: Optional[str]  # what the file says (name.json, metadata) or its keys tell; None if unknown
    family_source: str = "unknown"  # "name.json" | "metadata" | "keys" | "unknown"

    @classmethod
    def read(cls, path: Path) -> LoraFile:
        path = Path(path)
        shapes, metadata = read_header(path)
        layout = describe_layout(shapes)
        if layout.network_type not in APPLICABLE_TYPES:
            if layout.network_type == "unknown":
                raise ModelError(f"{path}: holds no LoRA weights; is it a base model or an embedding? "
                                 "Give a LoRA file")
            raise ModelError(f"{path}: a {layout.network_type.upper()} file; LoRA, LoCon, LoHa, LoKr and DoRA "
                             "files can be applied here (the WebUI applies others; `inspect` describes it)")
        tensors = with_kohya_names(path, load_tensors(path), metadata)
        return cls(path, tensors, metadata, *file_family(path, metadata, shapes))

    def check_family(self, family: str) -> None:
        if self.family and self.family != family:
            raise ModelError(f"{self.path}: a LoRA for {family_label(self.family)} (from its {self.family_source}), "
                             f"the base model is {family_label(family)}; choose a LoRA trained for this model family")


def file_family(path: Path, metadata: Dict[str, str], shapes: Dict[str, Tuple[int, ...]]) -> Tuple[Optional[str], str]:
    """(family, where from): name.json's "sd version" (A1111 lets it override), the metadata, or the keys."""
    sidecar = Path(path).with_suffix(".json")
    family = None
    if sidecar.is_file():
        try:
            family = family_from_sidecar(json.loads(sidecar.read_text(encoding="utf-8")).get("sd version", ""))
        except (OSError, ValueError, AttributeError):
            family = None
    for source, found in (("name.json", family), ("metadata", family_from_metadata(metadata)),
                          ("keys", family_from_keys(shapes))):
        if found:
            return found, source
    return None, "unknown"


# ---- a network whose layers and ranks come from a file -------------------------------------------------------------
class FileLoraNetwork(LoraNetwork):
    """A LoraNetwork over exactly the layers of a LoRA file, each at the file's own rank: plain LoRA/LoCon under
    any key style (kohya, diffusers, peft), and LoHa, LoKr and DoRA as kohya / LyCORIS write them."""

    def __init__(self, targets: Dict[str, nn.Module], tensors: Dict[str, torch.Tensor], source: str):
        nn.Module.__init__(self)
        kohya = _file_layers(tensors, source)
        layers = {_target_name(name, targets): weights for name, weights in kohya.items()}
        matched = [name for name in layers if name in targets]
        if not matched:
            first = next(iter(layers), "(none)")
            raise ModelError(f"{source}: none of its {len(layers)} layers is in this model (first: {first}); it was "
                             "made for another model family or naming; choose a LoRA for this base model")
        skipped = len(layers) - len(matched)
        if skipped:
            logger.warning("%s: %d of its %d layers are not in this model and are skipped (as the WebUI does)",
                           source, skipped, len(layers))
        self.modules_by_name = nn.ModuleDict()
        with torch.random.fork_rng(devices=[]), torch.no_grad():  # modules draw initial weights; keep the RNG
            for name in matched:
                module = _module_for_file_layer(name, targets[name], layers[name], source)
                point_at(module, targets[name])
                self.modules_by_name[name] = module
        self.attached = False
        self.load_kohya_state_dict({f"{name}.{key}": value for name in matched
                                    for key, value in layers[name].items()}, source)

    def set_part_multipliers(self, te: float, unet: float) -> None:
        """A1111's ``<lora:name:te:unet>``: text-encoder layers at ``te``, UNet layers at ``unet``."""
        for name, module in self.modules_by_name.items():
            module.multiplier = te if part_of(name) == "te" else unet


def _file_layers(tensors: Dict[str, torch.Tensor], source: str) -> Dict[str, Dict[str, torch.Tensor]]:
    """kohya module name -> its file weights by kohya suffix (``lora_down.weight``, ``hada_w1_a``, ``alpha``...).

    Plain LoRA goes through ``lora_pairs`` (any key style, damaged pairs reported); LyCORIS layers are read as
    kohya keys. A missing alpha means scale 1, as A1111 reads it.
    """
    kohya = kohya_view(tensors)
    layout = describe_layout({k: tuple(v.shape) for k, v in kohya.items()})
    if layout.network_type in ("lora", "locon"):
        return {name: {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(alpha)}
                for name, (down, up, alpha) in lora_pairs(tensors, source).items()}
    layers: Dict[str, Dict[str, torch.Tensor]] = {name: {} for name in layout.modules}
    for key, value in kohya.items():
        name, _, suffix = key.partition(".")
        if name in layers:
            layers[name][suffix] = value.float()
    for weights in layers.values():
        if "alpha" not in weights:
            weights["alpha"] = torch.tensor(float(_file_rank(weights)))
    return layers


def _file_rank(weights: Dict[str, torch.Tensor]) -> int:
    for key, dim in (("lora_down.weight", 0), ("hada_w1_b", 0), ("lokr_w1_b", 0), ("lokr_w2_b", 0)):
        if key in weights:
            return int(weights[key].shape[dim])
    return 1  # a LoKr layer with no decomposed factor: A1111 uses scale 1


def _module_for_file_layer(name: str, layer: nn.Module, weights: Dict[str, torch.Tensor], source: str) -> nn.Module:
    """The lycoris module that holds one file layer, in bypass mode (DoRA: A1111's merge, as in training)."""
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    get, alpha = weights.get, float(weights["alpha"])
    try:
        if "hada_w1_a" in weights:
            module = LohaModule.make_module_from_state_dict(
                name, lycoris_view(layer), get("hada_w1_a"), get("hada_w1_b"), get("hada_w2_a"), get("hada_w2_b"),
                get("hada_t1"), get("hada_t2"), alpha, None)
        elif "lokr_w1" in weights or "lokr_w1_a" in weights:
            module = LokrModule.make_module_from_state_dict(
                name, lycoris_view(layer), get("lokr_w1"), get("lokr_w1_a"), get("lokr_w1_b"), get("lokr_w2"),
                get("lokr_w2_a"), get("lokr_w2_b"), None, get("lokr_t2"), alpha, None)
        elif "dora_scale" in weights:
            return make_module("dora", name, layer, _file_rank(weights), alpha, -1)
        else:
            return make_module("lora", name, layer, _file_rank(weights), alpha, -1)
    except (TypeError, AttributeError, RuntimeError, ValueError) as exc:  # a factor missing or of the wrong shape
        raise ModelError(f"{source}: layer {name} does not fit this model or misses a weight "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); the file is damaged or made "
                         "for another model") from None
    module.bypass_mode = True  # y = W x + delta(x); the base weight is never read or changed
    return module


def _target_name(name: str, targets: Dict[str, nn.Module]) -> str:
    """A1111 also reads SD1 text-encoder layers written as ``lora_te1_``; map them onto ``lora_te_``."""
    if name not in targets and name.startswith("lora_te1_"):
        alternative = "lora_te_" + name[len("lora_te1_"):]
        if alternative in targets:
            return alternative
    return name


@dataclass
class StackEntry:
    network: LoraNetwork
    te_weight: float
    unet_weight: float


@contextlib.contextmanager
def attached_stack(entries: Sequence[StackEntry]) -> Iterator[List[StackEntry]]:
    """Attach every network with its weights; detach them in reverse order on exit (also on error)."""
    with contextlib.ExitStack() as stack:
        for entry in entries:
            stack.enter_context(entry.network.attached_to_model())
            if isinstance(entry.network, FileLoraNetwork):
                entry.network.set_part_multipliers(entry.te_weight, entry.unet_weight)
            else:
                entry.network.set_multiplier(entry.unet_weight)
        yield list(entries)


def load_stack(targets: Dict[str, nn.Module], files: Sequence[Tuple[LoraFile, float, float]],
               device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> List[StackEntry]:
    """One FileLoraNetwork per (file, te weight, unet weight), on the model's device."""
    entries = []
    for lora, te, unet in files:
        network = FileLoraNetwork(targets, lora.tensors, str(lora.path))
        entries.append(StackEntry(network.to(device or "cpu", dtype), te, unet))
    return entries
