"""What the tab needs from whoever hosts it: the WebUI glue builds one, the standalone app another."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..dataset_store import UploadLimits
from ..host import Host


@dataclass
class TabContext:
    host_factory: Callable[[], Host]  # called at every Start: the WebUI's objects may change between runs
    output_dir: Path  # where run folders go
    webui: bool = False  # True: "Use in txt2img"; False: the Try panel
    model_info: Optional[Callable[[], str]] = None  # WebUI: "v1-5-pruned.safetensors (SD1)"; None: a path textbox
    defaults: dict = field(default_factory=dict)  # TrainConfig values that replace the schema defaults (settings)
    caption_model: str = "ViT-L-14"
    caption_pretrained: str = "openai"
    preferred_weight: float = 0.7
    datasets_dir: Optional[Path] = None  # named datasets made in the tab (one folder each); None: none
    upload_limits: UploadLimits = field(default_factory=UploadLimits)

    @property
    def base_model_label(self) -> str:
        """What ``base_model`` says in the WebUI (the backbone is the loaded model, not a path)."""
        return self.model_info() if self.model_info else ""
