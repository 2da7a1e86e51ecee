"""Teacher ensemble for classification: timm models, averaged after softmax, top-k sparsified.

One actor holds the whole ensemble, so each batch of views is built and moved to the device once.
Checkpoints are loaded with torch.load(weights_only=True): never unpickle arbitrary objects.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import itertools
from contextlib import nullcontext

import fsspec
import numpy as np
import torch

from reinforge.models.specs import Teacher
from reinforge.formats.imagenet_plus import sparsify
from reinforge.stages.base import Batch, Stage, run_isolated

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    import io
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


def load_teacher(spec: Teacher) -> tuple[torch.nn.Module, dict]:
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


def ensemble_num_classes(teachers: list[Teacher]) -> int:
    """The ensemble's class count without loading weights (models are built on the meta device)."""
    import timm
    counts = set()
    for spec in teachers:
        if spec.num_classes is not None:
            counts.add(spec.num_classes)
            continue
        with torch.device("meta"):
            counts.add(timm.create_model(spec.model, pretrained=False).num_classes)
    if len(counts) != 1:
        raise ValueError(f"teachers disagree on num_classes: {sorted(counts)}")
    return counts.pop()


class TeacherEnsemble(Stage):
    name = "teachers"
    is_model = True

    def __init__(self, teachers: list[Teacher], top_k: int, temperature: float = 1.0,
                 precision: str = "float32", device: str | None = None):
        self.specs = teachers
        self.top_k = top_k
        self.temperature = temperature
        self.precision = precision
        self.device = device
        self.models: list[torch.nn.Module] = []
        self._versions: list[dict] = []

    def setup(self) -> None:
        if self.models:  # idempotent: the pipeline may set up the ensemble early to learn num_classes
            return
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        for spec in self.specs:
            model, version = load_teacher(spec)
            self.models.append(model.to(self.device))
            self._versions.append(version)
        classes = {m.num_classes for m in self.models}
        if len(classes) != 1:
            raise ValueError(f"teachers disagree on num_classes: {sorted(classes)}")
        self.num_classes = classes.pop()

    def versions(self) -> dict:
        return {"teachers": self._versions, "device": str(self.device), "precision": self.precision}

    def _autocast(self):
        if self.precision == "float32":
            return nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=_DTYPES[self.precision])

    @torch.inference_mode()
    def probabilities(self, views: torch.Tensor) -> torch.Tensor:
        """Mean over teachers of softmax(logits / T) for a [V, C, H, W] float tensor; float32 on the CPU."""
        views = views.to(self.device, non_blocking=True)
        total = None
        for model, spec in zip(self.models, self.specs):
            chunks = []
            for start in range(0, views.shape[0], spec.batch_size):
                with self._autocast():
                    logits = model(views[start:start + spec.batch_size])
                chunks.append(torch.softmax(logits.float() / self.temperature, dim=-1))
            probs = torch.cat(chunks)
            total = probs if total is None else total + probs
        return (total / len(self.models)).cpu()

    def _score(self, samples: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(top-k values, ids) of each sample's views."""
        values, ids = sparsify(self.probabilities(torch.cat([s["views"] for s in samples])), self.top_k)
        ends = list(itertools.accumulate(len(s["views"]) for s in samples))[:-1]
        return list(zip(np.split(values, ends), np.split(ids, ends)))

    def __call__(self, batch: Batch) -> Batch:
        if not batch.samples:
            return batch
        kept, failed = run_isolated(self.name, batch.samples, self._score)  # one bad sample costs only itself
        for sample, (values, ids) in kept:
            sample.pop("views")
            sample["values"], sample["ids"] = values, ids
        return Batch([sample for sample, _ in kept], list(batch.errors) + failed)
