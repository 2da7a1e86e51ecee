"""timm models: classifiers (ImageNet+ teachers) and backbones (pool embeddings).

Checkpoints are loaded with torch.load(weights_only=True): never unpickle arbitrary objects.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import io
from typing import Optional

import fsspec
import torch

from reinforge.models.specs import TimmTeacherSpec
from reinforge.models.teacher import LoadedTeacher


def resolve_checkpoint(path: str) -> str:
    """`pkg:<package>/<file>` names a file shipped inside an installed Python package."""
    if path.startswith("pkg:"):
        package, _, inner = path[4:].partition("/")
        return str(importlib.resources.files(package).joinpath(inner))
    return path


def read_checkpoint(path: str) -> tuple[dict, str]:
    """The state dict of a checkpoint file and the sha256 of its bytes."""
    with fsspec.open(resolve_checkpoint(path), "rb") as f:
        data = f.read()
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    for wrapper in ("state_dict_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path}: expected a state dict, found {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, hashlib.sha256(data).hexdigest()


def positional_key_map(model: torch.nn.Module, state: dict) -> dict:
    """Match a foreign checkpoint's tensors to the model's by order and shape (e.g. other EfficientNet ports)."""
    ours = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    theirs = [k for k in state if not k.endswith("num_batches_tracked")]
    if len(ours) != len(theirs):
        raise ValueError(f"positional key map: model has {len(ours)} tensors, checkpoint {len(theirs)}")
    target = model.state_dict()
    mapped = {}
    for a, b in zip(ours, theirs):
        if target[a].shape != state[b].shape:
            raise ValueError(f"positional key map: {a} {tuple(target[a].shape)} vs {b} {tuple(state[b].shape)}")
        mapped[a] = state[b]
    return mapped


def load_timm(spec: TimmTeacherSpec) -> tuple[torch.nn.Module, dict]:
    """The model in eval mode on the CPU, and what the manifest records about its weights."""
    import timm
    kwargs = {} if spec.num_classes is None else {"num_classes": spec.num_classes}
    model = timm.create_model(spec.model, pretrained=spec.pretrained and spec.checkpoint is None, **kwargs)
    version = {"model": spec.model, "pretrained": spec.pretrained, "checkpoint": spec.checkpoint}
    if spec.checkpoint:
        state, digest = read_checkpoint(spec.checkpoint)
        if spec.checkpoint_key_map == "positional":
            state = positional_key_map(model, state)
            missing = [k for k in model.state_dict() if k not in state]
            model.load_state_dict(state, strict=False)
            if any(not k.endswith("num_batches_tracked") for k in missing):
                raise ValueError(f"checkpoint {spec.checkpoint}: tensors left unset: {missing[:3]}")
        else:
            model.load_state_dict(state, strict=True)
        version["checkpoint_sha256"] = digest
    return model.eval(), version


def num_classes(spec: TimmTeacherSpec) -> int:
    """A classifier's class count without loading weights (the model is built on the meta device)."""
    import timm
    if spec.num_classes is not None:
        return spec.num_classes
    with torch.device("meta"):
        return timm.create_model(spec.model, pretrained=False).num_classes


def load_timm_teacher(spec: TimmTeacherSpec, device: str, precision: str, *, pooled: bool = False,
                      image_size: Optional[int] = None) -> LoadedTeacher:
    """A classifier (images() = logits), or with pooled its backbone (images() = pooled features).
    Input size, mean and std are timm's data config of the model; image_size overrides the size."""
    import timm
    model, version = load_timm(spec)
    if pooled:
        model.reset_classifier(0)
    cfg = timm.data.resolve_data_config({}, model=model)
    size = (image_size, image_size) if image_size else tuple(int(s) for s in cfg["input_size"][1:])
    model = model.to(device)
    dim = int(model.num_features) if pooled else int(model.num_classes)
    return LoadedTeacher(spec, model, device, precision, size, tuple(cfg["mean"]), tuple(cfg["std"]), dim,
                         version, encode_image=model, num_classes=None if pooled else dim)
