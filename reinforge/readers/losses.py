"""MobileCLIP multi-modal distillation loss on stored teacher embeddings (FORMATS §2), by default
equal to Apple's `DRClipLoss` (the MobileCLIP open_clip patch) run with --distill-average-after-softmax.

For a batch of B image-text pairs, teacher t (slice t of D, already unit-norm on its own, logit scale
σ_t = --distill-logit-scale[t], slice width = --distill-teacher-dimension[t]) gives the similarity
distribution softmax(σ_t · img_t · txt_tᵀ) per row; the target is the mean of those distributions over
the teachers, for image→text rows and, with the transposed similarities, for text→image rows. Per caption
kind k (ground truth, and the synthetic caption when given), with loss_weights = (w_c, w_d) =
--distill-loss-weights:

    contrastive_k = w_c · (CE(logits, I) + CE(logitsᵀ, I)) / 2          (open_clip's CLIP loss)
    distill_k     = w_d · (CE(logits, target_i) + CE(logitsᵀ, target_t)) / 2

reduction "sum" (Apple's): contrastive = Σ_k contrastive_k, distill = Σ_k distill_k, loss = contrastive +
distill (the trainer sums its output dict). reduction "mean" averages over the caption kinds instead (same
gradient direction, half the scale with synthetic captions). FORMATS' (1-λ)·CLIP + λ·distillation is
loss_weights=(1 - λ, λ); Apple's flag defaults to (1, 1), DataCompDR's scripts pass (0, 1) or (0.25, 0.75).

average_after_softmax=False is the reference trainer without that flag (its v1 patch): one softmax of
σ · img · txtᵀ over the whole concatenated D, which takes a single σ (the v2 patch fails on that path).

Single process: for data-parallel training gather the features (and teacher embeddings) of all ranks
first, as open_clip's ClipLoss does with local_loss=False.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

REDUCTIONS = ("sum", "mean")
APPLE_DEFAULT_LOSS_WEIGHTS = (1.0, 1.0)  # --distill-loss-weights when the flag is not given


def teacher_targets(teacher_image_emb: torch.Tensor, teacher_text_emb: torch.Tensor, teacher_dims: list[int],
                    teacher_logit_scales: list[float], average_after_softmax: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(image→text, text→image) target distributions, each [B, B], rows summing to 1."""
    image, text = teacher_image_emb.float(), teacher_text_emb.float()
    if not average_after_softmax:
        sim = float(teacher_logit_scales[0]) * image @ text.T
        return sim.softmax(dim=1), sim.T.softmax(dim=1)
    per_image, per_text = 0.0, 0.0
    start = 0
    for dim, scale in zip(teacher_dims, teacher_logit_scales):
        sim = float(scale) * image[:, start:start + dim] @ text[:, start:start + dim].T
        per_image = per_image + sim.softmax(dim=1)
        per_text = per_text + sim.T.softmax(dim=1)
        start += dim
    return per_image / len(teacher_dims), per_text / len(teacher_dims)


def _soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * logits.log_softmax(dim=1)).sum(dim=1).mean()


def _pair_loss(image_features, text_features, logit_scale, teacher_image, teacher_text, teacher_dims,
               teacher_logit_scales, loss_weights, average_after_softmax) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted contrastive, weighted distillation) loss of one caption kind."""
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logits_per_image.T
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    clip = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    with torch.no_grad():  # targets are data, never trained
        target_image, target_text = teacher_targets(teacher_image, teacher_text, teacher_dims, teacher_logit_scales,
                                                    average_after_softmax)
    distill = (_soft_cross_entropy(logits_per_image, target_image.to(logits_per_image.dtype))
               + _soft_cross_entropy(logits_per_text, target_text.to(logits_per_text.dtype))) / 2
    return loss_weights[0] * clip, loss_weights[1] * distill


def _check_options(teacher_dims, teacher_logit_scales, loss_weights, reduction, average_after_softmax) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if len(loss_weights) != 2 or not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0
                                         for w in loss_weights):
        raise ValueError(f"loss_weights must be (contrastive, distillation) >= 0, got {loss_weights!r}")
    if not teacher_dims or len(teacher_dims) != len(teacher_logit_scales):
        raise ValueError(f"one logit scale per teacher: dims {teacher_dims}, scales {teacher_logit_scales}")
    if not average_after_softmax and len(set(map(float, teacher_logit_scales))) != 1:
        raise ValueError(f"average_after_softmax=False takes one logit scale for all teachers (the trainer's "
                         f"single --distill-logit-scale), got {teacher_logit_scales}")


def _check_shapes(image_features, text_features, syn_text_features, teacher_image_emb, teacher_text_emb,
                  teacher_syn_emb, teacher_dims) -> None:
    batch = image_features.shape[0]
    students = [("text_features", text_features), ("syn_text_features", syn_text_features)]
    teachers = [("teacher_image_emb", teacher_image_emb), ("teacher_text_emb", teacher_text_emb),
                ("teacher_syn_emb", teacher_syn_emb)]
    for name, tensor in students + teachers:
        if tensor is not None and (tensor.ndim != 2 or tensor.shape[0] != batch):
            raise ValueError(f"{name} must be [B={batch}, dim], got {tuple(tensor.shape)}")
    for name, tensor in students:
        if tensor is not None and tensor.shape[1] != image_features.shape[1]:
            raise ValueError(f"{name} has dim {tensor.shape[1]}, image_features {image_features.shape[1]}")
    for name, tensor in teachers:
        if tensor is not None and tensor.shape[1] != sum(teacher_dims):
            raise ValueError(f"{name} has D={tensor.shape[1]}, teacher_dims sum to {sum(teacher_dims)}")
    if (syn_text_features is None) != (teacher_syn_emb is None):
        raise ValueError("pass both syn_text_features and teacher_syn_emb, or neither")


def mobileclip_distill_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                            syn_text_features: torch.Tensor | None, logit_scale: torch.Tensor | float,
                            teacher_image_emb: torch.Tensor, teacher_text_emb: torch.Tensor,
                            teacher_syn_emb: torch.Tensor | None, teacher_dims: list[int],
                            teacher_logit_scales: list[float],
                            loss_weights: tuple[float, float] | None = None, reduction: str = "sum",
                            average_after_softmax: bool = True) -> dict[str, torch.Tensor]:
    """Student features are L2-normalised ([B, d], as open_clip models return them) and logit_scale is
    the multiplier itself (open_clip's logit_scale.exp()). Teacher embeddings are the stored rows [B, D].
    A run's dr_config.json records teacher_dims, teacher_logit_scales and distill_loss_weights (the
    reader's attributes of those names); loss_weights None is the trainer's flag default (1, 1).

    Returns {"loss", "contrastive_loss", "distill_loss", "loss_gt", "loss_syn"}: loss = contrastive_loss +
    distill_loss, each weighted and reduced over the caption kinds as DRClipLoss's output dict; loss_gt /
    loss_syn are one caption kind's weighted total. Without synthetic captions (both None) only the
    ground truth counts and there is no loss_syn."""
    loss_weights = APPLE_DEFAULT_LOSS_WEIGHTS if loss_weights is None else tuple(loss_weights)
    _check_options(teacher_dims, teacher_logit_scales, loss_weights, reduction, average_after_softmax)
    _check_shapes(image_features, text_features, syn_text_features, teacher_image_emb, teacher_text_emb,
                  teacher_syn_emb, teacher_dims)
    kinds = {"gt": (text_features, teacher_text_emb)}
    if syn_text_features is not None:
        kinds["syn"] = (syn_text_features, teacher_syn_emb)
    parts = {kind: _pair_loss(image_features, student, logit_scale, teacher_image_emb, teacher, teacher_dims,
                              teacher_logit_scales, loss_weights, average_after_softmax)
             for kind, (student, teacher) in kinds.items()}
    scale = 1.0 if reduction == "sum" else 1.0 / len(parts)
    contrastive = scale * sum(c for c, _ in parts.values())
    distill = scale * sum(d for _, d in parts.values())
    out = {"loss": contrastive + distill, "contrastive_loss": contrastive, "distill_loss": distill}
    out.update({f"loss_{kind}": c + d for kind, (c, d) in parts.items()})
    return out
