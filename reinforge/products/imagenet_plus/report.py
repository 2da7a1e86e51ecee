"""The ImageNet+ section of `reinforge report`: teacher confidence and top-1 agreement over the stored
augmentations of the sampled shards. `page` is a reinforge.ops.report.Page."""
from __future__ import annotations

from collections import Counter

import numpy as np

from reinforge.io.manifest import RunLayout


def sample_stats(layout: RunLayout):
    """callable(members) -> {measure: values} for one decoded sample."""
    from reinforge.formats.imagenet_plus import decode_sample

    def stats(members: dict) -> dict[str, list]:
        sample = decode_sample(members)
        top1 = sample.ids[:, 0]
        mode = Counter(top1.tolist()).most_common(1)[0][0]
        return {"confidence": sample.values[:, 0].tolist(), "agreement": [float(np.mean(top1 == mode))],
                "label_agreement": [float(np.mean(top1 == sample.label))]}

    return stats


def section(page, stats: dict[str, list]) -> None:
    if not stats:
        return
    fig, (ax_conf, ax_agree) = page.subplots(ncols=2)
    ax_conf.hist(stats["confidence"], bins=np.linspace(0, 1, 21), edgecolor="k")
    ax_conf.set(title="teacher confidence (top-1 probability)", xlabel="probability", ylabel="augmentations")
    ax_agree.hist(stats["agreement"], bins=np.linspace(0, 1, 21), edgecolor="k")
    ax_agree.set(title="top-1 agreement across a sample's augmentations", xlabel="share of views with the "
                 "sample's most common top-1", ylabel="samples")
    page.figure("imagenet_plus", fig, "Teacher ensemble confidence over the stored augmentations, and how often "
                                      "a sample's augmented views agree on the top-1 class.")
    page.table(["measure", "mean"], [
        ["top-1 probability", f"{np.mean(stats['confidence']):.3f}"],
        ["top-1 agreement across augmentations", f"{np.mean(stats['agreement']):.3f}"],
        ["stored top-1 == label", f"{np.mean(stats['label_agreement']):.3f}"]])
