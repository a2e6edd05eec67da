"""What `nkat-search bench` measures: its options, one field per flag."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import CONV_STEMS, PRECISIONS, ModelConfig, UsageError, check_types, opt

# CPU: the batch of docs/performance.md. CUDA: large enough to keep an H100 busy with a 17-token model
# (see the README's learning-rate rule for batch sizes other than the recipe's 128).
DEFAULT_BATCH = {"cpu": 32, "cuda": 512, "mps": 128}


SECTIONS = ("train", "augment", "eval", "storage")  # quick; the default


OTHER_SECTIONS = ("ops",)  # quick, asked for by name: op counts, not speed


SLOW_SECTIONS = ("search", "share", "procs", "round2")


ALL_SECTIONS = SECTIONS + OTHER_SECTIONS + SLOW_SECTIONS


MODEL = ModelConfig()


@dataclass(frozen=True)
class BenchOptions:
    """What `nkat-search bench` measures and how; the command's flags are made from these fields."""

    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps")
    precision: str = opt(
        "auto",
        "auto: bf16 autocast on CUDA and on CPUs with native bf16 (the table says which and why), else fp32",
        choices=PRECISIONS,
    )
    batch_size: int | None = opt(None, "images per step [32 on the CPU, 512 on CUDA; 128 in procs and ops]")
    steps: int = opt(4, "timed steps per variant per round")
    warmup: int = opt(2, "untimed steps per variant first")
    repeats: int = opt(3, "rounds; figures are their median")
    augment_batch: int = opt(512, "batch of the augment figure; GPU-sized, where the pipeline matters")
    threads: int | None = opt(
        None, "torch intra-op threads of this process; 1 is steadier on a shared machine [torch's default]"
    )
    images: int = opt(1024, "synthetic training images (train, augment, procs)")
    eval_images: int = opt(256, "images per evaluation pass")
    conv_stem: str = opt(MODEL.conv_stem, "conv stem of the benchmarked model", choices=CONV_STEMS)
    patch_size: int = opt(MODEL.patch_size, "patch size of the benchmarked model")
    embed_dim: int = opt(MODEL.embed_dim, "embedding width of the benchmarked model")
    depth: int = opt(MODEL.depth, "blocks of the benchmarked model")
    compile: bool = opt(False, "torch.compile the model of the real step")
    storage: str | None = opt(None, "storage URL to time ask+tell on [a temporary journal file]")
    storage_procs: int = opt(8, "concurrent processes of the storage figure")
    storage_ops: int = opt(20, "ask+tell pairs per process")
    only: tuple[str, ...] = opt(
        SECTIONS, "sections to run: " + ", ".join(ALL_SECTIONS) + " (the last four take minutes)", choices=ALL_SECTIONS
    )
    search: bool = opt(
        False,
        "time a search of --study instead, through the worker's loop: where each "
        "trial's time goes (the same as --only search)",
    )
    study: str = opt("smoke", "study of the search and share sections: a packaged name or a file")
    trials: int = opt(12, "trials of the search section")
    processes: tuple[int, ...] | None = opt(
        None, "concurrent processes of share and procs [share: 1 2 3; procs: 1 2 4]"
    )
    jobs: int = opt(6, "training jobs per process count in share and procs")
    scale: float = opt(1.0, "round2: the fraction of the real datasets' sizes to time, one epoch each")
    pass_rate: float = opt(
        0.60, "round2: the share of trials that pass the gate in the projection [the demo's main job: 30 of 50]"
    )
    reference: str | None = opt(
        None,
        "file of the research-style pipeline [benchmarks/research_pipeline.py of "
        "this checkout, else of the working directory]",
    )

    def __post_init__(self) -> None:
        check_types(self)
        for name in (
            "steps",
            "repeats",
            "augment_batch",
            "images",
            "eval_images",
            "storage_procs",
            "storage_ops",
            "trials",
            "jobs",
            "patch_size",
            "embed_dim",
            "depth",
        ):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        for name in ("warmup",):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name} must be at least 0, got {getattr(self, name)}.")
        for name in ("batch_size", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if not 0 < self.scale <= 1:
            raise UsageError(f"--scale must be in (0, 1], got {self.scale}; 1 times the real datasets' sizes.")
        if not 0 <= self.pass_rate <= 1:
            raise UsageError(f"--pass-rate must be in [0, 1], got {self.pass_rate}.")
        if self.processes is not None and (not self.processes or min(self.processes) < 1):
            raise UsageError("--processes takes one or more counts, each at least 1, e.g. --processes 1 2 4.")
        unknown = set(self.only) - set(ALL_SECTIONS)
        if unknown or not self.only:
            raise UsageError(f"--only takes sections among {', '.join(ALL_SECTIONS)}, got {' '.join(self.only)}.")

    @property
    def sections(self) -> tuple[str, ...]:
        return ("search",) if self.search else self.only

    def model(self) -> ModelConfig:
        return ModelConfig(
            conv_stem=self.conv_stem, patch_size=self.patch_size, embed_dim=self.embed_dim, depth=self.depth
        )
