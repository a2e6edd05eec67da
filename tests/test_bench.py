"""bench: every section runs with tiny settings and reports positive figures; the research-style
reference computes the same function as our model; the timed step is the one fit() runs."""

import json

import pytest
import torch

from nkat_search import bench, cli, train
from nkat_search.config import DataConfig, ModelConfig, TrainConfig
from nkat_search.data import load_splits
from nkat_search.model import NKATViT, nucleus_mask

TINY = ModelConfig(embed_dim=32, depth=2, num_heads=4)


@pytest.fixture(scope="module")
def splits():
    return bench.synthetic_splits("cifar10", 64, 32, torch.device("cpu"))


def test_research_filter_keeps_the_same_keys_as_nucleus_mask():
    torch.manual_seed(0)
    logits = torch.randn(4, 8, 17, 17) * 3
    for top_k, top_p in [(6, 0.8), (0, 0.8), (6, 1.0), (3, 0.5), (17, 0.95)]:
        kept = torch.isfinite(bench.research_filter(logits, top_k, top_p))
        assert torch.equal(kept, nucleus_mask(logits, top_k, top_p)), (top_k, top_p)


@pytest.mark.parametrize("kwargs", [{}, {"split_heads": True}, {"nkat_strength": 2.0},
                                    {"top_k": 0, "top_p": 1.0, "nkat_strength": 0.0}])
def test_research_model_computes_the_same_function(kwargs):
    # Our model folds the modulation into the logits and computes only the class token in its
    # last block; the reference does neither. Same weights must give the same outputs.
    cfg = ModelConfig(embed_dim=32, depth=2, num_heads=4, **kwargs)
    ours = NKATViT(cfg).eval()
    for block in ours.blocks:
        if block.attn.theta is not None:
            torch.nn.init.normal_(block.attn.theta.weight, std=1.0)
    reference = bench.research_model(cfg).eval()
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(ours(x), reference(x))


def test_fit_trains_through_train_step(monkeypatch):
    calls = []
    original = train.TrainStep.__call__

    def counting(self, images, targets):
        calls.append(len(images))
        return original(self, images, targets)

    monkeypatch.setattr(train.TrainStep, "__call__", counting)
    splits = load_splits("cifar10", DataConfig(source="synthetic", val_size=16, synthetic_train=80, synthetic_test=8))
    result = train.fit(TINY, TrainConfig(epochs=1, warmup=0, batch_size=16, limit_train=3), splits)
    assert calls == [16, 16, 16] and result.images_per_second > 0


def test_train_figures_side_by_side(splits):
    out = bench.bench_train(TINY, TrainConfig(batch_size=16), splits, steps=1, warmup=1, repeats=1)
    assert set(out["variants"]) == {"real", "bare", "research"}
    for figure in out["variants"].values():
        assert figure["img_per_s"] > 0 and figure["precision"] == "float32"
    assert out["real_over_bare_cost"] > 0 and out["real_over_research_speed"] > 0
    assert out["memory"]["kind"] == "cpu_max_rss" and out["memory"]["mib"] > 0


def test_augment_and_eval_figures(splits):
    aug = bench.bench_augment(splits, TrainConfig(), batch=32, images=64, repeats=1)
    assert aug["batched"]["img_per_s"] > 0 and aug["pil"]["img_per_s"] > 0 and aug["speedup"] > 0
    ev = bench.bench_eval(TINY, splits, batch=16, repeats=1, precision="auto")
    assert ev["img_per_s"] > 0 and ev["precision"] == "float32"  # auto is fp32 on the CPU


def test_storage_latency_on_a_journal(tmp_path):
    out = bench.bench_storage(f"journal:{tmp_path / 'b.journal'}", procs=2, ops=2)
    assert 0 < out["p50_ms"] <= out["p95_ms"] and out["procs"] == 2


def test_command_prints_one_json_object(capsys):
    args = cli.build_parser().parse_args(["bench", "--json", "--only", "eval", "--embed-dim", "32", "--depth", "1",
                              "--eval-images", "16", "--images", "16", "--batch-size", "16", "--repeats", "1"])
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["eval"]["img_per_s"] > 0 and result["config"]["batch_size"] == 16
