"""The DataCompDR / DFNDR section of `reinforge report`: synthetic caption length and diversity, and the
norm check of the stored teacher embeddings. `page` is a reinforge.ops.report.Page."""
from __future__ import annotations

import json

import numpy as np

from reinforge.io.manifest import RunLayout

NORM_TOLERANCE = 1e-2  # a teacher slice whose L2 norm is further than this from 1 is reported


def sample_stats(layout: RunLayout):
    """Caption lengths (words), distinct-caption ratio per sample, and per-teacher L2 norms of every
    stored embedding row (each teacher slice must be unit-norm, FORMATS §2)."""
    from reinforge.formats.datacomp_dr import decode_dr_sample
    from reinforge.io.runs import dr_config
    dims = [int(t["dim"]) for t in (dr_config(layout.root) or {}).get("teachers", [])]

    def stats(members: dict) -> dict[str, list]:
        syn = json.loads(members["syn.json"]) if "syn.json" in members else {}
        captions = [c for key in sorted(syn) for c in syn[key]]
        out = {"caption_words": [len(c.split()) for c in captions],
               "distinct": [len(set(captions)) / len(captions)] if captions else []}
        if "npz" in members or "pth.gz" in members or "qemb.npz" in members:
            sample = decode_dr_sample(members)
            rows = np.concatenate([sample.image_emb, sample.text_emb, *sample.syn_emb.values()]).astype(np.float32)
            bounds = np.cumsum([0] + (dims if sum(dims) == rows.shape[1] else [rows.shape[1]]))
            out["norms"] = [float(v) for a, b in zip(bounds[:-1], bounds[1:])
                            for v in np.linalg.norm(rows[:, a:b], axis=1)]
        return out

    return stats


def section(page, stats: dict[str, list]) -> None:
    words, distinct, norms = stats.get("caption_words", []), stats.get("distinct", []), stats.get("norms", [])
    panels = [p for p in (words, distinct, norms) if p]
    if not panels:
        return
    fig, axes = page.subplots(ncols=len(panels))
    axes = list(axes)
    rows = []
    if words:
        ax = axes.pop(0)
        ax.hist(words, bins=range(0, max(words) + 2), edgecolor="k")
        ax.set(title="synthetic caption length", xlabel="words", ylabel="captions")
        rows.append(["caption words (mean)", f"{np.mean(words):.2f}"])
    if distinct:
        ax = axes.pop(0)
        ax.hist(distinct, bins=np.linspace(0, 1, 11), edgecolor="k")
        ax.set(title="distinct captions per sample", xlabel="distinct / generated", ylabel="samples")
        rows.append(["distinct-caption ratio (mean)", f"{np.mean(distinct):.3f}"])
    if norms:
        ax = axes.pop(0)
        ax.hist(norms, bins=30, edgecolor="k")
        ax.set(title="embedding L2 norm per teacher slice", xlabel="norm", ylabel="rows")
        off = int(np.sum(np.abs(np.asarray(norms) - 1) > NORM_TOLERANCE))
        rows.append(["embedding slice norms", f"{min(norms):.4f} .. {max(norms):.4f}; {off} of {len(norms)} "
                                              f"further than {NORM_TOLERANCE} from 1"])
    page.figure("mobileclip", fig, "Synthetic captions (length, diversity) and the norm check of the stored "
                                   "teacher embeddings (each teacher slice should be 1).")
    page.table(["measure", "value"], rows)
