"""fit(): one training run of one configuration on one dataset (docs/research.md, "The training recipe").

AdamW, linear warm-up then cosine decay per step, EMA weights (used for evaluation), gradient
clipping, label smoothing; augmentation happens on the device in data.BatchLoader. The loop does
no per-image Python work and no host synchronisation per batch: the loss is summed on the device
and checked once per epoch.
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .config import ModelConfig, RuntimeFailure, TrainConfig
from .data.loader import BatchLoader, Splits
from .devices import resolve_precision
from .iteration import Iteration, make_iteration
from .metrics import local_tpe, theory_size
from .model import NKATViT, count_params

# on_epoch(epoch, validation accuracy, local TPE so far); it may raise to stop training.
EpochCallback = Callable[[int, float, float], None]


class NonFiniteLossError(RuntimeFailure):
    """The training loss became NaN or infinite; the run cannot go on."""


class OutOfMemory(RuntimeFailure):
    """The model or the data did not fit in the memory of the device (or of the host)."""


def out_of_memory(exc: BaseException) -> bool:
    """Whether exc is an allocation failure: MemoryError, torch's OutOfMemoryError, or the CPU
    allocator's RuntimeError ("DefaultCPUAllocator: not enough memory")."""
    text = str(exc).lower()
    return (
        isinstance(exc, MemoryError)
        or isinstance(exc, RuntimeError)
        and ("out of memory" in text or "not enough memory" in text or "failed to allocate" in text)
    )


@dataclass
class FitResult:
    dataset: str
    accuracy: float  # validation split, EMA weights
    test_accuracy: float | None
    params: int
    lambda_: float
    local_tpe: float
    epochs: int
    seconds: float
    images_per_second: float
    precision: str
    device: str
    limit_train: int
    graphs: str = "off"  # "on", or "off" with the reason (iteration.graph_plan; GraphedIteration.status)
    history: list[dict] = field(default_factory=list)
    model: nn.Module | None = field(default=None, repr=False, compare=False)

    def summary(self) -> dict:
        """The JSON-ready record (`lambda` spelled as in docs/research.md; no model)."""
        out = asdict(self, dict_factory=lambda items: {k: v for k, v in items if k != "model"})
        out["lambda"] = out.pop("lambda_")
        return out


class Timings:
    """Seconds by phase ("train steps", "evaluation", ...), for `nkat-search bench --search`: wall
    time, and the process's CPU time (all its threads), which a machine busy with other work
    inflates far less than wall time.

    Phases nest; each phase is charged its own time only, without the phases opened inside it, so
    the seconds of all phases add up to the time measured. Only the thread that made the object
    is timed (a heartbeat thread's storage calls are not part of any phase)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._nested: list[list[float]] = []
        self._thread = threading.get_ident()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if threading.get_ident() != self._thread:
            yield
            return
        wall, cpu = time.perf_counter(), time.process_time()
        self._nested.append([0.0, 0.0])
        try:
            yield
        finally:
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            nested_wall, nested_cpu = self._nested.pop()
            self.seconds[name] += wall - nested_wall
            self.cpu[name] += cpu - nested_cpu
            self.calls[name] += 1
            if self._nested:
                self._nested[-1][0] += wall
                self._nested[-1][1] += cpu

    def snapshot(self) -> tuple[dict[str, float], dict[str, float]]:
        """(wall seconds, CPU seconds) by phase so far."""
        return dict(self.seconds), dict(self.cpu)


def _phase(timer: Timings | None, name: str):
    return timer.phase(name) if timer is not None else contextlib.nullcontext()


def build_model(model_cfg: ModelConfig, device: torch.device) -> nn.Module:
    model = NKATViT(model_cfg).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to 0 at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class DeviceSchedule:
    """warmup_cosine on the device: each step's factor is computed from a step counter on the device
    and written into the optimiser's tensor learning rate, so a step needs no number from the host.

    Not LambdaLR: it computes the factor on the host and writes it into the learning rate per step
    (a float, or fill_ with a host scalar), which a captured CUDA graph would replay at its first
    value for ever. The factors equal warmup_cosine's (float32 on the device)."""

    def __init__(self, lr: torch.Tensor, warmup_steps: int, total_steps: int):
        self.lr, self.base = lr, float(lr)
        self.warmup, self.decay_steps = warmup_steps, max(1, total_steps - warmup_steps)
        self.steps = torch.zeros((), dtype=torch.float32, device=lr.device)
        self._write()

    def step(self) -> None:
        self.steps += 1
        self._write()

    def _write(self) -> None:
        s = self.steps
        warm = (s + 1) / max(1, self.warmup)
        progress = ((s - self.warmup) / self.decay_steps).clamp(max=1.0)
        cosine = 0.5 * (1 + torch.cos(progress * math.pi))
        self.lr.copy_(torch.where(s < self.warmup, warm, cosine) * self.base)


class EMA:
    """Exponential moving average of a model's weights and buffers, used for evaluation.

    The decay warms up as min(decay, (1+n)/(10+n)) after n updates (as timm's ModelEmaV3 does),
    so that short runs do not evaluate near-initial weights: with a fixed 0.9995 a 300-step run
    would still be 86% initialisation. n and the weight live on the device (a CUDA graph replays
    the update). Not torch's AveragedModel: its update reads its step counter on the host twice per
    step (a device sync on CUDA) and cannot lerp integer buffers.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
        floats = [pair for pair in pairs if pair[0].is_floating_point()]
        self.others = [pair for pair in pairs if not pair[0].is_floating_point()]
        self.ema_floats, self.model_floats = [e for e, _ in floats], [m for _, m in floats]
        device = next(iter(model.state_dict().values())).device
        self.updates = torch.zeros((), dtype=torch.float32, device=device)

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        weight = 1 - ((1 + self.updates) / (10 + self.updates)).clamp(max=self.decay)
        # ema += weight * (model - ema): foreach ops that take the weight as a tensor (the lerp that
        # takes one scalar would read it on the host, a sync per step).
        delta = torch._foreach_sub(self.model_floats, self.ema_floats)
        torch._foreach_mul_(delta, weight)
        torch._foreach_add_(self.ema_floats, delta)
        for ema_tensor, tensor in self.others:
            ema_tensor.copy_(tensor)


# Evaluation keeps no activations for a backward pass, so its batches can be larger than the
# training batch: on the CPU a smoke model evaluates its 400 validation images about 20% faster
# in one batch than in batches of 64 (the largest non-training cost of a smoke trial).
MIN_EVAL_BATCH = 512


def eval_batch(train_cfg: TrainConfig) -> int:
    """Images per evaluation batch: the training batch, at least MIN_EVAL_BATCH."""
    return max(train_cfg.batch_size, MIN_EVAL_BATCH)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, splits: Splits, batch_size: int, autocast: torch.dtype | None
) -> float:
    """Accuracy (fraction) over every image of x."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    for images, labels in BatchLoader(x, y, splits.spec, batch_size, train=False):
        with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            correct += (model(images).argmax(dim=-1) == labels).sum()
    return correct.item() / len(y)


class TrainStep:
    """One optimisation step of fit(): forward and loss under autocast, backward, gradient
    clipping, AdamW, the learning-rate schedule, EMA. Returns the detached loss (no host sync).

    `nkat-search bench` times this same object, so what it measures is what fit() runs."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        device: torch.device,
        steps_per_epoch: int,
        compile_mode: str | None = None,
    ):
        self.autocast = resolve_precision(train_cfg.precision, device)
        self.device_type, self.clip_grad = device.type, train_cfg.clip_grad
        self.model = build_model(model_cfg, device)
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for p in self.model.parameters():
            (decay if p.ndim >= 2 else no_decay).append(p)
        # The fused kernel exists for CPU and CUDA: one pass over each parameter instead of ~8. The
        # learning rate is one tensor on the device, shared by both groups and written by the
        # schedule; capturable (CUDA) keeps the step count on the device, as graph capture needs,
        # with and without graphs so that both run the same kernels.
        lr = torch.tensor(train_cfg.lr, dtype=torch.float32, device=device)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": train_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr,
            fused=True,
            capturable=device.type == "cuda",
        )
        self.schedule = DeviceSchedule(lr, train_cfg.warmup * steps_per_epoch, train_cfg.epochs * steps_per_epoch)
        self.autocast_cache = True  # off while a CUDA graph is captured (iteration.py)
        self.ema = EMA(self.model, train_cfg.ema) if train_cfg.ema else None
        # compile_mode (e.g. "reduce-overhead": CUDA graphs) is torch.compile's mode; without it,
        # train_cfg.compile decides, with torch's default mode.
        if compile_mode is not None or train_cfg.compile:
            self.step_model = torch.compile(self.model, mode=compile_mode)
        else:
            self.step_model = self.model
        self.criterion = nn.CrossEntropyLoss(label_smoothing=train_cfg.label_smoothing)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(
            self.device_type,
            dtype=self.autocast or torch.float32,
            enabled=self.autocast is not None,
            cache_enabled=self.autocast_cache,
        ):
            loss = self.criterion(self.step_model(images), targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_grad:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad, foreach=True)
        self.optimizer.step()
        self.schedule.step()
        if self.ema is not None:
            self.ema.update()
        return loss.detach()


def _build(model_cfg: ModelConfig, train_cfg: TrainConfig, splits: Splits, compile_mode: str | None) -> Iteration:
    """The seeded training iteration of one fit: its batches, step (model, optimiser, schedule,
    EMA) and, per train_cfg.graphs, its capture as a CUDA graph."""
    torch.manual_seed(train_cfg.seed)
    loader = BatchLoader(
        splits.train_x,
        splits.train_y,
        splits.spec,
        train_cfg.batch_size,
        train=True,
        train_cfg=train_cfg,
        seed=train_cfg.seed,
        limit=train_cfg.limit_train,
    )
    step = TrainStep(model_cfg, train_cfg, splits.train_x.device, len(loader), compile_mode)
    return make_iteration(step, loader, train_cfg.graphs, compile_mode)


def _train_epoch(iteration: Iteration, dataset: str, epoch: int) -> tuple[float, int]:
    """One epoch of steps: the mean training loss and the number of images seen; a loss that is
    not finite is a NonFiniteLossError."""
    iteration.step.model.train()
    loss_sum = torch.zeros((), device=iteration.loader.x.device)
    batches = iteration.start_epoch()
    for b in range(batches):
        loss_sum += iteration(b).float()
    mean_loss = loss_sum.item() / batches  # the one host synchronisation of the epoch
    if not math.isfinite(mean_loss):
        raise NonFiniteLossError(
            f"the training loss of {dataset} became {mean_loss} in epoch {epoch}; "
            "lower the learning rate or raise the temperature."
        )
    return mean_loss, batches * min(iteration.loader.batch_size, len(iteration.loader.x))


def fit(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    splits: Splits,
    *,
    on_epoch: EpochCallback | None = None,
    eval_test: bool = False,
    timer: Timings | None = None,
    compile_mode: str | None = None,
) -> FitResult:
    """Train model_cfg on splits with train_cfg; evaluate the EMA weights after every epoch.

    timer, when given, is charged "model build", "train steps", "evaluation" and "epoch callback".
    compile_mode compiles the model with that torch.compile mode (TrainStep)."""
    device = splits.train_x.device
    with _phase(timer, "model build"):
        iteration = _build(model_cfg, train_cfg, splits, compile_mode)
        step = iteration.step
        model, autocast = step.model, step.autocast
        params = count_params(model)
        eval_model = step.ema.module if step.ema is not None else model

    history: list[dict] = []
    train_seconds, train_images, started = 0.0, 0, time.perf_counter()
    for epoch in range(1, train_cfg.epochs + 1):
        epoch_start = time.perf_counter()
        with _phase(timer, "train steps"):
            mean_loss, images = _train_epoch(iteration, splits.spec.name, epoch)
            train_images += images
        train_seconds += time.perf_counter() - epoch_start
        with _phase(timer, "evaluation"):
            accuracy = evaluate(eval_model, splits.val_x, splits.val_y, splits, eval_batch(train_cfg), autocast)
        tpe = local_tpe(accuracy, params)
        seconds = time.perf_counter() - epoch_start
        history.append(dict(epoch=epoch, train_loss=mean_loss, val_accuracy=accuracy, local_tpe=tpe, seconds=seconds))
        if on_epoch is not None:
            with _phase(timer, "epoch callback"):
                on_epoch(epoch, accuracy, tpe)

    test_accuracy = None
    if eval_test:
        with _phase(timer, "evaluation"):
            test_accuracy = evaluate(eval_model, splits.test_x, splits.test_y, splits, eval_batch(train_cfg), autocast)
    return FitResult(
        dataset=splits.spec.name,
        accuracy=accuracy,
        test_accuracy=test_accuracy,
        params=params,
        lambda_=theory_size(params),
        local_tpe=tpe,
        epochs=train_cfg.epochs,
        seconds=time.perf_counter() - started,
        images_per_second=train_images / max(train_seconds, 1e-9),
        precision=str(autocast or torch.float32).removeprefix("torch."),
        device=str(device),
        limit_train=train_cfg.limit_train,
        graphs=iteration.status,
        history=history,
        model=eval_model,
    )
