"""Does a storage codec change what a CLIP student learns from DataCompDR teacher targets? In miniature, on CPU.

The student test of issue #14 for the DataCompDR codecs (formats.codecs), on bench/dr_effect.py's digits:

1. Data and teachers: dr_effect's digits (32 px PNG files, stratified splits) and its two CNN teachers
   (resnet10t, resnet18) trained on the full train split.
2. A teacher embedding space where image . text means something: teacher t embeds a view as its penultimate
   features, L2-normalised, and a caption naming digit k as its classifier's weight row k, L2-normalised. Then
   image . text is the cosine the classifier's logit k is made of, and argmax_k image . text("digit k") is the
   teacher's zero-shot decision. Two teachers, 512-d each, D = 1024 (DataCompDR's shape: two teachers).
3. Reinforced shards written by formats.datacomp_dr.encode_dr_sample (the writer the mobileclip_dr product
   calls): per student image N augmentations (param_aug drawn by reinforge's Augmenter, views rendered by the
   `pil` backend the reader replays with), image_emb [N, D] of the teachers on those views, the ground-truth
   caption ("a photo of the digit seven") and S=3 synthetic ones with their text rows. The same float32 rows
   are stored once per storage: float32 npz (DataCompDR, the uncompressed arm), bf16 pth.gz (DataCompDR-12M),
   the codecs quant (default step) and int8_row, and quant at a coarse step: a damaged-targets arm that shows
   whether this test can see a codec's error at all.
4. Students: a CLIP pair (timm test_resnet image tower, bag-of-words text tower; 64-d, unit-norm, learnable
   logit scale), read with reinforge's MobileCLIPDRDataset (replays param_aug[j], decodes the embedding
   member whichever codec wrote it) and trained with readers.losses.mobileclip_distill_loss (Apple's DRClipLoss:
   contrastive + KD to the mean over teachers of softmax(sigma image . text^T)), on the ground-truth and one
   synthetic caption per sample. A seed fixes the init, the batches and the replayed views in every arm: only
   the stored targets differ, so differences are paired by seed. Arm no-kd (loss weights (1, 0)) shows what the
   targets are worth.
5. Zero-shot accuracy on the held-out digits: argmax_k of student image . text("a photo of the digit k").

Run: ../shared/tools/offline .venv/bin/python bench/dr_effect_clip.py   (18 students; 41 min with the 2 cores shared at
load ~8, a fraction of that on quiet cores; --work DIR --reuse keeps the teachers)
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dr_effect as dr  # noqa: E402  data, teachers, training helpers

from reinforge.formats.augment import Augmenter, replay_augmenter  # noqa: E402
from reinforge.formats.datacomp_dr import DRSample, StorageSpec, embedding_arrays, embedding_member  # noqa: E402
from reinforge.formats.datacomp_dr import decode_dr_sample, encode_dr_sample  # noqa: E402
from reinforge.formats.image import decode_rgb  # noqa: E402
from reinforge.formats.seeds import entry_seed  # noqa: E402
from reinforge.formats.wds import ShardWriter  # noqa: E402
from reinforge.readers.losses import mobileclip_distill_loss, teacher_targets  # noqa: E402
from reinforge.readers.mobileclip import MobileCLIPDRDataset  # noqa: E402

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PROMPT = "a photo of the digit {word}"
SYNTHETIC = ["a handwritten {word}", "the number {k} written by hand", "a small blurry {word} on black"]
CONTEXT, EMBED = 8, 64
COARSE_STEP = 2.0 ** -5
ARMS = {  # name: (label, storage, loss weights (contrastive, distillation))
    "float": ("float32 npz (DataCompDR, uncompressed)", StorageSpec("npz", "float32"), (0.25, 0.75)),
    "bf16": ("bf16 pth.gz (DataCompDR-12M)", StorageSpec("pth.gz", "bfloat16"), (0.25, 0.75)),
    "quant": ("codec quant, default step 2^-11", StorageSpec(codec="quant"), (0.25, 0.75)),
    "int8_row": ("codec int8_row", StorageSpec(codec="int8_row"), (0.25, 0.75)),
    "coarse": ("codec quant, step 2^-5 (damaged targets)", StorageSpec(codec="quant", codec_params={"step": COARSE_STEP}),
               (0.25, 0.75)),
    "no-kd": ("no KD: contrastive only (float32 shards)", StorageSpec("npz", "float32"), (1.0, 0.0)),
}


def captions(k: int) -> list[str]:
    return [t.format(word=WORDS[k], k=k) for t in [PROMPT, *SYNTHETIC]]


VOCAB = {w: i + 1 for i, w in enumerate(sorted({w for k in range(10) for c in captions(k) for w in c.split()}))}


def tokenize(text: str) -> torch.Tensor:
    """[1, CONTEXT] word ids (0 pads), what open_clip's tokenizers return for one text."""
    ids = [VOCAB.get(w, 0) for w in text.split()][:CONTEXT]
    return torch.tensor([ids + [0] * (CONTEXT - len(ids))])


class TextTower(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = torch.nn.EmbeddingBag(len(VOCAB) + 1, 128, mode="mean", padding_idx=0)
        self.proj = torch.nn.Sequential(torch.nn.GELU(), torch.nn.Linear(128, EMBED))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.bag(tokens)), dim=-1)


class Student(torch.nn.Module):
    def __init__(self, image_model: str, seed: int):
        super().__init__()
        self.image = dr.make_model(image_model, seed)  # seeds torch: same init in every arm
        self.image.reset_classifier(EMBED)
        self.text = TextTower()
        self.logit_scale = torch.nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(x), dim=-1)


# ------------------------------------------------------------------------------------------------
# teacher embeddings and the shards

def load_teachers(teacher_specs: list[dict]) -> list[torch.nn.Module]:
    out = []
    for spec in teacher_specs:
        model = dr.make_model(spec["model"], 0)
        model.load_state_dict(torch.load(spec["checkpoint"], weights_only=True))
        out.append(model.eval())
    return out


@torch.inference_mode()
def teacher_image_rows(teachers, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([F.normalize(m.forward_head(m.forward_features(x), pre_logits=True), dim=-1) for m in teachers], 1)


def teacher_text_rows(teachers) -> torch.Tensor:
    """[10, D]: the row of every caption naming digit k (the teachers read the digit, nothing else)."""
    return torch.cat([F.normalize(m.get_classifier().weight.detach(), dim=-1) for m in teachers], 1)


def reinforce_job(spec: dict) -> list[DRSample]:
    """Samples of spec["files"] with float32 teacher rows of N replayed views each (one worker's share)."""
    torch.set_num_threads(spec["threads"])
    files, teachers, aug, num_samples = spec["files"], load_teachers(spec["teachers"]), spec["augmentation"], spec["N"]
    draw, render = Augmenter(aug), replay_augmenter(None, aug, "pil")
    text_rows = teacher_text_rows(teachers).numpy()
    samples = []
    for i, path, label in files:
        png = open(path, "rb").read()
        image = decode_rgb(png)
        hw = tuple(image.shape[1:])
        entries = [draw.sample(random.Random(entry_seed(0, str(i), j)), hw) for j in range(num_samples)]
        views = torch.stack([render.apply(e, image) for e in entries])
        rows = np.repeat(text_rows[label][None], 1 + len(SYNTHETIC), 0)
        caps = captions(label)
        samples.append(DRSample(uid=f"{i:032x}", image_ext="png", image=png, caption=caps[0], url=None,
                                syn={"syn_text": caps[1:]}, entries=entries,
                                image_emb=teacher_image_rows(teachers, views).numpy(), text_emb=rows[:1],
                                syn_emb={"syn_text": rows[1:]}))
    return samples


def write_shards(folder: str, samples: list[DRSample], storage: StorageSpec, shards: int = 4) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    per, urls = -(-len(samples) // shards), []
    for s in range(shards):
        urls.append(os.path.join(folder, f"{s:04d}.tar"))
        with open(urls[-1], "wb") as f, ShardWriter(f) as writer:
            for sample in samples[s * per:(s + 1) * per]:
                writer.write(sample.uid, encode_dr_sample(sample, storage))
    return urls


def log_targets(image: torch.Tensor, text: torch.Tensor, dims: list[int], scales: list[float]) -> list[torch.Tensor]:
    """log of readers.losses.teacher_targets (both directions), in float64: at sigma=100 most probabilities
    underflow float32, and the KL needs their logs."""
    bounds = np.cumsum([0, *dims])
    sims = [s * image[:, a:b].double() @ text[:, a:b].double().T for s, a, b in zip(scales, bounds[:-1], bounds[1:])]
    return [torch.logsumexp(torch.stack([x.log_softmax(1) for x in sim]), 0) - np.log(len(dims))
            for sim in (sims, [x.T for x in sims])]


def target_error(samples: list[DRSample], storage: StorageSpec, dims: list[int], scales: list[float],
                 batch: int) -> tuple[float, float]:
    """(embedding member bytes per sample / bf16 layout, mean KL of the KD targets vs float32), over batches of
    `batch` samples, view j of each against its ground-truth row: what the student's loss sees."""
    size, decoded = 0, []
    for s in samples:
        size += len(embedding_member(embedding_arrays(s, "legacy"), storage)[1])
        back = decode_dr_sample({"__key__": s.uid, **encode_dr_sample(s, storage)})  # the reader's decode
        decoded.append({"image_emb": torch.from_numpy(back.image_emb), "text_emb": torch.from_numpy(back.text_emb)})
    layout = sum(a.size for a in embedding_arrays(samples[0], "legacy").values()) * 2
    kls = []
    for start in range(0, len(samples) - batch + 1, batch):
        group = range(start, start + batch)
        text = [torch.stack([torch.from_numpy(samples[i].text_emb[0]) for i in group]),
                torch.stack([decoded[i]["text_emb"][0] for i in group])]
        for j in range(samples[0].image_emb.shape[0]):
            image = [torch.stack([torch.from_numpy(samples[i].image_emb[j]) for i in group]),
                     torch.stack([decoded[i]["image_emb"][j] for i in group])]
            ref, got = (log_targets(im, tx, dims, scales) for im, tx in zip(image, text))
            kls += [float((lp.exp() * (lp - lq)).sum(1).mean()) for lp, lq in zip(ref, got)]
    return size / len(samples) / layout, float(np.mean(kls))


# ------------------------------------------------------------------------------------------------
# students

def epoch_batches(dataset: MobileCLIPDRDataset, batch_size: int, seed: int):
    """Batches of the reader's items, every epoch in a new seeded order (the reader walks shards in order)."""
    epoch = 0
    while True:
        dataset.set_epoch(epoch)
        items = list(dataset)
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        for b in range(len(items) // batch_size):
            chosen = [items[k] for k in order[b * batch_size:(b + 1) * batch_size]]
            yield {key: torch.stack([it[key] for it in chosen]) for key in
                   ("image", "text", "syn_text", "image_emb", "text_emb", "syn_emb")}
        epoch += 1


def zero_shot(model: Student, spec: dict) -> float:
    images, labels = dr._images(spec["test_files"])
    plain = Augmenter(spec["augmentation"], "pil")
    x = torch.stack([plain.plain(im) for im in images])
    model.eval()
    with torch.inference_mode():
        prompts = model.text(torch.cat([tokenize(captions(k)[0]) for k in range(10)]))
        image = torch.cat([model.encode_image(x[s:s + 512]) for s in range(0, len(x), 512)])
    return float(((image @ prompts.T).argmax(1) == torch.tensor(labels)).float().mean()) * 100


def student_job(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    dr.seed_everything(spec["seed"])
    weights = spec["weights"][spec["arm"]]
    dataset = MobileCLIPDRDataset(spec["urls"][spec["arm"]], tokenize, image_augmentation=spec["augmentation"],
                                  mode="random", seed=spec["seed"])
    model = Student(spec["student"], spec["seed"])
    data = epoch_batches(dataset, spec["batch_size"], spec["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=spec["weight_decay"])
    steps, warmup = spec["steps"], max(1, spec["steps"] // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else
                                              0.5 * (1 + np.cos(np.pi * (s - warmup) / (steps - warmup))))
    model.train()
    started = time.perf_counter()
    for _ in range(steps):
        b = next(data)
        loss = mobileclip_distill_loss(
            model.encode_image(b["image"]), model.text(b["text"]), model.text(b["syn_text"]),
            model.logit_scale.exp().clamp(max=100), b["image_emb"], b["text_emb"], b["syn_emb"], spec["dims"],
            spec["scales"], loss_weights=weights)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    wall = time.perf_counter() - started
    return {"arm": spec["arm"], "seed": spec["seed"], "acc": zero_shot(model, spec), "wall": wall,
            "skipped": sum(dataset.skipped.values())}


# ------------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--teacher-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--student", default="test_resnet")
    p.add_argument("--teachers", default="resnet10t,resnet18")
    p.add_argument("--logit-scale", type=float, default=100.0, help="teachers' sigma (DataCompDR's teachers: ~100)")
    p.add_argument("--num-samples", type=int, default=32, help="N stored augmentations per image")
    p.add_argument("--subset-fraction", type=float, default=0.25)
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--kd-weights", type=float, nargs=2, default=(0.25, 0.75),
                   help="(contrastive, distillation) loss weights of every arm but no-kd; 0 1 = distillation only")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--work", help="working folder (default: a temporary one, removed afterwards)")
    p.add_argument("--reuse", action="store_true", help="with --work: reuse the teacher checkpoints found there")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "dr_effect_clip.md"))
    args = p.parse_args(argv)
    arms = args.arms.split(",")
    if "float" not in arms or any(a not in ARMS for a in arms):
        p.error(f"arms: a comma list of {list(ARMS)} that includes float (the reference)")
    command = " ".join(["../shared/tools/offline .venv/bin/python bench/dr_effect_clip.py",
                        *(sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(args.jobs)
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    work = args.work or tempfile.mkdtemp(prefix="dr-effect-clip-")
    aug = dr.augmentation(32, (0.15, 1.0), False)
    import multiprocessing
    pool = multiprocessing.get_context("spawn").Pool(args.jobs) if args.jobs > 1 else None
    try:
        dr.seed_everything(0)
        data = dr.make_data(work, 32, args.subset_fraction, shards=1, test_fraction=0.5)
        common = {"threads": 1, "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
                  "augmentation": aug, "test_files": tuple(data["test"]), "reuse": args.reuse}
        names = args.teachers.split(",")
        os.makedirs(os.path.join(work, "teachers"), exist_ok=True)
        specs = [{**common, "model": n, "seed": 1000 + k, "steps": args.teacher_steps, "train_files": tuple(data["train"]),
                  "checkpoint": os.path.join(work, "teachers", f"{n}.pth")} for k, n in enumerate(names)]
        t0 = time.perf_counter()
        teacher_acc = {r["model"]: r["acc"] for r in dr.run_jobs(pool, dr.teacher_job, specs)}
        teacher_seconds = time.perf_counter() - t0
        teachers = load_teachers(specs)
        dims, scales = [m.num_features for m in teachers], [args.logit_scale] * len(teachers)

        # the teachers' own zero-shot accuracy in their embedding space (mean over teachers after softmax)
        test_images, test_labels = dr._images(tuple(data["test"]))
        plain = Augmenter(aug, "pil")
        emb = teacher_image_rows(teachers, torch.stack([plain.plain(im) for im in test_images]))
        probs, _ = teacher_targets(emb, teacher_text_rows(teachers), dims, scales)
        teacher_zero_shot = float((probs.argmax(1) == torch.tensor(test_labels)).float().mean()) * 100

        t0 = time.perf_counter()
        share = -(-len(data["subset"]) // args.jobs)
        parts = [{**common, "files": data["subset"][k:k + share], "teachers": specs, "N": args.num_samples}
                 for k in range(0, len(data["subset"]), share)]
        samples = [s for part in (pool.map(reinforce_job, parts) if pool else map(reinforce_job, parts)) for s in part]
        storages = {a: ARMS[a][1] for a in arms}
        urls = {a: write_shards(os.path.join(work, "shards", a), samples, s) for a, s in storages.items()}
        errors = {a: target_error(samples, s, dims, scales, args.batch_size) for a, s in storages.items()}
        reinforce_seconds = time.perf_counter() - t0
        print(f"teachers {teacher_acc}, zero-shot {teacher_zero_shot:.2f}%; {len(samples)} samples x N={args.num_samples} "
              f"written {len(storages)} ways in {reinforce_seconds:.0f}s", flush=True)

        weights = {a: ARMS[a][2] if a == "no-kd" else tuple(args.kd_weights) for a in arms}
        jobs = [{**common, "arm": a, "seed": s, "steps": args.steps, "student": args.student, "urls": urls,
                 "dims": dims, "scales": scales, "weights": weights} for s in range(args.seeds) for a in arms]
        results: dict = {a: {} for a in arms}
        t0 = time.perf_counter()
        for r in dr.run_jobs(pool, student_job, jobs):
            results[r["arm"]][r["seed"]] = r
            print(f"seed {r['seed']} {r['arm']:8s} zero-shot {r['acc']:6.2f}%  ({r['wall']:.0f}s, skipped "
                  f"{r['skipped']})", flush=True)
        student_seconds = time.perf_counter() - t0
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    def col(arm):
        return [results[arm][s]["acc"] for s in sorted(results[arm])]

    lines = [
        f"CLIP student (`{args.student}` image tower + bag-of-words text tower, {EMBED}-d) on {len(samples)} digits "
        f"({args.subset_fraction:.0%} of the {len(data['train'])}-image train split), 32 px, zero-shot on "
        f"{len(data['test'])} held-out digits with the prompt \"{PROMPT}\". Every arm: {args.steps} steps x batch "
        f"{args.batch_size}, AdamW lr {args.lr} wd {args.weight_decay}, warm-up + cosine, loss "
        f"`mobileclip_distill_loss` (ground-truth + one synthetic caption), weights (contrastive, KD) as listed; "
        f"{args.seeds} seeds (mean ± sample std; Δ paired by seed: same init, batches and replayed views).",
        f"Shards: N={args.num_samples} stored augmentations per image (RRC(32, scale=(0.15, 1)) + RandAugment, "
        f"`pil` replay), G=1 + S={len(SYNTHETIC)} captions, teachers {', '.join(names)} ({args.teacher_steps} steps), "
        f"dims {dims}, sigma {args.logit_scale:g}. Bytes: the embedding member per sample / the bf16 DataCompDR "
        f"layout (N + G + S rows x D x 2 B); KD KL: mean KL(float32 targets || stored targets) of "
        f"softmax(sigma image . text^T) over batches of {args.batch_size}, both directions.",
        "",
        "| arm | bytes / bf16 | KD mean KL | loss weights | zero-shot acc % | Δ vs float32, paired |",
        "|---|---|---|---|---|---|",
    ]
    for a in arms:
        label = ARMS[a][0]
        delta = "" if a == "float" else dr.fmt([x - y for x, y in zip(col(a), col("float"))], signed=True)
        size, kl = errors[a]
        lines.append(f"| {label} | {size:.3f} | {kl:.1e} | {weights[a]} | {dr.fmt(col(a))} | {delta} |")
    lines += ["", "| teacher | test acc % (classifier) |", "|---|---|"]
    lines += [f"| {n} | {acc:.2f} |" for n, acc in teacher_acc.items()]
    lines.append(f"| both, zero-shot in the embedding space (argmax_k image . text(k), mean after softmax) | "
                 f"{teacher_zero_shot:.2f} |")
    lines.append("")
    lines.append(f"- skipped samples (reader): {sum(r['skipped'] for a in arms for r in results[a].values())}")
    lines.append(f"- seconds: teachers {teacher_seconds:.0f}, teacher rows + shards {reinforce_seconds:.0f}, students "
                 f"{student_seconds:.0f} ({len(jobs)} runs, {args.jobs} side by side), whole benchmark "
                 f"{time.perf_counter() - t_start:.0f}; 1-min load average at start {load_start:.1f}, at end "
                 f"{os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)")
    text = "\n".join(lines)
    print("\n" + text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(f"# CLIP distillation from stored DataCompDR targets, per storage codec (bench/dr_effect_clip.py)\n\n"
                f"Command (repository root, 2 CPU cores shared with other work, no GPU):\n\n    {command}\n\n{text}\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
