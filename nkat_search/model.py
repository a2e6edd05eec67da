"""The NKAT Vision Transformer (docs/research.md, "The model changes planned for CIFAR-10").

Reads top to bottom: ColorLayerNorm, ConvStem, PatchEmbed, NKATAttention, Block, NKATViT.
The parameter count of the research's baseline (tiny stem, patch 2, embed 384, depth 7, CIFAR-10)
is 12,614,999 without the NKAT modulation; each attention layer with strength > 0 adds three
scalars (the theta function), so the baseline with modulation has 12,615,020.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import ModelConfig

# Learnable temperatures are kept above this so that a diverging run cannot divide by ~0
# (docs/research.md: very low temperatures are forbidden).
MIN_TEMPERATURE = 0.05


class ColorLayerNorm(nn.Module):
    """LayerNorm over the channel vector of every pixel: absorbs per-channel RGB statistics."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _conv_bn_gelu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.GELU()]


class ConvStem(nn.Module):
    """Hybrid stem: off (identity), tiny (32, 64; /4) or small (64, 128, 128; /4)."""

    WIDTHS = {"off": (), "tiny": ((32, 2), (64, 2)), "small": ((64, 2), (128, 2), (128, 1))}

    def __init__(self, kind: str, in_chans: int):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_chans
        for cout, stride in self.WIDTHS[kind]:
            layers += _conv_bn_gelu(cin, cout, stride)
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.out_chans = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class PatchEmbed(nn.Module):
    """Non-overlapping patches of the stem's feature map, projected to embed_dim tokens."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(x), "b d h w -> b (h w) d")


# Up to this many keys the mask is computed by rank counting (an [N, N] comparison per query, with
# no topk): torch.topk is a fallback in inductor and cuts a compiled layer's graph in two, while
# comparisons, sums and a matmul fuse. Beyond it the [.., N, N, N] comparison would cost more than
# the sort it replaces. The research baseline has 17 tokens.
RANK_TOKENS = 32


def nucleus_mask(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Boolean mask of the keys each query keeps: the top-k logits, then the top-p nucleus of those.

    The nucleus is the smallest set of keys whose softmax mass (over the keys top-k kept) reaches
    top_p; the largest key is always kept. Ties with the smallest kept logit are kept too. Compiled
    and up to RANK_TOKENS keys by rank counting, else by one topk call (no full sort when top-k is
    on; eager it is the faster: docs/performance.md); both give the same mask (tests/test_model.py)."""
    if logits.shape[-1] <= RANK_TOKENS and torch.compiler.is_compiling():
        return rank_mask(logits, top_k, top_p)
    return topk_mask(logits, top_k, top_p)


def topk_mask(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """nucleus_mask through torch.topk: the threshold is the smallest logit that both filters keep."""
    n = logits.shape[-1]
    k = min(top_k, n) if top_k > 0 else n
    values = logits.topk(k, dim=-1, sorted=True).values
    if top_p < 1:
        probs = values.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the keys ranked above each key
        values = values.masked_fill(before >= top_p, float("inf"))
    threshold = values.amin(dim=-1, keepdim=True)
    return logits >= threshold


def rank_mask(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """nucleus_mask by rank counting: key j stays while fewer than k logits exceed it and the mass of
    the kept keys above it is below top_p. The mass is renormalised over exactly k values, as the
    top k values of topk_mask are (ties at the k-th value counted up to k)."""
    n = logits.shape[-1]
    k = min(top_k, n) if top_k > 0 else n
    above = logits.unsqueeze(-1) < logits.unsqueeze(-2)  # [..., j, l]: logit l exceeds logit j
    keep = above.sum(dim=-1) < k
    if top_p < 1:
        kth = logits.masked_fill(~keep, float("inf")).amin(dim=-1, keepdim=True)  # the k-th largest value
        top = logits.amax(dim=-1, keepdim=True)
        weight = (logits - top).exp()
        over = logits > kth
        total = (weight * over).sum(dim=-1, keepdim=True) + (k - over.sum(dim=-1, keepdim=True)) * (kth - top).exp()
        mass = (above.to(logits.dtype) @ (weight * keep / total).unsqueeze(-1)).squeeze(-1)
        keep = keep & (mass < top_p)
    return keep


def _dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout; the same distribution as F.dropout, drawn with uniform_ instead of the CPU's
    element-serial bernoulli_ (several times slower on the small [B, H, N, N] attention tensors)."""
    if p == 0:
        return x
    return x * ((torch.rand_like(x) >= p) * (1 / (1 - p))).to(x.dtype)


class NKATAttention(nn.Module):
    """Scaled dot-product attention with a learnable temperature, top-k/top-p filtering and the
    NKAT modulation (1 + s * r^l * theta(x)) of the attention weights of layer l.

    Identical in train and eval mode. Without filters, modulation and split heads it runs
    through torch's fused scaled_dot_product_attention.
    """

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.embed_dim // cfg.num_heads
        self.top_k, self.top_p = cfg.top_k, cfg.top_p
        self.dropout = cfg.dropout_attn
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=False)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.temperature = nn.Parameter(torch.tensor(float(cfg.temperature)))
        self.strength = cfg.nkat_strength * cfg.nkat_decay**layer
        # theta: a learned function of each key token's feature mean and variance (3 scalars).
        self.theta = nn.Linear(2, 1) if cfg.nkat_strength > 0 else None
        # Split heads: the first in_chans heads each see one colour channel's tokens, through a
        # learned bias that favours keys whose channel-c intensity is close to the query's.
        self.color_heads = cfg.in_chans if cfg.split_heads else 0
        self.color_weight = nn.Parameter(torch.ones(self.color_heads)) if self.color_heads else None
        self.fused = not cfg.filtered
        self.keep_attention = False  # set by NKATViT.attention_maps
        self.last_attention: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, colors: torch.Tensor | None = None, queries: int = 0) -> torch.Tensor:
        """Attention of x's tokens; with queries > 0 only for the first `queries` tokens (all keys)."""
        if queries:
            d = self.qkv.out_features // 3
            q = rearrange(F.linear(x[:, :queries], self.qkv.weight[:d]), "b n (h d) -> b h n d", h=self.num_heads)
            k, v = rearrange(F.linear(x, self.qkv.weight[d:]), "b n (two h d) -> two b h n d", two=2, h=self.num_heads)
        else:
            q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        q = q / self.temperature.clamp(min=MIN_TEMPERATURE)
        dropout = self.dropout if self.training else 0.0
        if self.fused and not self.keep_attention:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:
            logits = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
            if self.color_heads:
                logits = self._color_bias(logits, colors)
            # The mask is boolean: recording its topk/softmax/cumsum for autograd would be waste.
            with torch.no_grad():
                keep = nucleus_mask(logits, self.top_k, self.top_p)
            if self.theta is not None and self.strength < 1:
                # softmax(l + log w) = softmax(l) * w / sum(softmax(l) * w): the modulation folded
                # into the logits, valid while w = 1 + s * tanh(.) > 0, i.e. s < 1.
                logits = logits + torch.log1p(self.strength * self._theta(x))[:, None, None, :].to(logits.dtype)
            attn = logits.masked_fill(~keep, float("-inf")).softmax(dim=-1)
            if self.theta is not None and self.strength >= 1:
                attn = attn * (1 + self.strength * self._theta(x)[:, None, None, :]).to(attn.dtype)
                attn = attn / attn.sum(dim=-1, keepdim=True)
            if self.keep_attention:
                self.last_attention = attn.detach()
            out = _dropout(attn, dropout) @ v
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))

    def _theta(self, x: torch.Tensor) -> torch.Tensor:
        """theta(x) in (-1, 1) per token: [B, N]."""
        assert self.theta is not None  # called only with the modulation on
        var, mean = torch.var_mean(x, dim=-1, unbiased=False)
        stats = torch.stack((mean, var), dim=-1)
        return torch.tanh(self.theta(stats.to(self.theta.weight.dtype))).squeeze(-1)

    def _color_bias(self, logits: torch.Tensor, colors: torch.Tensor | None) -> torch.Tensor:
        # colors: [B, N, C] mean intensity of each input channel under each token.
        # NKATViT passes them whenever split heads are on, the only case that calls this.
        assert colors is not None and self.color_weight is not None
        c = self.color_heads
        per_channel = colors.transpose(1, 2)
        queries = per_channel[:, :, : logits.shape[-2], None]  # the queries are the first tokens
        distance = (queries - per_channel[:, :, None, :]).abs()
        bias = -self.color_weight[None, :, None, None] * distance.to(logits.dtype)
        return torch.cat((logits[:, :c] + bias, logits[:, c:]), dim=1)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.norm1 = nn.LayerNorm(cfg.embed_dim)
        self.attn = NKATAttention(cfg, layer)
        self.norm2 = nn.LayerNorm(cfg.embed_dim)
        self.mlp = nn.Sequential(nn.Linear(cfg.embed_dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.embed_dim))

    def forward(self, x: torch.Tensor, colors: torch.Tensor | None = None, cls_only: bool = False) -> torch.Tensor:
        """With cls_only, the class token's output alone ([B, 1, D]): what the last block owes the head."""
        if cls_only:
            x = x[:, :1] + self.attn(self.norm1(x), colors, queries=1)
        else:
            x = x + self.attn(self.norm1(x), colors)
        return x + self.mlp(self.norm2(x))


class NKATViT(nn.Module):
    """Colour norm -> conv stem -> patches + class token + positions -> blocks -> norm -> head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # On one channel a LayerNorm over C would map every pixel to its bias and erase the image.
        self.color_norm = ColorLayerNorm(cfg.in_chans) if cfg.color_norm and cfg.in_chans > 1 else nn.Identity()
        self.stem = ConvStem(cfg.conv_stem, cfg.in_chans)
        self.patch_embed = PatchEmbed(self.stem.out_chans, cfg.embed_dim, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.embed_dim))
        self.pos_drop = nn.Dropout(cfg.dropout_embed)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim)
        half = cfg.embed_dim // 2
        self.head = nn.Sequential(
            nn.Linear(cfg.embed_dim, half), nn.GELU(), nn.Dropout(cfg.dropout_head), nn.Linear(half, cfg.num_classes)
        )
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.channel_shuffle and self.training and x.shape[1] > 1:
            # Channel-shuffle preprocessing: a random colour-channel order per image.
            order = torch.rand(x.shape[:2], device=x.device).argsort(dim=1)
            x = x.gather(1, order[:, :, None, None].expand_as(x))
        colors = self._token_colors(x) if self.cfg.split_heads else None
        x = self.patch_embed(self.stem(self.color_norm(x)))
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x + self.pos_embed)
        # The head reads the class token only, so the last block computes nothing else: its other
        # 16 queries, their projection and MLP would be ~11% of the baseline's FLOPs, thrown away.
        for i, block in enumerate(self.blocks):
            x = block(x, colors, cls_only=i == len(self.blocks) - 1)
        return self.head(self.norm(x)[:, 0])

    def _token_colors(self, x: torch.Tensor) -> torch.Tensor:
        side = int(self.cfg.num_patches**0.5)
        grid = rearrange(F.adaptive_avg_pool2d(x, side), "b c h w -> b (h w) c")
        return torch.cat((grid.mean(dim=1, keepdim=True), grid), dim=1)  # class token: image mean

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Class-token attention of every layer, averaged over heads: [depth, B, num_patches]."""
        # A ModuleList's items are typed nn.Module; __init__ fills this one with Blocks only.
        attns = [block.attn for block in typing.cast("Iterable[Block]", self.blocks)]
        for attn in attns:
            attn.keep_attention = True
        try:
            self(x)
            maps = []
            for attn in attns:
                assert attn.last_attention is not None  # keep_attention makes forward record it
                maps.append(attn.last_attention[:, :, 0, 1:].mean(dim=1))
        finally:
            for attn in attns:
                attn.keep_attention = False
                attn.last_attention = None
        return torch.stack(maps)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def count_params(model: nn.Module) -> int:
    """Trainable parameters: the numerator of lambda."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
