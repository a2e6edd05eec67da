"""A trained model's weights as safetensors: written with its ModelConfig in the metadata, read back
from a file or from the Optuna artifact store that `nkat-search report` uploads them to."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from optuna.artifacts import FileSystemArtifactStore, download_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..config import ModelConfig, UsageError
from ..model import NKATViT


def save_weights(model: torch.nn.Module, model_cfg: ModelConfig, path: Path) -> str:
    """Write the model's state_dict as safetensors, with its ModelConfig in the metadata; sha256."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"model_config": json.dumps(dataclasses.asdict(model_cfg))})
    return sha256(path)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_model(
    source: str | os.PathLike,
    model_cfg: ModelConfig | None = None,
    *,
    artifact_store: FileSystemArtifactStore | None = None,
    device: str | torch.device = "cpu",
) -> NKATViT:
    """An NKATViT in eval mode from a safetensors file or (with artifact_store) an artifact id.

    Without model_cfg the ModelConfig stored in the file's metadata is used. safetensors holds
    tensors only, so loading never runs code from the file.
    """
    path = Path(source)
    if not path.is_file():
        if artifact_store is None:
            raise UsageError(
                f"{source} is not a file; pass a .safetensors path, or an artifact id together with its artifact store."
            )
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "weights.safetensors"
            try:
                download_artifact(artifact_store=artifact_store, file_path=str(local), artifact_id=str(source))
            except ArtifactNotFound:
                raise UsageError(
                    f"artifact {source} is not in the artifact store; pass the --artifacts folder "
                    "that `nkat-search report` used."
                ) from None
            return load_model(local, model_cfg, device=device)
    if model_cfg is None:
        with safe_open(str(path), framework="pt") as fh:
            stored = (fh.metadata() or {}).get("model_config")
        if stored is None:
            raise UsageError(f"{path} has no model_config in its metadata; pass the ModelConfig it was trained with.")
        model_cfg = ModelConfig(**json.loads(stored))
    model = NKATViT(model_cfg)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.to(device).eval()
