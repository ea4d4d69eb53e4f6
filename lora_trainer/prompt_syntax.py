"""A1111's text formats: ``<lora:name:te:unet>`` tags in prompts, and the infotext written into PNGs.

Both follow AUTOMATIC1111 1.10 (``modules/extra_networks.py``, ``extensions-builtin/Lora/extra_networks_lora.py``,
``modules/infotext_utils.py``), so a prompt and a PNG move between this tool and the WebUI unchanged:

* ``<lora:name>`` = weight 1; ``<lora:name:w>`` = text encoder and UNet at w; ``<lora:name:te:unet>`` splits them;
  ``te=``/``unet=``/``dyn=`` may be named. The tag is removed from the text the model sees.
* infotext: the prompt (tags kept, so pasting it back re-applies the LoRAs), ``Negative prompt: ...``, then one line
  of ``Key: value`` pairs; values holding ``,`` ``:`` or a newline are JSON-quoted.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import ConfigError

logger = logging.getLogger("lora_trainer")

EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # A1111's re_extra_net
LORA_TYPES = ("lora", "lyco")  # A1111 registers "lyco" as an alias of "lora"
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's re_param_code
_SIZE = re.compile(r"^(\d+)x(\d+)$")


@dataclass(frozen=True)
class LoraTag:
    name: str
    te_weight: float = 1.0
    unet_weight: float = 1.0
    dyn: Optional[int] = None
    text: str = ""  # the tag as written


def parse_prompt(prompt: str) -> Tuple[str, List[LoraTag]]:
    """(prompt without extra-network tags, the LoRA tags in order); a malformed weight is one ConfigError."""
    tags: List[LoraTag] = []

    def take(match: re.Match) -> str:
        kind, args = match.group(1), match.group(2)
        if kind.lower() not in LORA_TYPES:
            logger.warning("prompt: <%s:...> is not supported here (only <lora:...>); it was removed", kind)
            return ""
        tags.append(_lora_tag(args.split(":"), match.group(0)))
        return ""

    text = EXTRA_NETWORK.sub(take, prompt)
    return tidy_prompt(text), tags


def _lora_tag(items: Sequence[str], text: str) -> LoraTag:
    positional = [i for i in items if "=" not in i]
    named = dict(i.split("=", 1) for i in items if "=" in i)
    name = positional[0].strip() if positional else ""
    if not name:
        raise ConfigError(f"prompt: {text} has no LoRA name; write <lora:name:weight>")

    def number(value: str, what: str) -> float:
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"prompt: {text}: {what} {value!r} is not a number; "
                              f"write e.g. <lora:{name}:0.7>") from None

    te = number(positional[1], "weight") if len(positional) > 1 else 1.0
    te = number(named["te"], "te weight") if "te" in named else te
    unet = number(positional[2], "unet weight") if len(positional) > 2 else te
    unet = number(named["unet"], "unet weight") if "unet" in named else unet
    dyn_text = named.get("dyn", positional[3] if len(positional) > 3 else None)
    dyn = int(number(dyn_text, "dyn")) if dyn_text not in (None, "") else None
    return LoraTag(name, te, unet, dyn, text)


def tidy_prompt(text: str) -> str:
    """Collapse the empty ``, ,`` pieces and blank space that removed tags leave behind."""
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\s*,(\s*,)+", ",", text)
    text = re.sub(r"\s+,", ",", text)
    return text.strip().strip(",").strip()


# ---- infotext ------------------------------------------------------------------------------------------------
def quote(value: str) -> str:
    """A1111's ``infotext_utils.quote``: JSON-quote a value that holds a comma, colon or newline."""
    if "," not in value and "\n" not in value and ":" not in value:
        return value
    return json.dumps(value, ensure_ascii=False)


def unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def format_infotext(prompt: str, negative_prompt: str, params: Dict[str, object]) -> str:
    """``prompt\\nNegative prompt: ...\\nSteps: 20, Sampler: DDIM, ...`` (empty values are left out)."""
    pairs = ", ".join(f"{k}: {quote(_plain(v))}" for k, v in params.items() if v not in (None, ""))
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(pairs)
    return "\n".join(lines)


def _plain(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def lora_hashes_value(entries: Sequence[Tuple[str, str]]) -> str:
    """``name: hash, name: hash`` with ``:`` and ``,`` removed from names, as A1111 writes ``Lora hashes``."""
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {short}" for name, short in entries)


def parse_infotext(text: str) -> Dict[str, object]:
    """Parse infotext back: prompt, negative_prompt, steps, sampler, cfg_scale, seed, size, model, loras, params.

    ``params`` keeps every ``Key: value`` pair as text (A1111's ``parse_generation_parameters`` does the same);
    ``loras`` lists each ``<lora:...>`` tag of the prompt with its weights and, when present, its hash.
    """
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    params = {k.strip(): unquote(v.strip()) for k, v in _PARAM.findall(last)}
    result: Dict[str, object] = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative),
                                 "params": params}
    for key, name, kind in (("Steps", "steps", int), ("Seed", "seed", int), ("CFG scale", "cfg_scale", float),
                            ("Sampler", "sampler", str), ("Model", "model", str), ("Model hash", "model_hash", str)):
        if key in params:
            try:
                result[name] = kind(params[key])
            except ValueError:
                result[name] = params[key]
    size = _SIZE.match(str(params.get("Size", "")))
    if size:
        result["size"] = (int(size.group(1)), int(size.group(2)))
    hashes = _parse_hashes(str(params.get("Lora hashes", "")))
    try:
        _, tags = parse_prompt(str(result["prompt"]))
    except ConfigError:
        tags = []
    result["loras"] = [{"name": t.name, "te_weight": t.te_weight, "unet_weight": t.unet_weight,
                        "hash": hashes.get(t.name.replace(":", "").replace(",", ""))} for t in tags]
    return result


def _parse_hashes(value: str) -> Dict[str, str]:
    out = {}
    for part in value.split(","):
        name, sep, short = part.rpartition(":")
        if sep and name.strip():
            out[name.strip()] = short.strip()
    return out
