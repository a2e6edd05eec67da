"""Every sampler and pruner kind a study file may name runs a study, and each refuses the keys of
the other kinds at load, in one sentence."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import optuna
import pytest
from helpers import cli
from optuna.trial import TrialState

from nkat_search.config import UsageError
from nkat_search.search import studies
from nkat_search.search.kinds import PRUNERS, SAMPLERS
from nkat_search.search.space import suggest
from nkat_search.search.study_file import load_study
from nkat_search.search.worker import Worker, run_loop
from nkat_search.storage import backends

EPOCHS = 4
# Each kind with every key it takes, set so that a budget of 8 shows its effect.
SAMPLER_TABLES = {
    "tpe": 'kind = "tpe"\nseed = 0\nn_startup_trials = 2\nmultivariate = true\nconstant_liar = true',
    "random": 'kind = "random"\nseed = 0',
}
PRUNER_TABLES = {
    "none": 'kind = "none"',
    "median": 'kind = "median"\nn_startup_trials = 2\nn_warmup_steps = 1',
    "percentile": 'kind = "percentile"\npercentile = 25.0\nn_startup_trials = 2\nn_warmup_steps = 1',
    "hyperband": 'kind = "hyperband"\nmin_resource = 1\nreduction_factor = 3',
    "successive_halving": 'kind = "successive_halving"\nmin_resource = 1\nreduction_factor = 2\n'
    "min_early_stopping_rate = 0",
}
OPTUNA_CLASSES = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "none": optuna.pruners.NopPruner,
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
}


def with_tables(path: str, sampler: str | None = None, pruner: str | None = None, epochs: int = 1) -> str:
    """The tiny study file with its [sampler] and [pruner] tables replaced and its Stage-1 epochs set."""
    text = Path(path).read_text()
    if sampler is not None:
        text = re.sub(r"\[sampler\]\n(.+\n)+", f"[sampler]\n{sampler}\n", text)
    if pruner is not None:
        text = re.sub(r"\[pruner\]\n(.+\n)+", f"[pruner]\n{pruner}\n", text)
    text = text.replace("epochs = 1\ngate", f"epochs = {epochs}\ngate")
    Path(path).write_text(text)
    return path


def test_the_tables_cover_every_kind():
    assert set(SAMPLER_TABLES) == set(SAMPLERS) and set(PRUNER_TABLES) == set(PRUNERS) <= set(OPTUNA_CLASSES)


@pytest.mark.parametrize("pruner", PRUNER_TABLES)
@pytest.mark.parametrize("sampler", SAMPLER_TABLES)
def test_every_sampler_and_pruner_kind_runs_a_study_to_its_budget(sampler, pruner, tiny_study, tmp_path):
    path = with_tables(tiny_study(), SAMPLER_TABLES[sampler], PRUNER_TABLES[pruner], epochs=EPOCHS)
    url = f"journal:{tmp_path / 'study.journal'}"
    store = backends.open_storage(url)
    studies.create_or_resume(store, url, load_study(path), 8)
    study, config = studies.attach(store, url, "tiny")  # as a worker sees it: the kinds read back from the storage
    assert isinstance(study.sampler, OPTUNA_CLASSES[sampler]) and isinstance(study.pruner, OPTUNA_CLASSES[pruner])

    def objective(trial):
        # Each trial's learning curve lies below every earlier one, as a pruner should notice.
        suggest(trial, config)
        for epoch in range(1, EPOCHS + 1):
            trial.report(epoch - trial.number, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return float(EPOCHS - trial.number)

    assert run_loop(Worker(study, store, url, config), objective, poll_seconds=0.05) == 0
    trials = study.get_trials()
    assert len(trials) == 8 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    pruned = [t.number for t in trials if t.state == TrialState.PRUNED]
    assert (pruned == []) if pruner == "none" else pruned, pruned


def foreign_keys() -> list[tuple[str, str, str]]:
    """(section, kind, key) for every key of another kind of the same section that this kind does not take,
    and for the sampler kinds whose section has none such, a pruner's key."""
    rows = []
    for section, kinds, other in (("sampler", SAMPLERS, PRUNERS), ("pruner", PRUNERS, SAMPLERS)):
        for kind, cls in kinds.items():
            own = {f.name for f in dataclasses.fields(cls)}
            keys = sorted({f.name for c in kinds.values() for f in dataclasses.fields(c)} - own)
            keys = keys or sorted({f.name for c in other.values() for f in dataclasses.fields(c)} - own)[:1]
            rows += [(section, kind, key) for key in keys]
    return rows


@pytest.mark.parametrize(("section", "kind", "key"), foreign_keys())
def test_a_key_of_another_kind_is_refused_at_load_in_one_sentence(section, kind, key, tiny_study):
    cls = (SAMPLERS if section == "sampler" else PRUNERS)[kind]
    table = f'kind = "{kind}"\n{key} = 5'
    path = with_tables(tiny_study(), **{section: table})
    with pytest.raises(UsageError) as refused:
        load_study(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: {section}.{key}: is not a setting of the {kind} {section}; ")
    takes = ", ".join(sorted(f.name for f in dataclasses.fields(cls))) or "no other keys"
    assert message.endswith(f"it takes {takes}.")
    assert "\n" not in message and ". " not in message  # one sentence


@pytest.mark.slow
def test_hyperband_runs_a_study_from_the_command_line(tiny_study, tmp_path):
    # The reported bug: `start` with a hyperband pruner ended in a TypeError traceback.
    path = with_tables(tiny_study(trials=2), pruner=PRUNER_TABLES["hyperband"], epochs=2)
    run = cli("start", "--study", path, "--storage", f"journal:{tmp_path / 'study.journal'}")
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    assert "study tiny: 2 of 2 finished" in run.stdout
