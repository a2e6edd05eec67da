"""The research-style training pipeline: what `nkat-search bench` compares our training step
against. A benchmark reference, not part of the product: it lives outside the package and the
bench loads it from a source checkout (bench.research_pipeline()).

As the research wrote it: per-image PIL augmentation (crop, flip, RandAugment, cutout) in a
two-worker DataLoader, sort-based top-p, multiply-and-renormalise NKAT modulation, torch's
dropout, AdamW without the fused kernel, a Python-loop EMA and a loss read on the host every
batch. Same parameters and the same function as nkat_search.model.NKATViT (tests/test_bench.py
checks that), so the comparison times the pipeline, not a different model.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from nkat_search.config import ModelConfig, TrainConfig, UsageError
from nkat_search.data.loader import Splits
from nkat_search.datasets import DatasetSpec
from nkat_search.model import MIN_TEMPERATURE, NKATAttention, NKATViT


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
        img[
            :,
            max(0, cy - self.size // 2) : cy + self.size - self.size // 2,
            max(0, cx - self.size // 2) : cx + self.size - self.size // 2,
        ] = 0
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
    """One training step of the research-style pipeline; batches from a 2-worker DataLoader.

    autocast: the dtype to autocast to, or None for fp32 (the research ran fp32 on the CPU).
    Call close() to end the loader's worker processes."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        splits: Splits,
        batch: int,
        device: torch.device,
        autocast: torch.dtype | None,
    ):
        from torchvision.transforms import v2

        self.model = research_model(model_cfg).to(device).train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay
        )
        self.criterion = nn.CrossEntropyLoss(label_smoothing=train_cfg.label_smoothing)
        self.cfg, self.device, self.autocast = train_cfg, device, autocast
        k = splits.spec.num_classes
        self.cutmix = v2.CutMix(alpha=1.0, num_classes=k) if train_cfg.cutmix else None
        self.mixup = v2.MixUp(alpha=train_cfg.mixup, num_classes=k) if train_cfg.mixup else None
        dataset = PILDataset(splits.train_x, splits.train_y, pil_transform(splits.spec, train_cfg))
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch,
            shuffle=True,
            drop_last=True,
            num_workers=2,
            persistent_workers=True,
            pin_memory=device.type == "cuda",
            multiprocessing_context="fork",
        )
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

    def close(self) -> None:
        """End the DataLoader's worker processes."""
        self.batches.close()
        del self.batches, self.loader


def _cycle(iterable) -> Iterator:
    while True:
        yield from iterable
