"""fit(): the per-epoch callback, NaN handling, reproducibility, explicit truncation."""

import pytest

from nkat_search.config import DataConfig, ModelConfig, TrainConfig
from nkat_search.data import load_splits
from nkat_search.metrics import local_tpe
from nkat_search.train import NonFiniteLossError, fit, warmup_cosine

TINY = ModelConfig(embed_dim=16, depth=1, num_heads=2)
RECIPE = TrainConfig(epochs=2, warmup=1, batch_size=64)


@pytest.fixture(scope="module")
def splits():
    return load_splits("cifar10", DataConfig(source="synthetic", val_size=128, synthetic_train=384, synthetic_test=64))


def test_callback_gets_every_epoch_with_its_accuracy_and_tpe(splits):
    seen = []
    result = fit(TINY, RECIPE, splits, on_epoch=lambda e, acc, tpe: seen.append((e, acc, tpe)))
    assert [e for e, _, _ in seen] == [1, 2]
    for _, acc, tpe in seen:
        assert 0 <= acc <= 1
        assert tpe == pytest.approx(local_tpe(acc, result.params))
    assert result.accuracy == seen[-1][1] and result.epochs == 2
    # the validation split is evaluated whole: accuracy is a multiple of 1/128
    assert (result.accuracy * 128) == pytest.approx(round(result.accuracy * 128))


def test_callback_can_stop_training_by_raising(splits):
    class Stop(Exception):
        pass

    def stop(epoch, acc, tpe):
        raise Stop(epoch)

    with pytest.raises(Stop) as err:
        fit(TINY, RECIPE, splits, on_epoch=stop)
    assert err.value.args == (1,)


def test_same_config_seed_and_data_give_the_same_accuracy_twice(splits):
    a, b = fit(TINY, RECIPE, splits), fit(TINY, RECIPE, splits)
    assert a.accuracy == b.accuracy
    assert a.history[-1]["train_loss"] == b.history[-1]["train_loss"]
    c = fit(TINY, TrainConfig(epochs=2, warmup=1, batch_size=64, seed=1), splits)
    assert c.history[-1]["train_loss"] != a.history[-1]["train_loss"]


def test_nan_loss_stops_the_run_with_a_catchable_error(splits):
    with pytest.raises(NonFiniteLossError, match=r"became (nan|inf) in epoch \d"):
        fit(TINY, TrainConfig(epochs=2, warmup=0, batch_size=64, lr=1e20, clip_grad=0), splits)


def test_limit_train_is_explicit_and_recorded(splits):
    result = fit(TINY, TrainConfig(epochs=1, warmup=0, batch_size=64, limit_train=2), splits)
    assert result.limit_train == 2
    assert result.summary()["limit_train"] == 2


def test_test_split_is_used_only_when_asked(splits):
    assert fit(TINY, TrainConfig(epochs=1, warmup=0, batch_size=64), splits).test_accuracy is None
    assert fit(TINY, TrainConfig(epochs=1, warmup=0, batch_size=64), splits, eval_test=True).test_accuracy is not None


def test_summary_has_the_documented_json_fields(splits):
    summary = fit(TINY, TrainConfig(epochs=1, warmup=0, batch_size=64), splits).summary()
    for key in ("dataset", "accuracy", "test_accuracy", "params", "lambda", "local_tpe", "epochs", "seconds",
                "images_per_second", "precision", "device"):
        assert key in summary
    assert summary["lambda"] == summary["params"] / 1e6
    assert summary["precision"] == "float32" and summary["device"] == "cpu"


def test_schedule_warms_up_linearly_then_decays_to_zero():
    f = warmup_cosine(warmup_steps=4, total_steps=12)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(8) == pytest.approx(0.5) and f(12) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(4, 12))
