"""Config dataclasses check their own fields: types, finiteness, ranges, one sentence each."""

import math

import pytest

from nkat_search.config import (DataConfig, HyperbandPrunerConfig, MedianPrunerConfig, ModelConfig, TPESamplerConfig,
                                TrainConfig, UsageError)


@pytest.mark.parametrize("cls, kwargs, words", [
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
])
def test_a_bad_field_is_one_sentence_naming_it(cls, kwargs, words):
    with pytest.raises(UsageError) as err:
        cls(**kwargs)
    message = str(err.value)
    assert words in message and message.endswith(".") and "\n" not in message


def test_numbers_are_conformed_where_the_meaning_is_clear():
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)
    assert TrainConfig(randaugment=[1, 5]).randaugment == (1, 5)
    assert DataConfig(source="synthetic", synthetic_train=600).validation_images == 60
    assert DataConfig().validation_images == 5000
