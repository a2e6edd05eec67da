"""Study files: the shipped ones load, and every kind of mistake is one sentence naming file and key."""

import pytest
from helpers import ROOT, TINY_STUDY, cli

from nkat_search.config import TrainConfig, UsageError
from nkat_search.search.kinds import sampler
from nkat_search.search.study_file import StudyConfig, load_study


@pytest.mark.parametrize("name", ["round2", "smoke"])
def test_shipped_study_files_load_and_round_trip_through_the_storage_definition(name):
    study = load_study(str(ROOT / "nkat_search" / "studies" / f"{name}.toml"))
    assert study.stage1_dataset == "cifar10"
    assert study.stage2_datasets == ("mnist", "fashion_mnist", "emnist_letters")
    assert StudyConfig.from_definition(study.definition()).definition() == study.definition()


def test_round2_is_the_research_search_space():
    study = load_study(str(ROOT / "nkat_search" / "studies" / "round2.toml"))
    space = {p.name: p for p in study.space}
    assert space["patch_size"].choices == (2, 4)
    assert space["conv_stem"].choices == ("off", "tiny", "small")
    assert (space["embed_dim"].low, space["embed_dim"].high, space["embed_dim"].step) == (384, 512, 64)
    assert (space["depth"].low, space["depth"].high) == (5, 9)
    assert (space["temperature"].low, space["temperature"].high) == (0.6, 1.0)
    assert (space["top_p"].low, space["top_p"].high) == (0.80, 0.95)
    assert space["lr"].log and study.gate == 0.60 and study.data.source == "torchvision"
    assert study.trials == 50 and study.report_epochs == 40


BASE = TINY_STUDY.format(name="bad", trials=3, gate=0.5)


@pytest.mark.parametrize(
    "edit, key, words",
    [
        (lambda s: s + "\n[extra]\nx = 1\n", "extra", "unknown section"),
        (lambda s: s.replace("epochs = 1\ngate", "epoch = 1\ngate"), "stage1.epoch", "unknown key"),
        (
            lambda s: s.replace("low = 0.6\nhigh = 1.0", "low = 1.0\nhigh = 0.6"),
            "space.temperature",
            "empty or inverted",
        ),
        (lambda s: s.replace("low = 8\nhigh = 16", "low = 16\nhigh = 16"), "space.embed_dim", "empty or inverted"),
        (
            lambda s: s + '\n[space.wingspan]\ntype = "int"\nlow = 1\nhigh = 2\n',
            "space.wingspan",
            "not a parameter of the model",
        ),
        (lambda s: s.replace("gate = 0.5", "gate = 0"), "stage1.gate", "(0, inf)"),
        (lambda s: s.replace("gate = 0.5", "gate = -1.0"), "stage1.gate", "(0, inf)"),
        (
            lambda s: s.replace('datasets = ["mnist"]', 'datasets = ["svhn"]'),
            "stage2.datasets",
            "unknown dataset 'svhn'",
        ),
        (lambda s: s.replace('dataset = "cifar10"', 'dataset = "imagenet"'), "stage1.dataset", "unknown dataset"),
        (
            lambda s: s.replace("low = 0.6\nhigh = 1.0", "low = 0.0\nhigh = 1.0"),
            "space.temperature",
            "temperature must be > 0",
        ),
        (lambda s: s.replace("trials = 3", "trials = 0"), "study.trials", "positive whole number"),
        (lambda s: s.replace('kind = "none"', 'kind = "sometimes"'), "pruner.kind", "unknown pruner"),
        (lambda s: s + '\n[space.top_p]\ntype = "float"\nlow = 0.8\nhigh = 1.5\n', "space.top_p", "top_p must be in"),
        (lambda s: s.replace('type = "float"', 'type = "real"'), "space.temperature", "needs type"),
        (lambda s: s.replace("[train]\n", "[train]\nepochz = 3\n"), "train.epochz", "unknown key"),
        (lambda s: s.replace('name = "bad"', 'name = ""'), "study.name", "must be a name of letters"),
        (lambda s: s.replace("trials = 3", "trials = true"), "study.trials", "positive whole number"),
        (lambda s: s.replace("seed = 0", 'seed = "abc"'), "sampler", "seed must be a whole number or absent"),
        (lambda s: s.replace('datasets = ["mnist"]', "datasets = 5"), "stage2.datasets", "must be a list"),
        (lambda s: s.replace("step = 8", "step = 0.5"), "space.embed_dim", "step must be a whole number"),
        (
            lambda s: s.replace("low = 8\nhigh = 16\nstep = 8", "low = 8\nhigh = 20\nstep = 6").replace(
                "num_heads = 2", "num_heads = 4"
            ),
            "space.embed_dim",
            "embed_dim 14 is not divisible by num_heads 4",
        ),
        (
            lambda s: s + '\n[space.patch_size]\ntype = "categorical"\nchoices = [2, 3]\n',
            "space",
            "patch_size 3 does not divide",
        ),
        (lambda s: s + '\n[space.epochs]\ntype = "int"\nlow = 1\nhigh = 3\n', "space.epochs", "not searched"),
        (
            lambda s: s.replace('kind = "none"', 'kind = "hyperband"\nn_startup_trials = 5'),
            "pruner.n_startup_trials",
            "not a setting of the hyperband pruner",
        ),
        (lambda s: s.replace("[train]\n", "[train.svhn]\nlr = 1e-3\n\n[train]\n"), "train", "unknown key"),
        (
            lambda s: s.replace("[train]\n", "[train.mnist]\nlr = nan\n\n[train]\n"),
            "train.mnist",
            "lr must be a finite",
        ),
        (lambda s: s + "\n[[enqueue]]\nembed_dim = 64\n", "enqueue[0].embed_dim", "outside the searched space"),
        (lambda s: s + "\n[[enqueue]]\ndepth = 2\n", "enqueue[0].depth", "not a searched parameter"),
        (lambda s: s.replace('name = "bad"', 'name = "../escape"'), "study.name", "no spaces or slashes"),
        # Wrong types where a word goes: a list or a table is named, never a TypeError.
        (lambda s: s.replace('kind = "none"', 'kind = ["none"]'), "pruner.kind", "unknown pruner ['none']"),
        (lambda s: s.replace('kind = "tpe"', "kind = {x = 1}"), "sampler.kind", "unknown sampler {'x': 1}"),
        (lambda s: s.replace('type = "float"', 'type = {a = "float"}'), "space.temperature", "needs type"),
        (lambda s: s.replace('type = "int"', "type = 3"), "space.embed_dim", "needs type"),
        # Every value a range can give is checked: the interior of a log range, floats of a float range.
        (
            lambda s: s.replace("low = 8\nhigh = 16\nstep = 8", "low = 12\nhigh = 24\nlog = true").replace(
                "num_heads = 2", "num_heads = 3"
            ),
            "space.embed_dim",
            "embed_dim 13 is not divisible by num_heads 3",
        ),
        (
            lambda s: s.replace("low = 8\nhigh = 16\nstep = 8", "low = 8\nhigh = 4096\nlog = true"),
            "space.embed_dim",
            "embed_dim 9 is not divisible by num_heads 2",
        ),
        (lambda s: s.replace('type = "int"', 'type = "float"'), "space.embed_dim", "embed_dim must be a whole number"),
        (
            lambda s: s.replace("[space.temperature]", "[space.mlp_ratio]").replace("low = 0.6", "low = 0.05"),
            "space",
            "{'embed_dim': 8, 'mlp_ratio': 0.05} are invalid together: mlp_ratio must be > 0",
        ),
        (
            lambda s: (
                s.replace("[space.temperature]", "[space.mlp_ratio]")
                .replace("low = 0.6", "low = 0.1")
                .replace("num_heads = 2", "num_heads = 2\nembed_dim = 4")
                .replace('[space.embed_dim]\ntype = "int"\nlow = 8\nhigh = 16\nstep = 8\n', "")
            ),
            "space.mlp_ratio",
            "mlp_ratio must be > 0",
        ),
        # A quoted key may hold a line break; the message stays one line.
        (lambda s: s.replace("[train]\n", '[train]\n"warm\\nup" = 1\n'), "'train.warm\\nup'", "unknown key"),
        (
            lambda s: s + '\n["space"."a\\rb"]\ntype = "int"\nlow = 1\nhigh = 2\n',
            "'space.a\\rb'",
            "not a parameter of the model",
        ),
    ],
)
def test_bad_study_file_is_one_sentence_naming_file_and_key(tmp_path, edit, key, words):
    path = tmp_path / "bad.toml"
    path.write_text(edit(BASE))
    with pytest.raises(UsageError) as err:
        load_study(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}: {key}") and words in message, message
    assert "\n" not in message and message.endswith(".")


def test_malformed_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[study\nname = 1")
    with pytest.raises(UsageError, match="is not valid TOML"):
        load_study(str(path))


def test_cli_refuses_a_bad_study_with_exit_2_and_writes_nothing(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(BASE.replace("low = 0.6\nhigh = 1.0", "low = 1.0\nhigh = 0.6"))
    journal = tmp_path / "s.journal"
    run = cli("start", "--study", str(path), "--storage", f"journal:{journal}", "--workers", "0")
    assert run.returncode == 2
    assert "space.temperature" in run.stderr and "Traceback" not in run.stderr
    assert not journal.exists()


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(epochs=0), "epochs must be at least 1"),
        (dict(ema=1.0), "ema must be in [0, 1)"),
        (dict(cutmix=1.5), "cutmix is a probability"),
        (dict(randaugment=(2, 40)), "randaugment N M"),
        (dict(precision="fp8"), "precision 'fp8' is unknown"),
    ],
)
def test_bad_recipe_is_one_clear_sentence(kwargs, words):
    with pytest.raises(UsageError) as err:
        TrainConfig(**kwargs)
    assert words in str(err.value)


def test_recipe_per_dataset_and_stage2_and_parameters_per_dataset(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(
        BASE.replace('datasets = ["mnist"]', 'datasets = ["mnist", "emnist_letters"]').replace(
            "[train]\n", "[stage2.train]\ncutmix = 0.0\nrandaugment = [1, 5]\n\n[train.mnist]\ncutout = 0\n\n[train]\n"
        )
        + '\n[space.lr]\ntype = "float"\nlow = 1e-3\nhigh = 2e-3\ndatasets = ["cifar10"]\n'
    )
    study = load_study(str(path))
    params = {"embed_dim": 16, "temperature": 0.7, "lr": 1.5e-3}
    _, cifar = study.configs_for(params, "cifar10", 2)
    _, mnist = study.configs_for(params, "mnist", 1)
    _, letters = study.configs_for(params, "emnist_letters", 1)
    assert (cifar.lr, cifar.cutmix, cifar.cutout, cifar.epochs) == (1.5e-3, 0.2, 8, 2)
    assert (mnist.lr, mnist.cutmix, mnist.randaugment, mnist.cutout) == (study.train.lr, 0.0, (1, 5), 0)
    assert (letters.cutmix, letters.cutout) == (0.0, 8)
    again = StudyConfig.from_definition(study.definition(), trials=3)
    assert again.definition() == study.definition() and again.recipe("mnist") == study.recipe("mnist")


def test_searched_patch_size_is_the_one_trained_on_the_stage1_dataset_and_adapted_elsewhere(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(BASE + '\n[space.patch_size]\ntype = "categorical"\nchoices = [2, 4]\n')
    study = load_study(str(path))
    cifar, _ = study.configs_for({"patch_size": 4, "embed_dim": 8, "temperature": 0.7}, "cifar10", 1)
    mnist, _ = study.configs_for({"patch_size": 4, "embed_dim": 8, "temperature": 0.7}, "mnist", 1)
    assert cifar.patch_size == 4 and mnist.patch_size == 1  # 7x7 feature map after the tiny stem


def test_packaged_study_by_name_and_unknown_name():
    assert load_study("smoke").name == load_study(str(ROOT / "nkat_search" / "studies" / "smoke.toml")).name
    with pytest.raises(UsageError, match="neither a packaged study"):
        load_study("round3")


def test_round2_enqueues_the_research_baseline():
    (baseline,) = load_study("round2").enqueue
    assert baseline == {
        "patch_size": 2,
        "conv_stem": "tiny",
        "embed_dim": 384,
        "depth": 7,
        "temperature": 0.65,
        "top_p": 0.80,
        "top_k": 6,
        "nkat_strength": 0.0024,
        "dropout_attn": 0.17,
        "dropout_embed": 0.08,
        "lr": 2e-4,
        "mixup": 0.1,
        "cutmix": 0.2,
    }


def test_a_study_file_saved_with_a_byte_order_mark_reads_like_any_other(tmp_path):
    # Notepad and some other Windows editors save UTF-8 with a BOM, and with CRLF line endings.
    plain, marked = tmp_path / "plain.toml", tmp_path / "marked.toml"
    text = TINY_STUDY.format(name="bom", trials=3, gate=0.01)
    plain.write_text(text)
    marked.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    assert load_study(str(marked)).definition() == load_study(str(plain)).definition()


def test_a_trial_budget_beyond_64_bits_is_refused_in_one_sentence(tmp_path):
    path = tmp_path / "huge.toml"
    path.write_text(TINY_STUDY.format(name="huge", trials=10**20, gate=0.01))
    with pytest.raises(UsageError, match="study.trials: 100000000000000000000 does not fit in 64 bits"):
        load_study(str(path))


def test_graphs_is_stored_only_when_a_study_sets_it_so_older_studies_still_resume(tmp_path):
    """`graphs` came after studies were first stored: at its default it stays out of the stored
    definition (an older study's definition still matches); set, it is stored and read back."""
    plain = load_study("smoke")
    assert "graphs" not in plain.definition()["train"] and plain.train.graphs == "auto"
    path = tmp_path / "g.toml"
    path.write_text(BASE.replace("[train]\n", '[train]\ngraphs = "off"\n'))
    study = load_study(str(path))
    assert study.train.graphs == "off" and study.definition()["train"]["graphs"] == "off"
    assert StudyConfig.from_definition(study.definition()).train.graphs == "off"


def test_n_ei_candidates_is_stored_only_when_set_and_reaches_the_sampler(tmp_path):
    """`n_ei_candidates` came after studies were first stored: at Optuna's default it stays out of
    the stored definition; set, it is stored, read back and handed to the TPE sampler."""
    assert "n_ei_candidates" not in load_study(str(_write(tmp_path / "p.toml", BASE))).definition()["sampler"]
    study = load_study(
        str(_write(tmp_path / "n.toml", BASE.replace("[sampler]\n", "[sampler]\nn_ei_candidates = 6\n")))
    )
    assert study.definition()["sampler"]["n_ei_candidates"] == 6
    assert StudyConfig.from_definition(study.definition()).sampler.n_ei_candidates == 6
    assert sampler(study, trial_index=3)._n_ei_candidates == 6
    bad = _write(tmp_path / "b.toml", BASE.replace("[sampler]\n", "[sampler]\nn_ei_candidates = 0\n"))
    with pytest.raises(UsageError, match="n_ei_candidates must be >= 1"):
        load_study(str(bad))


def _write(path, text):
    path.write_text(text)
    return path
