"""fit(): the per-epoch callback, NaN handling, reproducibility, explicit truncation, the precision
`auto` picks and why, the phases a timer is charged."""

import pytest
import torch

from nkat_search import devices, iteration, train
from nkat_search.config import DataConfig, ModelConfig, TrainConfig, UsageError, replace
from nkat_search.data.loader import load_splits
from nkat_search.devices import choose_precision
from nkat_search.metrics import local_tpe
from nkat_search.train import NonFiniteLossError, Timings, fit, warmup_cosine

TINY = ModelConfig(embed_dim=16, depth=1, num_heads=2)
# fp32: bit-reproducible on every CPU (auto would pick bf16 where the CPU has it natively).
RECIPE = TrainConfig(epochs=2, warmup=1, batch_size=64, precision="fp32")
ONE_EPOCH = TrainConfig(epochs=1, warmup=0, batch_size=64, precision="fp32")


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
    c = fit(TINY, TrainConfig(epochs=2, warmup=1, batch_size=64, seed=1, precision="fp32"), splits)
    assert c.history[-1]["train_loss"] != a.history[-1]["train_loss"]


def test_nan_loss_stops_the_run_with_a_catchable_error(splits):
    with pytest.raises(NonFiniteLossError, match=r"became (nan|inf) in epoch \d"):
        fit(TINY, TrainConfig(epochs=2, warmup=0, batch_size=64, lr=1e20, clip_grad=0, precision="fp32"), splits)


@pytest.mark.parametrize("limit, steps_per_epoch", [(2, 2), (0, 4)])  # 256 training images, batch 64
def test_limit_train_stops_each_epoch_after_that_many_batches_and_says_so(splits, monkeypatch, limit, steps_per_epoch):
    steps = []
    original = train.TrainStep.__call__
    monkeypatch.setattr(train.TrainStep, "__call__", lambda self, x, y: steps.append(len(x)) or original(self, x, y))
    cfg = TrainConfig(epochs=2, warmup=0, batch_size=64, limit_train=limit, precision="fp32")
    result = fit(TINY, cfg, splits)
    assert steps == [64] * (2 * steps_per_epoch)
    assert result.summary()["limit_train"] == limit  # a truncated run is never mistaken for a full one


def test_test_split_is_used_only_when_asked(splits):
    assert fit(TINY, ONE_EPOCH, splits).test_accuracy is None
    assert fit(TINY, ONE_EPOCH, splits, eval_test=True).test_accuracy is not None


def test_summary_has_the_documented_json_fields(splits):
    summary = fit(TINY, ONE_EPOCH, splits).summary()
    for key in "dataset accuracy test_accuracy params lambda local_tpe epochs seconds images_per_second precision device graphs".split():  # the documented fields
        assert key in summary
    assert summary["lambda"] == summary["params"] / 1e6
    assert summary["precision"] == "float32" and summary["device"] == "cpu"


def test_schedule_warms_up_linearly_then_decays_to_zero():
    f = warmup_cosine(warmup_steps=4, total_steps=12)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(8) == pytest.approx(0.5) and f(12) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(4, 12))


@pytest.mark.parametrize("warmup, total", [(4, 12), (0, 5), (3, 3)])
def test_the_schedule_on_the_device_is_warmup_cosine_and_adamw_reads_it(warmup, total):
    model = torch.nn.Linear(2, 2)
    lr = torch.tensor(0.01)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    schedule, f = train.DeviceSchedule(lr, warmup, total), warmup_cosine(warmup, total)
    seen = []
    for _ in range(total + 2):
        seen.append(float(optimizer.param_groups[0]["lr"]))  # the learning rate AdamW steps with
        schedule.step()
    assert seen == pytest.approx([0.01 * f(s) for s in range(total + 2)], abs=1e-8)


def test_ema_weight_warms_up_per_update_from_its_counter_on_the_device():
    model = torch.nn.Linear(2, 2)
    ema = train.EMA(model, 0.9)
    for n in range(1, 25):
        before = ema.module.weight.clone()
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update()
        weight = 1 - min(0.9, (1 + n) / (10 + n))
        assert torch.allclose(ema.module.weight, before + weight * (model.weight - before), atol=1e-5)
    assert float(ema.updates) == 24


def test_graphs_auto_trains_eagerly_off_cuda_and_the_result_says_so(splits):
    assert fit(TINY, ONE_EPOCH, splits).graphs == "off (auto: eager on cpu)"
    assert fit(TINY, replace(ONE_EPOCH, graphs="off"), splits).graphs == "off"
    with pytest.raises(UsageError, match="graphs 'on' is unknown; use one of auto, off"):
        TrainConfig(graphs="on")
    cuda = torch.device("cuda")
    assert iteration.graph_plan("auto", cuda, None) == (True, "on")
    assert iteration.graph_plan("off", cuda, None) == (False, "off")
    assert iteration.graph_plan("auto", cuda, "reduce-overhead")[0] is False
    assert iteration.graph_plan("auto", torch.device("mps"), None) == (False, "off (auto: eager on mps)")


CPUINFO = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse avx2 avx512f {extra}\n"


@pytest.mark.parametrize(
    "extra, found",
    [
        ("", ()),
        ("avx512_bf16", ("avx512_bf16",)),
        ("amx_tile amx_bf16", ("amx_bf16",)),
        ("avx512_bf16 amx_bf16", ("avx512_bf16", "amx_bf16")),
    ],
)
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, extra, found):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(extra=extra))
    assert devices.cpu_bf16_flags(str(path)) == found


def test_without_a_cpuinfo_the_flags_are_unknown(tmp_path):
    assert devices.cpu_bf16_flags(str(tmp_path / "absent")) is None


@pytest.mark.parametrize(
    "precision, device, flags, dtype, why",
    [
        ("auto", "cpu", ("avx512_bf16",), torch.bfloat16, "native bf16 (avx512_bf16)"),
        ("auto", "cpu", ("amx_bf16",), torch.bfloat16, "native bf16 (amx_bf16)"),
        ("auto", "cpu", (), None, "no native bf16"),
        ("auto", "cpu", None, None, "does not show the CPU's flags"),
        ("auto", "cuda", (), torch.bfloat16, "CUDA"),
        ("auto", "mps", ("avx512_bf16",), None, "fp32 on mps"),
        ("fp32", "cpu", ("avx512_bf16",), None, "fp32 asked for"),
        ("bf16", "cpu", (), torch.bfloat16, "bf16 asked for"),
    ],
)
def test_auto_precision_is_bf16_only_where_the_hardware_has_it(monkeypatch, precision, device, flags, dtype, why):
    monkeypatch.setattr(devices, "cpu_bf16_flags", lambda: flags)
    got, reason = choose_precision(precision, torch.device(device))
    assert got == dtype and why in reason


def test_the_result_names_the_precision_auto_chose(splits):
    result = fit(TINY, TrainConfig(epochs=1, warmup=0, batch_size=64, limit_train=1), splits)
    dtype, _ = choose_precision("auto", torch.device("cpu"))
    assert result.precision == str(dtype or torch.float32).removeprefix("torch.")


def test_a_timer_is_charged_each_phase_of_fit_and_they_add_up(splits):
    timer, seen = Timings(), []

    def on_epoch(epoch, accuracy, tpe):
        with timer.phase("storage"):  # nested inside "epoch callback": charged to itself only
            seen.append(epoch)

    with timer.phase("outside"):
        fit(TINY, RECIPE, splits, on_epoch=on_epoch, timer=timer)
    phases, cpu = timer.snapshot()
    assert set(cpu) == set(phases)
    assert {"model build", "train steps", "evaluation", "epoch callback", "storage", "outside"} == set(phases)
    assert timer.calls["train steps"] == timer.calls["evaluation"] == timer.calls["storage"] == 2 and seen == [1, 2]
    assert all(seconds >= 0 for seconds in phases.values())


def test_nested_phases_are_charged_to_themselves_only(monkeypatch):
    clock = iter(range(100))

    class FakeTime:
        perf_counter = staticmethod(lambda: next(clock))
        process_time = staticmethod(lambda: 0.0)

    monkeypatch.setattr(train, "time", FakeTime)
    timer = Timings()
    with timer.phase("outer"):  # starts at 0
        with timer.phase("inner"):  # 1 .. 2
            pass
    # outer ends at 3: 3 s in all, 1 of them inner's
    assert dict(timer.seconds) == {"inner": 1, "outer": 2}


def test_evaluation_batches_are_large_and_do_not_change_the_accuracy(splits):
    assert train.eval_batch(TrainConfig(batch_size=64)) == train.MIN_EVAL_BATCH
    assert train.eval_batch(TrainConfig(batch_size=4096)) == 4096
    model = fit(TINY, ONE_EPOCH, splits).model
    accuracies = {train.evaluate(model, splits.val_x, splits.val_y, splits, batch, None) for batch in (16, 64, 512)}
    assert len(accuracies) == 1


def test_a_compile_mode_compiles_the_step_model():
    cfg = TrainConfig(epochs=1, warmup=0, batch_size=8, precision="fp32")
    plain = train.TrainStep(TINY, cfg, torch.device("cpu"), 1)
    graphs = train.TrainStep(TINY, cfg, torch.device("cpu"), 1, compile_mode="reduce-overhead")
    assert plain.step_model is plain.model
    assert (
        graphs.step_model is not graphs.model and graphs.step_model._orig_mod is graphs.model
    )  # torch.compile's wrapper
