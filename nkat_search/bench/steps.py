"""The train, augment and eval sections: images per second of the step, augmentation and evaluation."""

from __future__ import annotations

from typing import Any

import torch

from .. import devices
from ..config import ModelConfig, TrainConfig, UsageError, replace
from ..data.loader import BatchLoader, Splits
from ..devices import choose_precision
from ..iteration import GraphedIteration, graph_plan
from ..model import NKATViT
from ..train import TrainStep, evaluate
from .timing import NO_REFERENCE, _cycle, _dtype_name, interleaved, peak_memory


def bench_train(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    splits: Splits,
    *,
    steps: int,
    warmup: int,
    repeats: int,
    reference=None,
) -> dict:
    """The real step (TrainStep over BatchLoader, at train_cfg's precision, eager) beside the bare
    step (fixed batch; forward, backward, AdamW), on CUDA the real step replayed as a CUDA graph
    (real_graphed, as fit() runs it there) and, with a reference module, the research-style
    pipeline at fp32, as the research ran it. The real step also runs at the other precision where
    the device has native bf16, so both ratios are in the table."""
    device, batch = splits.train_x.device, train_cfg.batch_size
    if batch > len(splits.train_x):
        raise UsageError(f"batch size {batch} exceeds the {len(splits.train_x)} benchmark images; lower --batch-size.")
    torch.manual_seed(train_cfg.seed)
    loader = BatchLoader(
        splits.train_x, splits.train_y, splits.spec, batch, train=True, train_cfg=train_cfg, seed=train_cfg.seed
    )
    batches = _cycle(loader)
    step = TrainStep(model_cfg, train_cfg, device, len(loader))
    step.model.train()
    losses: list[torch.Tensor] = []

    def real() -> None:
        losses.append(step(*next(batches)))

    variants = {"real": real, "bare": _bare_step(step, splits, batch)}
    precision = {"real": _dtype_name(step.autocast), "bare": _dtype_name(step.autocast)}
    other = _other_precision(train_cfg, step.autocast, device)
    if other is not None:
        second = TrainStep(model_cfg, other, device, len(loader))
        second.model.train()
        name = "real_" + ("fp32" if other.precision == "fp32" else "bf16")
        variants[name] = lambda: losses.append(second(*next(batches)))
        precision[name] = _dtype_name(second.autocast)
    graphed = _graphed(model_cfg, train_cfg, splits, losses)
    if graphed is not None:
        variants["real_graphed"], precision["real_graphed"] = graphed, _dtype_name(step.autocast)
    research = None
    if reference is not None:
        research = reference.ResearchStep(model_cfg, train_cfg, splits, batch, device, autocast=None)
        variants["research"] = research
        precision["research"] = "float32"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        out = interleaved(variants, batch, steps, warmup, repeats, device)
    finally:
        if research is not None:
            research.close()
    for name in out:
        out[name]["precision"] = precision[name]
    if not torch.isfinite(torch.stack(losses)).all():
        raise RuntimeError("the benchmark's training loss became non-finite; the figures would be meaningless.")
    result = {"variants": out, **_ratios({name: fig["img_per_s"] for name, fig in out.items()})}
    result["graphs"] = graphed.iteration.status if graphed is not None else graph_plan("auto", device, None)[1]
    result["memory"] = peak_memory(device)
    return result


class _Graphed:
    """The real step as fit() runs it with graphs = "auto" on CUDA: batches drawn by the iteration,
    captured once and replayed (iteration.GraphedIteration); its status says if capture failed."""

    def __init__(self, iteration: GraphedIteration, losses: list[torch.Tensor]) -> None:
        self.iteration, self.losses, self.b = iteration, losses, len(iteration.loader)

    def __call__(self) -> None:
        if self.b >= len(self.iteration.loader):
            self.iteration.start_epoch()
            self.b = 0
        self.losses.append(self.iteration(self.b).clone())  # the graph's output is rewritten per replay
        self.b += 1


def _graphed(model_cfg: ModelConfig, train_cfg: TrainConfig, splits: Splits, losses: list) -> _Graphed | None:
    """The graphed variant where graphs = "auto" captures (CUDA), else None."""
    if not graph_plan("auto", splits.train_x.device, None)[0]:
        return None
    loader = BatchLoader(
        splits.train_x, splits.train_y, splits.spec, train_cfg.batch_size, train=True, train_cfg=train_cfg, seed=1
    )
    step = TrainStep(model_cfg, train_cfg, splits.train_x.device, len(loader))
    step.model.train()
    graphed = _Graphed(GraphedIteration(step, loader), losses)
    for _ in range(GraphedIteration.WARMUP + 1):  # its eager warm-up and the capture, before any timing
        graphed()
    return graphed


def _bare_step(step: TrainStep, splits: Splits, batch: int):
    """The step with nothing around it: one fixed batch; forward, backward, AdamW."""
    device = splits.train_x.device
    fixed_x, fixed_y = next(iter(BatchLoader(splits.train_x, splits.train_y, splits.spec, batch, train=False)))

    def bare() -> None:
        with torch.autocast(device.type, dtype=step.autocast or torch.float32, enabled=step.autocast is not None):
            loss = step.criterion(step.model(fixed_x), fixed_y)
        step.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        step.optimizer.step()

    return bare


def _other_precision(train_cfg: TrainConfig, autocast: torch.dtype | None, device: torch.device) -> TrainConfig | None:
    """The recipe at the precision the real step does not use: fp32 beside an autocast, bf16 beside
    fp32 on a CPU with native bf16; None where there is no such twin."""
    if autocast is not None:
        return replace(train_cfg, precision="fp32")
    if device.type == "cpu" and devices.cpu_bf16_flags():
        return replace(train_cfg, precision="bf16")
    return None


def _ratios(speed: dict[str, float]) -> dict:
    """The real step's cost over the bare step, and its speed over the research's where that ran."""
    result: dict[str, Any] = {"real_over_bare_cost": speed["bare"] / speed["real"]}
    if "real_graphed" in speed:
        result["graphed_over_bare_cost"] = speed["bare"] / speed["real_graphed"]
        result["graphed_over_eager_speed"] = speed["real_graphed"] / speed["real"]
    if "research" in speed:
        result["real_over_research_speed"] = speed["real"] / speed["research"]
        if "real_fp32" in speed:
            result["real_fp32_over_research_speed"] = speed["real_fp32"] / speed["research"]
    else:
        result["research"] = NO_REFERENCE
    return result


def bench_augment(
    splits: Splits, train_cfg: TrainConfig, *, batch: int, images: int, repeats: int, reference=None
) -> dict:
    """Batched on-device augmentation (BatchLoader) vs the same operations per image on PIL (the
    reference's pipeline)."""
    cfg = replace(train_cfg, mixup=0.0, cutmix=0.0)  # batch-level mixing has no per-image twin
    x, y = splits.train_x[:images], splits.train_y[:images]
    loader = BatchLoader(x, y, splits.spec, batch, train=True, train_cfg=cfg, seed=cfg.seed)
    n = len(loader) * min(batch, len(x))

    def batched() -> None:
        for _ in loader:
            pass

    variants = {"batched": batched}
    if reference is not None:
        dataset = reference.PILDataset(x, y, reference.pil_transform(splits.spec, cfg))

        def per_image() -> None:
            for i in range(n):
                dataset[i % len(dataset)]

        variants["pil"] = per_image
    out: dict[str, Any] = interleaved(variants, n, 1, 1, repeats, x.device)
    if reference is not None:
        out["speedup"] = out["batched"]["img_per_s"] / out["pil"]["img_per_s"]
    else:
        out["pil"] = NO_REFERENCE
    out["batch"] = batch
    return out


def bench_eval(model_cfg: ModelConfig, splits: Splits, *, batch: int, repeats: int, precision: str) -> dict:
    """img/s of train.evaluate (the validation pass of every epoch)."""
    device = splits.val_x.device
    model = NKATViT(model_cfg).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    autocast, _ = choose_precision(precision, device)

    def run() -> None:
        evaluate(model, splits.val_x, splits.val_y, splits, batch, autocast)

    out = interleaved({"eval": run}, len(splits.val_y), 1, 1, repeats, device)["eval"]
    out["precision"] = _dtype_name(autocast)
    return out
