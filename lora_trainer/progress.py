"""The console progress bar: a subscriber to the trainer's events, like any other front end."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Optional

from .events import EventBus, Failed, Finished, Progress, SampleSaved, Started

logger = logging.getLogger("lora_trainer")


def quiet_library_progress_bars() -> None:
    """diffusers and transformers draw a bar for every model they load; on the console ours is the one that counts."""
    import importlib

    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            importlib.import_module(name).disable_progress_bar()
        except ImportError:  # not installed (inside the WebUI, diffusers may be absent): nothing to quiet
            continue


class ConsoleProgress:
    def __init__(self) -> None:
        self.bus = EventBus()
        self.bus.subscribe(self.on_event)
        self.bar = None
        self.last: Optional[Progress] = None

    @contextlib.contextmanager
    def redirect_logging(self) -> Iterator[None]:
        """Log lines go above the bar instead of breaking it."""
        from tqdm.contrib.logging import logging_redirect_tqdm

        quiet_library_progress_bars()
        with logging_redirect_tqdm(loggers=[logging.root]):
            yield
        self._close()

    def on_event(self, event: object) -> None:
        from tqdm import tqdm

        if isinstance(event, Started):
            self._close()
            self.bar = tqdm(total=event.total_steps, initial=event.start_step, unit="step", dynamic_ncols=True,
                            mininterval=0, desc="training")  # every step, when it ends
        elif isinstance(event, Progress) and self.bar is not None:
            self.last = event
            self.bar.n = event.step
            self.bar.set_postfix(loss=f"{event.avg_loss:.4f}", lr=f"{event.lr:.2e}", epoch=event.epoch,
                                 refresh=False)
            self.bar.refresh()
        elif isinstance(event, SampleSaved):
            logger.info("samples: %s", ", ".join(str(p) for p in event.paths))
        elif isinstance(event, (Finished, Failed)):
            self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
