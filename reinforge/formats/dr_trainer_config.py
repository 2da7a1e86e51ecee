"""dr_config.json: the config written next to DataCompDR shards (FORMATS §2) that the MobileCLIP open_clip
trainer reads (`--dataset-reinforcement-config`), as do reinforge's readers: the augmentation as that
trainer parses it, the teachers in embedding order, and the trainer's matching flags."""
from __future__ import annotations

import copy
import math
from typing import Any

from reinforge.formats.augment import Augmenter
from reinforge.formats.augment_config import TRANSFORM_ORDER

# The OpenAI CLIP statistics: what open_clip students normalise with unless told otherwise.
OPENAI_CLIP_NORMALIZE = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}


def trainer_augmentation(image_augmentation: dict, normalize: dict | None = None) -> dict:
    """image_augmentation as the MobileCLIP open_clip trainer parses it, still valid for Augmenter:
    - it deletes `normalize` unconditionally (KeyError if absent) and puts the student's in: so one is
      always written (the given one, else the OpenAI CLIP statistics open_clip students use);
    - it passes every field to torchvision as a keyword, where an interpolation *string* on Resize or
      RandAugment raises TypeError: those fields are dropped when they equal the default (Augmenter and
      torchvision agree on it); random_resized_crop converts strings itself and keeps its field."""
    config = copy.deepcopy(Augmenter(image_augmentation).config())
    for name, default in (("resize", "bilinear"), ("rand_augment", "nearest")):
        if name in config and config[name].get("interpolation") == default:
            del config[name]["interpolation"]
    config.pop("uint8", None)  # implicit for Augmenter; the trainer works on PIL images
    if "normalize" not in config:
        config["normalize"] = copy.deepcopy(normalize or OPENAI_CLIP_NORMALIZE)
    return {name: config[name] for name in TRANSFORM_ORDER if name in config}


# What DataCompDR's run scripts pass (run_datacompdr12m.sh, the MobileCLIP-S and DFNDR runs): distillation only.
DATACOMPDR_LOSS_WEIGHTS = (0.0, 1.0)


def _non_negative(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _trainer_model(i: int, teacher: dict) -> dict:
    """The open_clip (model_name, pretrained) a trainer rebuilds teacher i with: teacher["open_clip"] when
    the pipeline resolved it (models.open_clip.trainer_open_clip_args), else model / pretrained as given.
    Neither may hold ',': the trainer comma-joins one per teacher."""
    given = teacher.get("open_clip") or {"model_name": teacher["model"], "pretrained": teacher.get("pretrained")}
    model_name, pretrained = given.get("model_name"), given.get("pretrained") or ""
    if not (isinstance(model_name, str) and model_name and "," not in model_name):
        raise ValueError(f"teachers[{i}].model must be a non-empty name without ',', got {model_name!r}")
    if not isinstance(pretrained, str) or "," in pretrained:
        raise ValueError(f"teachers[{i}].pretrained must be a string without ',', got {pretrained!r}")
    return {"model_name": model_name, "pretrained": pretrained}


def _check_teacher(i: int, teacher: Any) -> dict:
    if not isinstance(teacher, dict):
        raise ValueError(f"teachers[{i}] must be a dict, got {type(teacher).__name__}")
    model, dim = teacher.get("model"), teacher.get("dim")
    if not (isinstance(model, str) and model):
        raise ValueError(f"teachers[{i}].model must be a non-empty name, got {model!r}")
    if not (isinstance(dim, int) and not isinstance(dim, bool) and dim > 0):
        raise ValueError(f"teachers[{i}].dim must be a positive int, got {dim!r}")
    scale = teacher.get("logit_scale")
    scale = 100.0 if scale is None else scale  # FORMATS §2: 100 for the DataCompDR teachers
    if not (_non_negative(scale) and scale > 0):
        raise ValueError(f"teachers[{i}].logit_scale must be a positive number, got {scale!r}")
    return {**teacher, "logit_scale": float(scale), "pretrained": teacher.get("pretrained"),
            "open_clip": _trainer_model(i, teacher)}


def _check_loss_weights(weights: Any) -> list[float]:
    if not (isinstance(weights, (list, tuple)) and len(weights) == 2
            and all(_non_negative(w) for w in weights) and any(weights)):
        raise ValueError(f"distill_loss_weights must be [contrastive, distillation] >= 0, not both 0; got {weights!r}")
    return [float(w) for w in weights]


def _trainer_args(config_path: str, dims: list[int], scales: list[float], weights: list[float]) -> list[str]:
    """The reference trainer's flags (its v2 patch): one logit scale per teacher (a single value with two
    teachers is an IndexError there), written as repr so the trainer uses the exact floats the reader does."""
    return ["--dataset-reinforcement", "--dataset-reinforcement-config", config_path,
            "--distill-logit-scale", *[repr(s) for s in scales],
            "--distill-loss-weights", *[repr(w) for w in weights],
            "--distill-teacher-dimension", *[str(d) for d in dims],
            "--distill-average-after-softmax"]


def dr_trainer_config(image_augmentation: dict, num_samples: int, teachers: list[dict],
                      normalize: dict | None = None, config_path: str = "dr_config.json",
                      distill_loss_weights: tuple[float, float] = DATACOMPDR_LOSS_WEIGHTS,
                      replay_backend: str = "pil") -> dict:
    """The JSON written next to the shards (FORMATS §2), readable by the MobileCLIP trainer
    (`--dataset-reinforcement-config`) and by reinforge.readers.mobileclip.

    teachers: in the order their slices sit inside D, each {"model", "dim", "logit_scale" (default
    100), "pretrained", "open_clip" ({"model_name", "pretrained"} for open_clip.create_model; default:
    model and pretrained), ...anything else, kept as given}. As in Apple's configs, model_name and
    pretrained are comma-joined strings (the trainer's --distill-model / --distill-pretrained for online
    distillation from the same teachers) and num_samples also sits at the top level; the teacher order,
    dims, logit scales and [contrastive, distillation] loss weights are recorded explicitly (FORMATS marks
    the order unverified), and trainer_args lists the matching command-line flags of the reference trainer."""
    if not (isinstance(num_samples, int) and not isinstance(num_samples, bool) and num_samples > 0):
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if not teachers:
        raise ValueError("teachers: at least one teacher is needed")
    checked = [_check_teacher(i, t) for i, t in enumerate(teachers)]
    weights = _check_loss_weights(distill_loss_weights)
    dims = [t["dim"] for t in checked]
    scales = [t["logit_scale"] for t in checked]
    return {
        "model_name": ",".join(t["open_clip"]["model_name"] for t in checked),
        "pretrained": ",".join(t["open_clip"]["pretrained"] for t in checked),
        "num_samples": num_samples,
        "reinforce": {"image_augmentation": trainer_augmentation(image_augmentation, normalize),
                      "num_samples": num_samples, "replay_backend": replay_backend},
        "teachers": checked,
        "teacher_dims": dims,
        "teacher_logit_scales": scales,
        "distill_loss_weights": weights,
        "distill_average_after_softmax": True,
        "embedding_dim": sum(dims),
        "trainer_args": _trainer_args(config_path, dims, scales, weights),
        "format": "reinforge.datacomp_dr/1",
    }
