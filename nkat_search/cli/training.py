"""`nkat-search train`: one configuration on one dataset, under a study's recipe by default.

Without flags it trains like the search does: Round 2's fixed [model] settings, its recipe for the
dataset ([train], then [stage2.train], then [train.<dataset>]), its data settings and the stage's
epochs. `--study` names another study file; `--recipe research` takes the research scripts' own
stack (the dataclasses' defaults), which the studies rejected for the MNIST family. `--trial N`
retrains one trial of a stored study exactly as the search trained it. Single flags override
single fields in every case.
"""

from __future__ import annotations

import dataclasses
import json

from .. import datasets, settings
from ..config import DataConfig, ModelConfig, TrainConfig, UsageError, adapt_patch_size
from .commands import DATASET_FIELDS, MODEL_DEFAULTS, _attach
from .flags import _config_flags, _flag, _given, _number

DEFAULT_STUDY = "round2"


def cmd_train(args) -> int:
    if args.trial is not None:
        return _train_trial(args)
    if args.recipe == "research" and args.study:
        raise UsageError("--recipe research uses no study; drop --study, or drop --recipe to use the study's.")
    dataset = args.dataset or "cifar10"
    spec = datasets.DATASETS[dataset]  # the parser's choices
    if args.recipe == "research":
        fixed, recipe, data, name = {}, TrainConfig(), DataConfig(), "research"
    else:
        from ..search.study_file import load_study

        study = load_study(args.study or DEFAULT_STUDY)
        fixed, data, name = study.model, study.data, f"study {study.name}"
        recipe = dataclasses.replace(study.recipe(dataset), epochs=_stage_epochs(study, dataset))
    given = _given(ModelConfig, args, DATASET_FIELDS)
    model_kwargs = {**fixed, **given}
    if "patch_size" not in given:  # the default fits CIFAR-10's map; adapted to the dataset's
        stem = model_kwargs.get("conv_stem", MODEL_DEFAULTS.conv_stem)
        patch = model_kwargs.get("patch_size", MODEL_DEFAULTS.patch_size)
        model_kwargs["patch_size"] = adapt_patch_size(spec.image_size, stem, patch)
    model_cfg = ModelConfig(
        **{**model_kwargs, "in_chans": spec.channels, "img_size": spec.image_size, "num_classes": spec.num_classes}
    )
    train_cfg = dataclasses.replace(recipe, **_given(TrainConfig, args))
    return _fit_and_print(args, dataset, model_cfg, train_cfg, _data(args, data), name)


def _train_trial(args) -> int:
    """Retrain trial --trial of the stored study with its parameters, the stored recipe and the
    stage's epochs: on --dataset, or on every dataset of the study in the order the search uses."""
    if args.recipe == "research":
        raise UsageError("--trial retrains with the study's own recipe; drop --recipe research.")
    _, study, config = _attach(args)
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == args.trial), None)
    if trial is None or not trial.params:
        raise UsageError(
            f"study {study.study_name!r} has no trial {args.trial} with parameters; "
            "`nkat-search leaderboard` lists the trials."
        )
    for dataset in [args.dataset] if args.dataset else config.datasets:
        model_cfg, train_cfg = config.configs_for(trial.params, dataset, _stage_epochs(config, dataset))
        model_cfg = dataclasses.replace(model_cfg, **_given(ModelConfig, args, DATASET_FIELDS))
        train_cfg = dataclasses.replace(train_cfg, **_given(TrainConfig, args))
        name = f"trial {trial.number} of {study.study_name}"
        _fit_and_print(args, dataset, model_cfg, train_cfg, _data(args, config.data), name)
    return 0


def _stage_epochs(study, dataset: str) -> int:
    """The epochs the search trains `dataset` for: Stage 1's on the gate dataset, else Stage 2's."""
    return study.stage1_epochs if dataset == study.stage1_dataset else study.stage2_epochs


def _data(args, base: DataConfig) -> DataConfig:
    """The data settings: the flags given, over the study's (over the defaults when --data-source
    names another source than the study's); the root from --data-root, else $NKAT_SEARCH_DATA_ROOT,
    else the study's."""
    given = _given(DataConfig, args)
    given["root"] = given.get("root") or settings.given("NKAT_SEARCH_DATA_ROOT") or base.root
    if given.get("source", base.source) != base.source:  # the study's sizes are for its own source
        base = DataConfig()
    return dataclasses.replace(base, **given)


def _fit_and_print(args, dataset, model_cfg, train_cfg, data_cfg, recipe: str) -> int:
    """Train, then print the summary line (or one JSON object) naming the recipe used."""
    # Imported once the configuration is checked: a mistake there is told before torch's import.
    from ..data.loader import load_splits
    from ..devices import resolve_device
    from ..outputs.progress import TrainProgress
    from ..train import OutOfMemory, fit, out_of_memory

    device = resolve_device(args.device)
    try:
        splits = load_splits(dataset, data_cfg, device)
        with TrainProgress(dataset, train_cfg.epochs) as on_epoch:  # a bar on a terminal, else a line per epoch
            result = fit(model_cfg, train_cfg, splits, on_epoch=on_epoch, eval_test=args.eval_test)
    except (MemoryError, RuntimeError) as exc:
        if not out_of_memory(exc):
            raise
        raise OutOfMemory(
            f"the model or the data does not fit in the memory of {device} ({type(exc).__name__}); "
            "lower embed_dim, depth, batch_size or the number of images."
        ) from None
    summary = result.summary()
    summary.update(
        data_source=data_cfg.source,
        recipe=recipe,
        model_config=dataclasses.asdict(model_cfg),
        train_config=dataclasses.asdict(train_cfg),
    )
    if args.json:
        print(json.dumps(summary))
    else:
        test = f"  test accuracy {summary['test_accuracy']:.4f}" if args.eval_test else ""
        print(
            f"{summary['dataset']}: val accuracy {summary['accuracy']:.4f}{test}  local TPE {summary['local_tpe']:.4f}  "
            f"params {summary['params']:,} (lambda {summary['lambda']:.3f})  {summary['epochs']} epochs in "
            f"{summary['seconds']:.1f} s ({summary['images_per_second']:.0f} img/s, {summary['precision']}, "
            f"{summary['device']}); recipe: {recipe}"
        )
    return 0


def add_train_parser(sub) -> None:
    """`train`: the model, recipe and data flags come from the config dataclasses' fields."""
    p = sub.add_parser(
        "train",
        help="train one configuration on one dataset (Round 2's recipe for it by default) and print the result",
        description="Train one NKAT ViT configuration on one dataset; evaluate the EMA weights on the "
        "validation split after every epoch. The recipe: the study's (--study, default round2): its "
        "fixed [model] settings, its recipe for the dataset ([train], [stage2.train], [train.<dataset>]), "
        "its data settings and the stage's epochs; --recipe research: the research scripts' own stack "
        "(the defaults shown below). --trial N retrains trial N of a stored study as the search trained "
        "it. Flags override single fields; the output names the recipe used.",
    )
    _flag(
        p, "dataset", default=None, choices=datasets.NAMES, help="[cifar10; with --trial, every dataset of the study]"
    )
    p.add_argument(
        "--study",
        help="study file or packaged study whose recipe to use [round2]; with --trial, the stored "
        "study's name [$NKAT_SEARCH_STUDY, or the storage's only study]",
    )
    p.add_argument(
        "--recipe",
        choices=("study", "research"),
        default="study",
        help="study: the study's recipe for the dataset; research: the research scripts' own [%(default)s]",
    )
    p.add_argument(
        "--trial", type=_number(int, "int"), help="retrain this trial of --study in --storage, as the search trained it"
    )
    p.add_argument(
        "--storage",
        help="with --trial: the Optuna storage URL [$NKAT_SEARCH_STORAGE or journal:nkat-search.journal]",
    )
    _flag(
        p, "device", default="auto", help="auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N or mps [%(default)s]"
    )
    _flag(p, "eval_test", action="store_true", help="also evaluate on the test set (kept out of model selection)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the summary line")
    _config_flags(
        p, "model (defaults: the study's [model], then the research's baseline shown)", ModelConfig, DATASET_FIELDS
    )
    _config_flags(
        p, "training recipe (defaults: the study's recipe for the dataset; shown: the research's)", TrainConfig
    )
    _config_flags(p, "data (defaults: the study's [data]; shown: without a study)", DataConfig)
    p.set_defaults(func=cmd_train)
