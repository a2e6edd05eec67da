"""A study's trials as the storage has them, counted (finished of budget, pruned by whom, failed,
running, best so far, mean trial time), and the words the progress display (progress.py) puts
them in: the summary line, a trial's parameters on one short line, clock times.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

# Short names in a trial's one-line parameters; embed_dim and depth fold into d=EMBEDxDEPTH.
SHORT = {
    "conv_stem": "stem",
    "patch_size": "p",
    "temperature": "T",
    "top_k": "top_k",
    "top_p": "top_p",
    "nkat_strength": "s",
    "nkat_decay": "r",
    "dropout_attn": "drop_attn",
    "dropout_embed": "drop_embed",
    "learning_rate": "lr",
}


def number(value) -> str:
    """Two significant digits, exponents without padding: 0.71, 0.85, 2.1e-4, 384."""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if value != 0 and not 0.01 <= abs(value) < 1e4:
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa.removesuffix('.0')}e{int(exponent)}"
    return f"{value:.2g}"


def compact(params: dict) -> str:
    """A trial's parameters on one short line, e.g. `stem=tiny p=2 d=384x7 T=0.71 top_p=0.85 lr=2.1e-4`."""
    params = dict(params)
    parts = []
    for key in ("conv_stem", "patch_size"):
        if key in params:
            parts.append(f"{SHORT[key]}={number(params.pop(key))}")
    if "embed_dim" in params:
        depth = params.pop("depth", None)
        parts.append(f"d={params.pop('embed_dim')}" + (f"x{depth}" if depth is not None else ""))
    parts += [f"{SHORT.get(key, key)}={number(value)}" for key, value in params.items()]
    return " ".join(parts)


def clock_text(seconds: float | None) -> str:
    """1:05, 12:00, 1:02:03; a dash when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def prune_kind(trial: FrozenTrial) -> str:
    """gate, pruner or other (a non-finite loss), from the trial's prune_reason."""
    reason = trial.user_attrs.get("prune_reason", "")
    return "gate" if reason.startswith("gate:") else "pruner" if reason.startswith("pruner") else "other"


@dataclass(frozen=True)
class Counts:
    """What the storage says about a study's trials."""

    budget: int | None
    complete: int
    pruner: int
    gate: int
    other_pruned: int
    failed: int
    running: int
    best_value: float | None
    best_trial: int | None
    mean_seconds: float | None  # measured duration of the finished (complete or pruned) trials

    @property
    def pruned(self) -> int:
        return self.pruner + self.gate + self.other_pruned

    @property
    def finished(self) -> int:
        return self.complete + self.pruned

    def eta(self) -> float | None:
        """Seconds left: the unfinished trials at the mean measured trial time, shared by the trials
        running now (one per worker, at least one)."""
        if self.budget is None or self.mean_seconds is None:
            return None
        return max(0, self.budget - self.finished) * self.mean_seconds / max(1, self.running)


def count(study: optuna.Study, counted: Callable[[FrozenTrial], bool] = lambda t: True) -> Counts:
    """Counts of a study's trials (those `counted` accepts, e.g. not warm-start copies)."""
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
    trials = [t for t in study.get_trials(deepcopy=False, states=states) if counted(t)]
    by = {state: [t for t in trials if t.state == state] for state in states}
    kinds = [prune_kind(t) for t in by[TrialState.PRUNED]]
    # cast: a COMPLETE trial of a single-objective study has a value
    best = max(by[TrialState.COMPLETE], key=lambda t: typing.cast(float, t.value), default=None)
    durations = [
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in by[TrialState.COMPLETE] + by[TrialState.PRUNED]
        if t.datetime_start and t.datetime_complete
    ]
    return Counts(
        budget=study.user_attrs.get("budget"),
        complete=len(by[TrialState.COMPLETE]),
        pruner=kinds.count("pruner"),
        gate=kinds.count("gate"),
        other_pruned=kinds.count("other"),
        failed=len(by[TrialState.FAIL]),
        running=len(by[TrialState.RUNNING]),
        best_value=best.value if best else None,
        best_trial=best.number if best else None,
        mean_seconds=sum(durations) / len(durations) if durations else None,
    )


def summary(name: str, c: Counts) -> str:
    """`nkat-smoke: 23 of 50 finished, running 1, pruned 12 (pruner 7, gate 5), failed 0`."""
    split = f"pruner {c.pruner}, gate {c.gate}" + (f", other {c.other_pruned}" if c.other_pruned else "")
    budget = c.budget if c.budget is not None else "?"
    return (
        f"{name}: {c.finished} of {budget} finished, running {c.running}, pruned {c.pruned} ({split}), "
        f"failed {c.failed}"
    )
