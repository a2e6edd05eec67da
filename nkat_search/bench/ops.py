"""The ops section: the aten ops that one training batch dispatches, split into augmentation (as
BatchLoader draws a batch) and the step (TrainStep: forward, backward, clip, AdamW, schedule, EMA).

On a GPU each op that is not a view is about one kernel launch; at the research baseline's 17
tokens the kernels are tiny, so the count, not the arithmetic, bounds the step. Some ops also make
the host wait for the device or depend on the data (SYNC_PRONE); a batch that has none of them and
dispatches the same ops every time can be recorded once as a CUDA graph and replayed. An op counts
whatever device its tensors are on. Since issue 22 the augmentation draws everything on the device
(data/randaugment.py, data/mix.py): at most 150 ops that are not views, none sync-prone, the same
every batch (tests/test_data.py guards it); before, RandAugment picked each op's images on the
host, about 770 ops and 103 sync-prone ones per batch (docs/performance.md).

Counted with a TorchDispatchMode because torch has no public op counter:
torch.utils.flop_counter.FlopCounterMode counts the FLOPs of matmuls, convolutions and attention
only; torch.overrides.TorchFunctionMode sees Python-level calls (F.linear, Tensor.__getitem__), not
the aten ops they become, and never the backward pass; torch.profiler records nested events
(aten::linear around aten::addmm) with timings, so which of them reach a kernel is a guess. A
dispatch mode sees each op once, below autocast, autograd and the composite ops' decompositions,
forward and backward alike: what the device is asked to run. The model runs eagerly whatever
--compile says, since the kernels inductor generates do not pass through the dispatcher.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..config import ModelConfig, TrainConfig, UsageError, replace
from ..data.loader import BatchLoader, Splits
from ..devices import resolve_precision
from ..train import TrainStep
from .timing import _dtype_name, synthetic_splits

# The ops that make the host wait for the device, or whose work depends on the data: each is a
# device sync on CUDA (or a data-dependent shape a recorded graph cannot replay). Keyed by the
# op's name without its overload; SYNC_RULES below adds the two that depend on the arguments.
SYNC_PRONE = {
    "nonzero": "its output's size depends on the data: the host reads it from the device",
    "_local_scalar_dense": ".item(), float(t), bool(t): the host reads a value from the device",
    "is_nonzero": "bool(t) on a one-element tensor: the host reads it",
    "equal": "torch.equal returns a Python bool: the host reads it",
    "masked_select": "its output's size depends on the mask",
    "unique": "its output's size depends on the data",
    "_unique": "its output's size depends on the data",
    "_unique2": "its output's size depends on the data",
    "unique_dim": "its output's size depends on the data",
    "unique_consecutive": "its output's size depends on the data",
    "repeat_interleave": "with tensor repeats, its output's size depends on the data",
    "lift_fresh": "a tensor built from Python data (torch.tensor(list)): on a GPU, a copy from the host",
    "lift_fresh_copy": "a tensor built from Python data: on a GPU, a copy from the host",
}
SYNC_RULES = {
    "index (bool mask)": "index or index_put with a boolean mask: the kept positions are counted on the device",
    "host-device copy": "_to_copy or copy_ between the host and a device (.to('cuda'), .cpu())",
}

BATCHES = 3  # counted batches, in a row; their op sequences are compared
WARMUP = 1  # uncounted first batch: AdamW making its state


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in an op's arguments, lists (foreach ops, index lists) included."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return _tensors(list(value.values()))
    return []


def sync_prone(name: str, args: tuple, kwargs: dict) -> str | None:
    """Why the op `name` (without its overload) with these arguments is sync-prone, as a short
    label for the table (SYNC_PRONE's key, or SYNC_RULES'), or None."""
    if name in SYNC_PRONE:
        return name
    if name in ("index", "index_put", "index_put_", "_index_put_impl_") and len(args) > 1:
        if any(t.dtype in (torch.bool, torch.uint8) for t in _tensors(args[1])):
            return "index (bool mask)"
    if name in ("_to_copy", "copy_"):
        source = args[1] if name == "copy_" else args[0]
        target = args[0].device if name == "copy_" else kwargs.get("device") or source.device
        if torch.device(target).type != source.device.type and "cpu" in (torch.device(target).type, source.device.type):
            return "host-device copy"
    return None


def _constants(value) -> tuple:
    """The arguments of an op that are not tensors (numbers, flags, dtypes), in order: what a CUDA
    graph bakes into its kernels when it is captured."""
    if isinstance(value, torch.Tensor):
        return ()
    if isinstance(value, list | tuple):
        return tuple(c for item in value for c in _constants(item))
    if isinstance(value, dict):
        return tuple(c for k, v in value.items() for c in ((k,), _constants(v)))
    if isinstance(value, torch.Generator):  # its state is on the device; the Python object is new per op
        return (f"generator on {value.device}",)
    return (repr(value),)


class OpCounter(TorchDispatchMode):
    """Records every op dispatched while it is active: its name, its tensors' shapes and dtypes,
    and why it is sync-prone (or None); and, apart (`constants`), its arguments that are not
    tensors. The profiler's record_function markers are not kernels and are left out."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple, str | None, bool]] = []
        self.constants: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "profiler":
            name = func.overloadpacket.__name__ if func.namespace == "aten" else str(func.overloadpacket)
            shapes = tuple((tuple(t.shape), t.dtype) for t in _tensors((args, kwargs)))
            why = sync_prone(name, args, kwargs) if func.namespace == "aten" else None
            self.ops.append((str(func), shapes, why, func.is_view))
            self.constants.append(_constants((args, kwargs)))
        return func(*args, **kwargs)


def _count(calls) -> dict:
    """Counts of BATCHES calls of calls() (after WARMUP uncounted ones), and whether they dispatched
    the same ops, the same ops with the same shapes, and those with the same arguments that are not
    tensors every time: the last is what replaying one captured CUDA graph per batch needs (a
    learning rate or EMA weight passed as a Python number would differ from batch to batch)."""
    for _ in range(WARMUP):
        calls()
    runs, constants = [], []
    for _ in range(BATCHES):
        with OpCounter() as counter:
            calls()
        runs.append(counter.ops)
        constants.append([(*op[:2], c) for op, c in zip(counter.ops, counter.constants)])
    kinds = sorted({why for run in runs for _, _, why, _ in run if why})
    return {
        "ops": [len(run) for run in runs],
        "views": [sum(view for _, _, _, view in run) for run in runs],  # views launch no kernel
        "kernel_ops": [sum(not view for _, _, _, view in run) for run in runs],  # the ops that are not views
        "sync_prone": [sum(why is not None for _, _, why, _ in run) for run in runs],
        "sync_prone_by_op": {k: [Counter(why for _, _, why, _ in run)[k] for run in runs] for k in kinds},
        "same_ops": all([op[0] for op in run] == [op[0] for op in runs[0]] for run in runs),
        "same_shapes": all([op[:2] for op in run] == [op[:2] for op in runs[0]] for run in runs),
        "same_arguments": all(run == constants[0] for run in constants),
    }


def recipes() -> dict[str, TrainConfig]:
    """The recipes measured: the research's CIFAR-10 recipe (the dataclass's defaults, as `train
    --recipe research`) and the packaged Round 2 study's recipe on its Stage-1 dataset."""
    from ..search.study_file import load_study

    study = load_study("round2")
    return {"research": TrainConfig(), "round2": study.recipe(study.stage1_dataset)}


def count_recipe(model_cfg: ModelConfig, train_cfg: TrainConfig, splits: Splits) -> dict[str, dict]:
    """The augment and step counts of one recipe: BatchLoader's batches one at a time, then TrainStep
    on those same batches."""
    batch = train_cfg.batch_size
    if (WARMUP + BATCHES) * batch > len(splits.train_x):
        raise UsageError(
            f"the ops section needs {WARMUP + BATCHES} batches of {batch} images, more than the "
            f"{len(splits.train_x)} benchmark images; lower --batch-size or raise --images."
        )
    torch.manual_seed(train_cfg.seed)
    loader = BatchLoader(
        splits.train_x, splits.train_y, splits.spec, batch, train=True, train_cfg=train_cfg, seed=train_cfg.seed
    )
    # As an iteration draws them (iteration.py): the epoch's order, then each batch from its indices.
    order = loader.epoch_order()
    indices, drawn = iter([loader.indices(order, b) for b in range(len(loader))]), []
    augment = _count(lambda: drawn.append(loader.batch(next(indices))))
    step = TrainStep(model_cfg, train_cfg, splits.train_x.device, len(loader))
    step.model.train()
    fed = iter(drawn)
    losses: list[torch.Tensor] = []
    out = {"augment": augment, "step": _count(lambda: losses.append(step(*next(fed))))}
    if not torch.isfinite(torch.stack(losses)).all():
        raise RuntimeError("the ops section's training loss became non-finite; its counts would be meaningless.")
    return out


def bench_ops(model_cfg: ModelConfig, device: torch.device, *, batch: int, images: int, precision: str) -> dict:
    """The ops one batch dispatches, per recipe and part, on synthetic CIFAR-10-shaped images."""
    splits = synthetic_splits("cifar10", max(images, (WARMUP + BATCHES) * batch), 1, device)
    rows, changes = [], {}
    research = asdict(TrainConfig())
    for name, recipe in recipes().items():
        changes[name] = {k: v for k, v in asdict(recipe).items() if v != research[k]}
        train_cfg = replace(recipe, batch_size=batch, precision=precision, compile=False)
        for part, counts in count_recipe(model_cfg, train_cfg, splits).items():
            rows.append({"recipe": name, "part": part, **counts})
    return {
        "batch": batch,
        "batches": BATCHES,
        "warmup": WARMUP,
        "precision": _dtype_name(resolve_precision(precision, device)),
        "model": {k: getattr(model_cfg, k) for k in ("conv_stem", "patch_size", "embed_dim", "depth")},
        "recipe_changes": changes,  # each recipe's fields that differ from the research's
        "sync_prone_ops": {**SYNC_PRONE, **SYNC_RULES},
        "rows": rows,
    }
