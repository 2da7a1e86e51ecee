"""MobileCLIP multi-modal distillation loss on stored teacher embeddings (FORMATS §2).

For a batch of B image-text pairs, teacher t (slice t of D, already unit-norm on its own, logit
scale σ_t) gives the similarity distribution softmax(σ_t · img_t · txt_tᵀ) per row; the target is
the mean of those distributions over the teachers (averaged after the softmax, as the reference
trainer's --distill-average-after-softmax), for image→text rows and, with the transposed
similarities, for text→image rows. The student loss per caption kind is

    (1 - λ) · CLIP contrastive loss + λ · cross-entropy(student logits, target),

computed for the ground-truth and for the synthetic caption and averaged (the reference trainer
sums the two, i.e. the same gradient direction at twice the scale).

Single process: for data-parallel training gather the features (and teacher embeddings) of all
ranks first, as open_clip's ClipLoss does with local_loss=False.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def teacher_targets(teacher_image_emb: torch.Tensor, teacher_text_emb: torch.Tensor, teacher_dims: list[int],
                    teacher_logit_scales: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(image→text, text→image) target distributions, each [B, B], rows summing to 1."""
    image, text = teacher_image_emb.float(), teacher_text_emb.float()
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
               teacher_logit_scales, lam) -> dict[str, torch.Tensor]:
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logits_per_image.T
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    clip = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    with torch.no_grad():  # targets are data, never trained
        target_image, target_text = teacher_targets(teacher_image, teacher_text, teacher_dims, teacher_logit_scales)
    distill = (_soft_cross_entropy(logits_per_image, target_image.to(logits_per_image.dtype))
               + _soft_cross_entropy(logits_per_text, target_text.to(logits_per_text.dtype))) / 2
    return {"loss": (1 - lam) * clip + lam * distill, "clip_loss": clip, "distill_loss": distill}


def _check(image_features, text_features, syn_text_features, teacher_image_emb, teacher_text_emb, teacher_syn_emb,
           teacher_dims, teacher_logit_scales, lam) -> None:
    if not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if not teacher_dims or len(teacher_dims) != len(teacher_logit_scales):
        raise ValueError(f"one logit scale per teacher: dims {teacher_dims}, scales {teacher_logit_scales}")
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
                            teacher_logit_scales: list[float], lam: float) -> dict[str, torch.Tensor]:
    """Student features are L2-normalised ([B, d], as open_clip models return them) and logit_scale
    is the multiplier itself (open_clip's logit_scale.exp()). Teacher embeddings are the stored rows
    [B, D]. Returns {"loss": total, "loss_gt", "loss_syn", "clip_loss", "distill_loss"}; the last two
    are averaged over the caption kinds. Without synthetic captions (both None) only the ground truth
    counts."""
    _check(image_features, text_features, syn_text_features, teacher_image_emb, teacher_text_emb, teacher_syn_emb,
           teacher_dims, teacher_logit_scales, lam)
    gt = _pair_loss(image_features, text_features, logit_scale, teacher_image_emb, teacher_text_emb, teacher_dims,
                    teacher_logit_scales, lam)
    if syn_text_features is None:
        return {"loss": gt["loss"], "loss_gt": gt["loss"], "clip_loss": gt["clip_loss"],
                "distill_loss": gt["distill_loss"]}
    syn = _pair_loss(image_features, syn_text_features, logit_scale, teacher_image_emb, teacher_syn_emb,
                     teacher_dims, teacher_logit_scales, lam)
    return {"loss": (gt["loss"] + syn["loss"]) / 2, "loss_gt": gt["loss"], "loss_syn": syn["loss"],
            "clip_loss": (gt["clip_loss"] + syn["clip_loss"]) / 2,
            "distill_loss": (gt["distill_loss"] + syn["distill_loss"]) / 2}
