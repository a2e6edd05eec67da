"""Config dataclasses check their own fields: types, finiteness, ranges, one sentence each."""

import math

import pytest

from nkat_search.config import DataConfig, ModelConfig, TrainConfig, UsageError
from nkat_search.search.kinds import (
    HyperbandPrunerConfig,
    MedianPrunerConfig,
    RandomSamplerConfig,
    TPESamplerConfig,
)


@pytest.mark.parametrize(
    "cls, kwargs, words",
    [
        (ModelConfig, dict(depth=True), "depth must be a whole number, got True"),
        (ModelConfig, dict(depth=2.0), "depth must be a whole number"),
        (ModelConfig, dict(embed_dim="64"), "embed_dim must be a whole number"),
        (ModelConfig, dict(temperature=math.nan), "temperature must be a finite number"),
        (ModelConfig, dict(nkat_strength=math.inf), "nkat_strength must be a finite number"),
        (ModelConfig, dict(color_norm=1), "color_norm must be true or false"),
        (ModelConfig, dict(num_heads=0), "num_heads must be at least 1, got 0"),
        (ModelConfig, dict(embed_dim=100, num_heads=8), "use a positive multiple of 8"),
        (ModelConfig, dict(patch_size=3), "pick a divisor of 8 (1, 2, 4, 8)"),
        (TrainConfig, dict(randaugment=(2,)), "randaugment must be a list of 2 whole numbers"),
        (TrainConfig, dict(randaugment=(2, 9.5)), "randaugment must be a list of 2 whole numbers"),
        (TrainConfig, dict(lr=-1e-3), "lr must be > 0"),
        (TrainConfig, dict(mixup_prob=1.5), "mixup_prob is a probability"),
        (TrainConfig, dict(cutout=-1), "cutout must be >= 0"),
        (DataConfig, dict(val_size=0), "val_size must be at least 1"),
        (DataConfig, dict(download="yes"), "download must be true or false"),
        (TPESamplerConfig, dict(seed="abc"), "seed must be a whole number or absent, got 'abc'"),
        (MedianPrunerConfig, dict(n_startup_trials=-1), "must be >= 0"),
        (HyperbandPrunerConfig, dict(reduction_factor=1), "reduction_factor >= 2"),
        # A width below 1 is said as such, not as a divisibility problem.
        (ModelConfig, dict(embed_dim=0), "embed_dim must be at least 1, got 0"),
        (ModelConfig, dict(embed_dim=-8, num_heads=4), "embed_dim must be at least 1, got -8"),
        # Whole numbers fit in 64 bits; sizes far beyond any model are refused before torch sees them.
        (TrainConfig, dict(seed=2**63), "does not fit in 64 bits"),
        (TrainConfig, dict(seed=-(2**63) - 1), "does not fit in 64 bits"),
        (DataConfig, dict(split_seed=10**30), "split_seed 100000000000... (31 digits) does not fit in 64 bits"),
        (TrainConfig, dict(randaugment=(2, 10**20)), "randaugment 100000000000... (21 digits) does not fit"),
        (ModelConfig, dict(depth=10**6), "depth 1000000 is far beyond"),
        (ModelConfig, dict(embed_dim=2**20, num_heads=8), "embed_dim 1048576 is far beyond"),
        (ModelConfig, dict(mlp_ratio=1e6), "mlp_ratio 1000000.0 is far beyond"),
        (TrainConfig, dict(cutout=10**5), "cutout 100000 is far beyond"),
        (TrainConfig, dict(crop_padding=10**5), "crop_padding 100000 is far beyond"),
        (TrainConfig, dict(randaugment=(1000, 9)), "0 <= N <= 16"),
        (DataConfig, dict(source="synthetic", synthetic_train=10**10), "synthetic_train 10000000000 is far beyond"),
        (DataConfig, dict(val_size=10**10), "val_size 10000000000 is far beyond"),
        (TPESamplerConfig, dict(seed=-1), "seed must be in 0..4294967295"),
        (RandomSamplerConfig, dict(seed=2**32), "seed must be in 0..4294967295"),
    ],
)
def test_a_bad_field_is_one_sentence_naming_it(cls, kwargs, words):
    with pytest.raises(UsageError) as err:
        cls(**kwargs)
    message = str(err.value)
    assert words in message and message.endswith(".") and "\n" not in message


def test_the_largest_values_allowed_still_make_configs():
    assert TrainConfig(seed=2**63 - 1).seed == 2**63 - 1 and TrainConfig(seed=-(2**63)).seed == -(2**63)
    assert TPESamplerConfig(seed=2**32 - 1).seed == 2**32 - 1
    assert ModelConfig(embed_dim=16384, num_heads=8, depth=1, mlp_ratio=64.0).mlp_ratio == 64.0
    assert TrainConfig(cutout=32, crop_padding=32, randaugment=(16, 30)).randaugment == (16, 30)


def test_numbers_are_conformed_where_the_meaning_is_clear():
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)
    assert TrainConfig(randaugment=[1, 5]).randaugment == (1, 5)
    assert DataConfig(source="synthetic", synthetic_train=600).validation_images == 60
    assert DataConfig().validation_images == 5000
