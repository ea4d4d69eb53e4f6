"""Data-parallel training on torch.distributed: the one place that knows about more than one process.

``torchrun --nproc_per_node N -m lora_trainer train ...`` or ``accelerate launch --multi_gpu ...`` start N
copies of the command line; each finds its rank in the environment the launcher sets (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT) and joins one process group (NCCL on GPUs, gloo on CPUs). The loop then:
- takes its share of every global micro-batch (``batch_size`` per process, in the order one process would use);
- sums the gradients of all processes, each scaled by its share of the batch, so the step equals one process's
  step on the whole batch (``reduce_gradients``);
- builds the latent and text caches once, each process a part, and shares them (``gather``);
- writes files only in the main process (rank 0).
The WebUI and the standalone app always run as ``SINGLE``.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

import torch

from .errors import TrainingError

logger = logging.getLogger("lora_trainer")


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def share(self, count: int) -> slice:
        """This process's items of a global batch of ``count``: contiguous, the first ones one larger."""
        base, extra = divmod(count, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def mine(self, items: List) -> List:
        """Every ``world``-th item from this rank's own: how cache work is split (round robin)."""
        return items[self.rank::self.world]

    def reduce_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Sum the gradients of all processes into every process (one flat all-reduce)."""
        if not self.parallel:
            return
        params = [p for p in parameters if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        # One more number per parameter: how many processes gave it a gradient. A parameter none of them used keeps
        # grad None, as in one process (AdamW then leaves it alone, weight decay included).
        present = torch.tensor([float(p.grad is not None) for p in params], dtype=grads[0].dtype,
                               device=grads[0].device)
        flat = torch.cat([g.reshape(-1) for g in grads] + [present])
        _collective(torch.distributed.all_reduce, flat)
        offset = 0
        for i, (p, g) in enumerate(zip(params, grads)):
            used = flat[len(flat) - len(params) + i] > 0
            p.grad = flat[offset:offset + g.numel()].view_as(g).clone() if used else None
            offset += g.numel()

    def sum(self, value: float, device: torch.device) -> float:
        if not self.parallel:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        _collective(torch.distributed.all_reduce, tensor)
        return float(tensor.item())

    def gather(self, part: Dict) -> Dict:
        """Every process's ``part`` merged (CPU tensors travel pickled); ``part`` itself when alone."""
        if not self.parallel:
            return part
        parts: List[Optional[Dict]] = [None] * self.world
        _collective(torch.distributed.all_gather_object, parts, part)
        merged: Dict = {}
        for piece in parts:
            merged.update(piece or {})
        return merged

    def broadcast(self, value):
        """The main process's ``value`` in every process."""
        if not self.parallel:
            return value
        box = [value]
        _collective(torch.distributed.broadcast_object_list, box, src=0)
        return box[0]

    def device(self) -> Optional[str]:
        """The device this process trains on: its own GPU under a launcher, else the config's choice."""
        if self.parallel and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return None


SINGLE = Processes()


class PeerStopped(TrainingError):
    """Another process of a data-parallel run stopped (killed, or failed); this one cannot go on alone."""


def _collective(function, *args, **kwargs):
    try:
        return function(*args, **kwargs)
    except RuntimeError as exc:  # gloo/NCCL: a peer died or its connection closed
        raise PeerStopped("another training process stopped (its launcher says why), so this run ended "
                          f"({str(exc).splitlines()[0][:100]})") from None


def join_from_environment() -> Processes:
    """The process group a launcher (torchrun, accelerate launch) asked for; ``SINGLE`` without one."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return SINGLE
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend)
    # The launcher stops the others with SIGTERM when one process fails: end with the run's one line.
    signal.signal(signal.SIGTERM, _stopped_by_launcher)
    processes = Processes(rank=rank, world=world, local_rank=local_rank)
    if processes.is_main:
        logger.info("data-parallel: %d processes (%s)", world, backend)
    return processes


def _stopped_by_launcher(signum, frame) -> None:
    raise PeerStopped("the launcher stopped this process because another one failed, so this run ended")


def leave(processes: Processes) -> None:
    if processes.parallel and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
