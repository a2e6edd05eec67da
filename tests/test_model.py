import pytest
import torch

from nkat_search.config import ModelConfig, UsageError, adapt_patch_size
from nkat_search.model import NKATAttention, NKATViT, count_params, nucleus_mask, rank_mask, topk_mask

STEM_CONVS = {"off": [], "tiny": [(32, 2), (64, 2)], "small": [(64, 2), (128, 2), (128, 1)]}


def formula_params(cfg: ModelConfig) -> int:
    """Parameter count written out by hand from docs/research.md's description of the model."""
    d, c = cfg.embed_dim, cfg.in_chans
    total = 2 * c if cfg.color_norm and c > 1 else 0  # no colour norm on grayscale
    cin = c
    for cout, _ in STEM_CONVS[cfg.conv_stem]:
        total += cin * cout * 9 + cout + 2 * cout  # conv with bias + BatchNorm
        cin = cout
    total += cin * d * cfg.patch_size**2 + d  # patch embedding
    total += d + (cfg.num_patches + 1) * d  # class token + positions
    hidden = int(d * cfg.mlp_ratio)
    block = 2 * d + 3 * d * d + (d * d + d) + 1 + 2 * d + (d * hidden + hidden) + (hidden * d + d)
    block += 3 if cfg.nkat_strength > 0 else 0
    total += cfg.depth * block + 2 * d
    total += d * (d // 2) + d // 2 + (d // 2) * cfg.num_classes + cfg.num_classes
    return total


def test_baseline_matches_the_research_count():
    # docs/research.md: tiny stem, patch 2, embed 384, depth 7 on CIFAR-10 has 12,614,999 parameters.
    assert count_params(NKATViT(ModelConfig(nkat_strength=0))) == 12_614_999
    assert count_params(NKATViT(ModelConfig())) == 12_614_999 + 7 * 3


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(),
        ModelConfig(conv_stem="off", patch_size=4, embed_dim=448, depth=5, nkat_strength=0),
        ModelConfig(conv_stem="small", patch_size=2, embed_dim=512, depth=9),
        ModelConfig(in_chans=1, img_size=28, num_classes=26, conv_stem="off", patch_size=7, embed_dim=64, depth=2),
        ModelConfig(conv_stem="tiny", patch_size=1, embed_dim=64, depth=3, color_norm=False),
    ],
)
def test_param_count_matches_formula(cfg):
    assert count_params(NKATViT(cfg)) == formula_params(cfg)


@pytest.mark.parametrize("stem", ["off", "tiny", "small"])
@pytest.mark.parametrize("chans, size, classes", [(3, 32, 10), (1, 28, 10), (1, 28, 26)])
@pytest.mark.parametrize("patch", [1, 2, 4, 7])
def test_shapes_for_every_stem_patch_and_channel_count(stem, chans, size, classes, patch):
    feature = size // (1 if stem == "off" else 4)
    kwargs = dict(
        in_chans=chans,
        img_size=size,
        num_classes=classes,
        conv_stem=stem,
        patch_size=patch,
        embed_dim=32,
        depth=1,
        num_heads=4,
    )
    if feature % patch:
        with pytest.raises(UsageError, match="does not divide"):
            ModelConfig(**kwargs)
        return
    cfg = ModelConfig(**kwargs)
    model = NKATViT(cfg).eval()
    out = model(torch.randn(2, chans, size, size))
    assert out.shape == (2, classes)
    assert model.pos_embed.shape[1] == (feature // patch) ** 2 + 1


@pytest.mark.parametrize(
    "img, stem, patch, expected",
    [
        (32, "tiny", 2, 2),
        (32, "off", 4, 4),
        (28, "tiny", 2, 1),
        (28, "tiny", 4, 1),
        (28, "off", 4, 4),
        (28, "off", 2, 2),
        (28, "small", 4, 1),
    ],
)
def test_adapt_patch_size_picks_largest_divisor_not_above_request(img, stem, patch, expected):
    assert adapt_patch_size(img, stem, patch) == expected


def test_top_k_keeps_exactly_k_keys():
    logits = torch.randn(2, 3, 5, 9)
    mask = nucleus_mask(logits, top_k=4, top_p=1.0)
    assert (mask.sum(-1) == 4).all()
    kept_min = logits.masked_fill(~mask, float("inf")).amin(-1)
    dropped_max = logits.masked_fill(mask, float("-inf")).amax(-1)
    assert (kept_min > dropped_max).all()


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    logits = probs.log()[None]
    # cumulative 0.5, 0.75, 0.90, 0.97: p=0.8 needs the first three, p=0.75 the first two
    assert nucleus_mask(logits, 0, 0.80).tolist() == [[True, True, True, False, False]]
    assert nucleus_mask(logits, 0, 0.75).tolist() == [[True, True, False, False, False]]
    assert nucleus_mask(logits, 0, 0.3).tolist() == [[True, False, False, False, False]]
    # top-k first, then the nucleus of what top-k kept, renormalised: the top 3 hold 0.9, so the
    # first two hold 0.75 / 0.9 = 0.83 >= 0.8 of it; the top 2 hold 0.75, the first 0.5 / 0.75 = 0.67.
    assert nucleus_mask(logits, 3, 0.80).tolist() == [[True, True, False, False, False]]
    assert nucleus_mask(logits, 2, 0.60).tolist() == [[True, False, False, False, False]]


@pytest.mark.parametrize("ties", [False, True])
def test_rank_counting_gives_the_same_mask_as_topk(ties):
    # 1,000 seeded draws over every key count the rank path serves (1..32), top-k off, inside and
    # beyond the key count, top-p off and on; with ties, logits rounded to a coarse grid so that
    # equal logits, at the k-th value too, are common.
    gen = torch.Generator().manual_seed(7 + ties)
    for _ in range(1000):
        n = int(torch.randint(1, 33, (), generator=gen))
        logits = torch.randn(2, 3, n, generator=gen) * float(torch.rand((), generator=gen) * 4 + 0.1)
        if ties:
            logits = (logits * 2).round() / 2
        top_k = int(torch.randint(0, n + 2, (), generator=gen))
        top_p = 1.0 if torch.rand((), generator=gen) < 0.2 else float(torch.rand((), generator=gen) * 0.98 + 0.01)
        assert torch.equal(rank_mask(logits, top_k, top_p), topk_mask(logits, top_k, top_p)), (logits, top_k, top_p)


def _explicit_attention(attn: NKATAttention, x: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    b, n, d = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-2, -1)) * attn.head_dim**-0.5 / attn.temperature
    logits = logits.masked_fill(~nucleus_mask(logits, top_k, top_p), float("-inf"))
    return attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.8), (6, 0.8), (0, 1.0)])
def test_attention_is_the_same_in_train_and_eval_mode(top_k, top_p):
    cfg = ModelConfig(embed_dim=32, num_heads=4, depth=1, top_k=top_k, top_p=top_p, nkat_strength=0, dropout_attn=0.0)
    attn = NKATAttention(cfg, layer=0)
    assert attn.fused == (top_k == 0 and top_p == 1.0)
    x = torch.randn(2, 10, 32)
    expected = _explicit_attention(attn, x, top_k, top_p)
    torch.testing.assert_close(attn.train()(x), expected)
    torch.testing.assert_close(attn.eval()(x), expected)


def test_nkat_modulation_changes_attention_and_is_off_at_strength_zero():
    torch.manual_seed(0)
    cfg = ModelConfig(embed_dim=32, num_heads=4, depth=1, top_k=0, top_p=1.0, nkat_strength=0.5, dropout_attn=0)
    attn = NKATAttention(cfg, layer=0).eval()
    torch.nn.init.normal_(attn.theta.weight, std=1.0)
    x = torch.randn(2, 10, 32)
    plain = _explicit_attention(attn, x, 0, 1.0)
    assert not torch.allclose(attn(x), plain, atol=1e-5)
    attn.strength = 0.0
    torch.testing.assert_close(attn(x), plain)


def test_attention_maps_are_distributions_over_patches():
    cfg = ModelConfig(embed_dim=32, num_heads=4, depth=2, top_k=0, top_p=1.0, nkat_strength=0)
    maps = NKATViT(cfg).eval().attention_maps(torch.randn(3, 3, 32, 32))
    assert maps.shape == (2, 3, 16)
    assert (maps >= 0).all() and (maps.sum(-1) <= 1 + 1e-5).all()


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(embed_dim=100), "not divisible by num_heads"),
        (dict(top_p=0.0), "top_p must be in (0, 1]"),
        (dict(top_p=1.2), "top_p must be in (0, 1]"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(patch_size=3), "does not divide the 8x8 feature map"),
        (dict(conv_stem="huge"), "conv_stem 'huge' is unknown"),
        (dict(top_k=-1), "top_k must be >= 0"),
    ],
)
def test_bad_model_config_is_one_clear_sentence(kwargs, words):
    with pytest.raises(UsageError) as err:
        ModelConfig(**kwargs)
    assert words in str(err.value)


def test_grayscale_input_is_not_erased_by_the_colour_norm():
    # A LayerNorm over one channel maps every pixel to its bias: the model must not apply it.
    cfg = ModelConfig(
        in_chans=1,
        img_size=28,
        num_classes=10,
        conv_stem="off",
        patch_size=7,
        embed_dim=32,
        depth=1,
        num_heads=4,
        nkat_strength=0,
        dropout_embed=0,
        dropout_attn=0,
    )
    model = NKATViT(cfg).eval()
    a, b = torch.zeros(1, 1, 28, 28), torch.ones(1, 1, 28, 28)
    assert not torch.allclose(model(a), model(b))
