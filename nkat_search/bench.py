"""`nkat-search bench`: images per second of training, augmentation and evaluation, storage
latency and peak memory, measured on the device it runs on.

Every comparison is taken within one run, side by side: the variants run in turn inside each
repeat (real, bare, research, real, bare, research, ...) and each figure is the median over the
repeats, so a machine shared with other work slows them alike. The train figure times
train.TrainStep over data.BatchLoader, the objects fit() itself uses.

The research-style pipeline below is a reference implementation, kept only to compare against:
per-image PIL augmentation in a two-worker DataLoader, sort-based top-p, multiply-and-renormalise
NKAT modulation, torch's dropout, AdamW without the fused kernel, a Python-loop EMA and a loss
read on the host every batch.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import random
import resource
import statistics
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import DataConfig, ModelConfig, TrainConfig, UsageError, replace
from .data import BatchLoader, DatasetSpec, Splits, load_splits
from .model import MIN_TEMPERATURE, NKATAttention, NKATViT
from .train import TrainStep, evaluate, resolve_precision

# CPU: the batch of perf-notes. CUDA: large enough to keep an H100 busy with a 17-token model
# (see the README's learning-rate rule for batch sizes other than the recipe's 128).
DEFAULT_BATCH = {"cpu": 32, "cuda": 512}


# ---------------------------------------------------------------------------------------------
# Reference: the research-style pipeline (what we compare against, not what we run)


def research_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The research's top-k then top-p filter: logits with removed keys set to -inf, top-p by a
    full descending sort and a scatter back (as in the common top_k_top_p_filtering)."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        ranked, order = logits.sort(dim=-1, descending=True)
        probs = ranked.softmax(dim=-1)
        remove = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


class ResearchAttention(NKATAttention):
    """NKATAttention as the research wrote it; same parameters, same function."""

    def forward(self, x: torch.Tensor, colors: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        logits = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5 / self.temperature.clamp(min=MIN_TEMPERATURE)
        if self.color_heads:
            logits = self._color_bias(logits, colors)
        attn = research_filter(logits, self.top_k, self.top_p).softmax(dim=-1)
        if self.theta is not None:
            stats = torch.stack((x.mean(-1), x.var(-1, unbiased=False)), dim=-1)
            attn = attn * (1 + self.strength * torch.tanh(self.theta(stats)).squeeze(-1)[:, None, None, :])
            attn = attn / attn.sum(dim=-1, keepdim=True)
        out = F.dropout(attn, self.dropout, self.training) @ v
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class ResearchViT(NKATViT):
    """NKATViT whose last block computes every token, as the research's did."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        colors = self._token_colors(x) if self.cfg.split_heads else None
        x = self.patch_embed(self.stem(self.color_norm(x)))
        x = self.pos_drop(torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed)
        for block in self.blocks:
            x = block(x, colors)
        return self.head(self.norm(x)[:, 0])


def research_model(cfg: ModelConfig) -> NKATViT:
    """ResearchViT with every attention replaced by ResearchAttention (weights carried over)."""
    if cfg.channel_shuffle:
        raise UsageError("the research-style reference has no channel shuffle; benchmark without it.")
    model = ResearchViT(cfg)
    for layer, block in enumerate(model.blocks):
        attn = ResearchAttention(cfg, layer)
        attn.load_state_dict(block.attn.state_dict())
        block.attn = attn
    return model


class _Cutout:
    """Per-image cutout on a normalised tensor (DeVries & Taylor), drawn with Python's random."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        cy, cx = random.randrange(h), random.randrange(w)
        img = img.clone()
        img[:, max(0, cy - self.size // 2): cy + self.size - self.size // 2,
            max(0, cx - self.size // 2): cx + self.size - self.size // 2] = 0
        return img


def pil_transform(spec: DatasetSpec, cfg: TrainConfig):
    """The research's per-image torchvision (v1, PIL) pipeline: crop, flip, RandAugment, cutout."""
    from torchvision import transforms as T

    ops = [T.RandomCrop(spec.image_size, padding=cfg.crop_padding)] if cfg.crop_padding else []
    ops += [T.RandomHorizontalFlip()] if spec.hflip else []
    ops += [T.RandAugment(*cfg.randaugment)] if cfg.randaugment[0] else []
    ops += [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    ops += [_Cutout(cfg.cutout)] if cfg.cutout else []
    return T.Compose(ops)


class PILDataset(torch.utils.data.Dataset):
    """uint8 [N, C, H, W] images served one at a time as PIL images through a transform."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform):
        self.x = x.cpu().permute(0, 2, 3, 1).numpy()
        self.y, self.transform = y.cpu(), transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        from PIL import Image

        img = self.x[i]
        return self.transform(Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)), self.y[i]


@torch.no_grad()
def python_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """The research's EMA: one Python iteration per tensor."""
    for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
        if e.is_floating_point():
            e.mul_(decay).add_(m, alpha=1 - decay)
        else:
            e.copy_(m)


class ResearchStep:
    """One training step of the research-style pipeline; batches from a 2-worker DataLoader."""

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, splits: Splits, batch: int,
                 device: torch.device):
        import copy

        from torchvision.transforms import v2

        self.model = research_model(model_cfg).to(device).train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=train_cfg.lr,
                                           weight_decay=train_cfg.weight_decay)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=train_cfg.label_smoothing)
        self.cfg, self.device = train_cfg, device
        self.autocast = resolve_precision(train_cfg.precision, device)
        k = splits.spec.num_classes
        self.cutmix = v2.CutMix(alpha=1.0, num_classes=k) if train_cfg.cutmix else None
        self.mixup = v2.MixUp(alpha=train_cfg.mixup, num_classes=k) if train_cfg.mixup else None
        dataset = PILDataset(splits.train_x, splits.train_y, pil_transform(splits.spec, train_cfg))
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=2, persistent_workers=True,
            pin_memory=device.type == "cuda", multiprocessing_context="fork")
        self.batches = _cycle(self.loader)
        self.losses: list[float] = []

    def __call__(self) -> None:
        images, targets = next(self.batches)
        images, targets = images.to(self.device), targets.to(self.device)
        if self.cutmix is not None and random.random() < self.cfg.cutmix:
            images, targets = self.cutmix(images, targets)
        elif self.mixup is not None:
            images, targets = self.mixup(images, targets)
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            loss = self.criterion(self.model(images), targets)
        self.optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad or float("inf"))
        self.optimizer.step()
        python_ema(self.ema, self.model, self.cfg.ema)
        self.losses.append(loss.item())


def _cycle(iterable) -> Iterator:
    while True:
        yield from iterable


# ---------------------------------------------------------------------------------------------
# Measurements


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(variants: dict[str, Callable[[], None]], images_per_call: int, calls: int, warmup: int,
                repeats: int, device: torch.device) -> dict[str, dict]:
    """img/s of each variant: warm-up calls, then `repeats` rounds that run every variant in turn
    for `calls` calls; median and every round's figure."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            _sync(device)
            rounds[name].append(images_per_call * calls / (time.perf_counter() - start))
    return {name: {"img_per_s": statistics.median(r), "rounds": r} for name, r in rounds.items()}


def synthetic_splits(name: str, images: int, val: int, device: torch.device) -> Splits:
    return load_splits(name, DataConfig(source="synthetic", val_size=val, synthetic_train=images + val,
                                        synthetic_test=1), device)


def bench_train(model_cfg: ModelConfig, train_cfg: TrainConfig, splits: Splits, *, steps: int, warmup: int,
                repeats: int, research: bool = True, extra_bf16: bool = False) -> dict:
    """Real step (TrainStep over BatchLoader) vs bare step (fixed batch; forward, backward, AdamW)
    vs the research-style pipeline, side by side; with extra_bf16 also the real step under bf16."""
    device, batch = splits.train_x.device, train_cfg.batch_size
    if batch > len(splits.train_x):
        raise UsageError(f"batch size {batch} exceeds the {len(splits.train_x)} benchmark images; lower --batch-size.")
    torch.manual_seed(train_cfg.seed)
    loader = BatchLoader(splits.train_x, splits.train_y, splits.spec, batch, train=True, train_cfg=train_cfg,
                         seed=train_cfg.seed)
    step = TrainStep(model_cfg, train_cfg, device, len(loader))
    step.model.train()
    batches = _cycle(loader)
    losses = []

    def real() -> None:
        losses.append(step(*next(batches)))

    fixed_x, fixed_y = next(iter(BatchLoader(splits.train_x, splits.train_y, splits.spec, batch, train=False)))

    def bare() -> None:
        with torch.autocast(device.type, dtype=step.autocast or torch.float32, enabled=step.autocast is not None):
            loss = step.criterion(step.model(fixed_x), fixed_y)
        step.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        step.optimizer.step()

    variants = {"real": real, "bare": bare}
    precision = {"real": _name(step.autocast), "bare": _name(step.autocast)}
    if research:
        variants["research"] = ResearchStep(model_cfg, train_cfg, splits, batch, device)
        precision["research"] = _name(step.autocast)
    if extra_bf16 and step.autocast is None:
        bf16 = TrainStep(model_cfg, replace(train_cfg, precision="bf16"), device, len(loader))
        bf16.model.train()
        variants["real_bf16"] = lambda: bf16(*next(batches))
        precision["real_bf16"] = "bfloat16"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = interleaved(variants, batch, steps, warmup, repeats, device)
    for name in out:
        out[name]["precision"] = precision[name]
    if not torch.isfinite(torch.stack(losses)).all():
        raise RuntimeError("the benchmark's training loss became non-finite; the figures would be meaningless.")
    result = {"variants": out, "real_over_bare_cost": out["bare"]["img_per_s"] / out["real"]["img_per_s"]}
    if research:
        result["real_over_research_speed"] = out["real"]["img_per_s"] / out["research"]["img_per_s"]
        del variants["research"].loader  # ends its workers
    result["memory"] = peak_memory(device)
    return result


def bench_augment(splits: Splits, train_cfg: TrainConfig, *, batch: int, images: int, repeats: int) -> dict:
    """Batched on-device augmentation (BatchLoader) vs the same operations per image on PIL."""
    cfg = replace(train_cfg, mixup=0.0, cutmix=0.0)  # batch-level mixing has no per-image twin
    x, y = splits.train_x[:images], splits.train_y[:images]
    loader = BatchLoader(x, y, splits.spec, batch, train=True, train_cfg=cfg, seed=cfg.seed)
    dataset = PILDataset(x, y, pil_transform(splits.spec, cfg))
    n = len(loader) * min(batch, len(x))

    def batched() -> None:
        for _ in loader:
            pass

    def per_image() -> None:
        for i in range(n):
            dataset[i % len(dataset)]

    out = interleaved({"batched": batched, "pil": per_image}, n, 1, 1, repeats, x.device)
    out["speedup"] = out["batched"]["img_per_s"] / out["pil"]["img_per_s"]
    out["batch"] = batch
    return out


def bench_eval(model_cfg: ModelConfig, splits: Splits, *, batch: int, repeats: int, precision: str) -> dict:
    """img/s of train.evaluate (the validation pass of every epoch)."""
    device = splits.val_x.device
    model = NKATViT(model_cfg).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    autocast = resolve_precision(precision, device)

    def run() -> None:
        evaluate(model, splits.val_x, splits.val_y, splits, batch, autocast)

    out = interleaved({"eval": run}, len(splits.val_y), 1, 1, repeats, device)["eval"]
    out["precision"] = _name(autocast)
    return out


def peak_memory(device: torch.device) -> dict:
    """CUDA: max allocated since the last reset; CPU: the process's peak resident set (ru_maxrss)."""
    if device.type == "cuda":
        return {"kind": "cuda_max_allocated", "mib": torch.cuda.max_memory_allocated(device) / 2**20}
    return {"kind": "cpu_max_rss", "mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _storage_worker(url: str, study_name: str, ops: int, barrier, queue) -> None:
    import optuna

    from .storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=open_storage(url))
    rng = random.Random(os.getpid())
    timings = []
    barrier.wait()
    # Optuna warns (UserWarning) that heartbeat storages are meant for Study.optimize; ask/tell is the point here.
    warnings.simplefilter("ignore", UserWarning)
    for i in range(ops + 1):
        start = time.perf_counter()
        trial = study.ask()
        trial.suggest_float("x", 0.0, 1.0)
        study.tell(trial, rng.random())
        if i:  # the first pair opens connections and caches: not a steady-state figure
            timings.append(time.perf_counter() - start)
    queue.put(timings)


def bench_storage(url: str, procs: int, ops: int) -> dict:
    """ask+tell latency (p50, p95, ms) with `procs` processes on one throwaway study of `url`."""
    import optuna

    from .storage import mask, open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = f"nkat-bench-{uuid.uuid4().hex[:8]}"
    storage = open_storage(url)
    optuna.create_study(study_name=name, storage=storage)
    ctx = multiprocessing.get_context("fork")  # no torch work in the children: fork is safe and quick
    barrier, queue = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_storage_worker, args=(url, name, ops, barrier, queue)) for _ in range(procs)]
    try:
        for w in workers:
            w.start()
        timings = sorted(t * 1000 for _ in workers for t in queue.get(timeout=300))
    finally:
        for w in workers:
            w.join(timeout=30)
        optuna.delete_study(study_name=name, storage=storage)
    pick = lambda q: timings[min(len(timings) - 1, int(q * len(timings)))]  # noqa: E731
    return {"url": mask(url), "procs": procs, "ops_per_proc": ops, "p50_ms": pick(0.50), "p95_ms": pick(0.95)}


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _name(dtype: torch.dtype | None) -> str:
    return str(dtype or torch.float32).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------
# Command


SECTIONS = ("train", "augment", "eval", "storage")
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is visible; use --device cpu.")
    return torch.device(name)


def measure(args) -> dict:
    """Every section asked for, as one JSON-ready dict."""
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch_size or DEFAULT_BATCH[device.type]
    for flag in ("steps", "repeats", "images", "augment_batch", "eval_images", "storage_procs", "storage_ops"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1.")
    model_cfg = ModelConfig(conv_stem=args.conv_stem, patch_size=args.patch_size, embed_dim=args.embed_dim,
                            depth=args.depth)
    train_cfg = TrainConfig(batch_size=batch, precision=args.precision, compile=args.compile)
    out: dict = {
        "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "config": {"model": dataclasses.asdict(model_cfg), "batch_size": batch, "steps": args.steps, "warmup": args.warmup,
                   "repeats": args.repeats, "compile": args.compile},
    }
    if "storage" in args.only:  # first: its processes fork before torch starts its threads
        with tempfile.TemporaryDirectory() as tmp:
            url = args.storage or f"journal:{os.path.join(tmp, 'bench.journal')}"
            out["storage"] = bench_storage(url, args.storage_procs, args.storage_ops)
    if {"train", "augment", "eval"} & set(args.only):
        splits = synthetic_splits("cifar10", max(args.images, batch), args.eval_images, device)
    if "augment" in args.only:
        out["augment"] = bench_augment(splits, train_cfg, batch=args.augment_batch, images=args.images, repeats=args.repeats)
    if "eval" in args.only:
        out["eval"] = bench_eval(model_cfg, splits, batch=batch, repeats=args.repeats, precision=args.precision)
    if "train" in args.only:
        extra = device.type == "cpu" and cpu_has_native_bf16() and args.precision != "bf16"
        out["train"] = bench_train(model_cfg, train_cfg, splits, steps=args.steps, warmup=args.warmup,
                                   repeats=args.repeats, extra_bf16=extra)
        out["memory"] = out["train"].pop("memory")
    return out


def table(result: dict) -> str:
    """The plain-text table of measure()'s result."""
    c = result["config"]
    m = c["model"]
    lines = [f"device {result['device']}, torch {result['torch']}, {result['threads']} threads; model: stem "
             f"{m['conv_stem']}, patch {m['patch_size']}, embed {m['embed_dim']}, depth {m['depth']}; batch "
             f"{c['batch_size']}, {c['warmup']} warm-up + {c['repeats']} x {c['steps']} steps, median of rounds",
             "", f"{'figure':<44} {'value':>12}  {'precision':<9} note"]

    def row(name: str, value: str, precision: str = "", note: str = "") -> None:
        lines.append(f"{name:<44} {value:>12}  {precision:<9} {note}")

    if "train" in result:
        v = result["train"]["variants"]
        labels = {"real": "train: real step (TrainStep + BatchLoader)", "bare": "train: bare model step",
                  "research": "train: research-style pipeline", "real_bf16": "train: real step, bf16 autocast"}
        for name, fig in v.items():
            rel = v["bare"]["img_per_s"] / fig["img_per_s"]
            row(labels[name], f"{fig['img_per_s']:.1f} img/s", fig["precision"], f"{rel:.2f}x the bare step's time")
        row("train: real step cost over bare", f"{result['train']['real_over_bare_cost']:.3f}x", "", "target <= 1.15")
        if "real_over_research_speed" in result["train"]:
            row("train: real speed over research", f"{result['train']['real_over_research_speed']:.3f}x", "",
                "target >= 1.25")
    if "augment" in result:
        a = result["augment"]
        row("augment: batched on-device", f"{a['batched']['img_per_s']:.0f} img/s", "", f"batch {a['batch']}")
        row("augment: per-image PIL", f"{a['pil']['img_per_s']:.0f} img/s")
        row("augment: speed-up", f"{a['speedup']:.1f}x", "", "target >= 10")
    if "eval" in result:
        row("eval", f"{result['eval']['img_per_s']:.1f} img/s", result["eval"]["precision"])
    if "storage" in result:
        s = result["storage"]
        note = f"{s['procs']} processes x {s['ops_per_proc']} on {s['url']}"
        row("storage: ask+tell p50", f"{s['p50_ms']:.1f} ms", "", note)
        row("storage: ask+tell p95", f"{s['p95_ms']:.1f} ms", "", "target < 50 on local PostgreSQL, 8 processes")
    if "memory" in result:
        row(f"memory: peak ({result['memory']['kind']})", f"{result['memory']['mib']:.0f} MiB")
    return "\n".join(lines)
