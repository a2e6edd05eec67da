"""The training iteration of fit(): one batch drawn and augmented by the loader, then one TrainStep;
eagerly, or on CUDA as a CUDA graph captured once per fit and replayed per batch.

A 17-token model's step is bound by the host that launches its kernels (docs/performance.md):
about 130 launches to augment a batch and about 1,000 to step. Replaying one captured graph costs
one launch, plus one copy of the batch's image indices into the graph's input. Everything the
iteration reads per step is on the device: the indices, the loader's generator (registered with
the graph), the schedule's step counter and learning rate, the EMA's update counter and AdamW's
step (capturable); the last partial batch is dropped, so every batch has the same shape.

Why not torch.cuda.make_graphed_callables: it graphs a module's forward and backward only; the
augmentation, clipping, AdamW, the schedule and the EMA would stay eager, most of the launches.
This is the whole-iteration capture of torch's CUDA-graphs documentation (torch.cuda.graph around
forward, backward and optimizer.step()), with the loader's augmentation inside it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from .data.loader import BatchLoader

if TYPE_CHECKING:
    from .train import TrainStep

log = logging.getLogger(__name__)


def graph_plan(mode: str, device: torch.device, compile_mode: str | None) -> tuple[bool, str]:
    """(capture?, what the run records in its output): graphs = "auto" captures on CUDA only."""
    if mode == "off":
        return False, "off"
    if device.type != "cuda":
        return False, f"off (auto: eager on {device.type})"
    if compile_mode == "reduce-overhead":
        return False, "off (torch.compile's reduce-overhead mode graphs the model itself)"
    return True, "on"


class Iteration:
    """Eager: batch b of the epoch drawn from the loader, then one step; returns the step's loss."""

    def __init__(self, step: TrainStep, loader: BatchLoader, status: str = "off") -> None:
        self.step, self.loader, self.status = step, loader, status
        self.order = torch.empty(0, dtype=torch.long)

    def start_epoch(self) -> int:
        """Draw the next epoch's order; the number of batches in it."""
        self.order = self.loader.epoch_order()
        return len(self.loader)

    def __call__(self, b: int) -> torch.Tensor:
        return self._eager(self.loader.indices(self.order, b))

    def _eager(self, indices: torch.Tensor) -> torch.Tensor:
        return self.step(*self.loader.batch(indices))


class GraphedIteration(Iteration):
    """The iteration as a CUDA graph: WARMUP eager iterations on a side stream (as torch's docs
    advise: AdamW's state and the libraries' workspaces are made lazily), then one capture, then a
    replay per batch. The warm-up batches are the epoch's real first batches and capture runs
    nothing, so the run trains on the same batches and steps as the eager one.

    If capture fails, the run goes on eagerly and logs one warning with the reason; `status` says
    which happened. The returned loss is the graph's output: read it before the next call."""

    WARMUP = 3

    def __init__(self, step: TrainStep, loader: BatchLoader) -> None:
        super().__init__(step, loader, status="on")
        step.autocast_cache = False  # autocast's weight cache must not outlive a captured region
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self.side = torch.cuda.Stream(loader.x.device)
        batch = min(loader.batch_size, len(loader.x))
        self.static_indices = torch.zeros(batch, dtype=torch.long, device=loader.x.device)
        self.static_loss = torch.zeros((), device=loader.x.device)

    def __call__(self, b: int) -> torch.Tensor:
        indices = self.loader.indices(self.order, b)
        if self.graph is not None:
            self.static_indices.copy_(indices)
            self.graph.replay()
            return self.static_loss
        if self.failed:
            return self._eager(indices)
        self.calls += 1
        if self.calls <= self.WARMUP:
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                loss = self._eager(indices)
            torch.cuda.current_stream().wait_stream(self.side)
            return loss
        return self._capture(indices)

    def _capture(self, indices: torch.Tensor) -> torch.Tensor:
        """Capture the iteration on static_indices, then replay it for this batch; eager on failure."""
        self.static_indices.copy_(indices)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            graph.register_generator_state(self.loader.generator)
            # thread_local: a worker's other threads (heartbeat, display) stay free to call CUDA.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.static_loss = self._eager(self.static_indices)
        except Exception as exc:  # noqa: BLE001 - any capture failure leaves the run to eager steps
            from .train import out_of_memory  # (train imports this module)

            if out_of_memory(exc):  # eager steps would not fit either: the trial's OOM path says so
                raise
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.failed, self.status = True, f"off (capture failed: {reason})"
            log.warning("CUDA graph capture failed (%s); this run trains eagerly.", reason)
            torch.cuda.synchronize()
            return self._eager(indices)
        self.graph = graph
        graph.replay()
        return self.static_loss


def make_iteration(step: TrainStep, loader: BatchLoader, mode: str, compile_mode: str | None = None) -> Iteration:
    """The iteration that graphs = mode asks for on the loader's device."""
    capture, status = graph_plan(mode, loader.x.device, compile_mode)
    return GraphedIteration(step, loader) if capture else Iteration(step, loader, status)
