"""Does a reinforced dataset help? Dataset Reinforcement (ImageNet+) in miniature, all on CPU.

1. Data: scikit-learn digits (8x8, 0..16) upsampled to 32x32 PNG files; stratified train/test split;
   a stratified fraction of train is the (data-limited) student training subset.
2. Teachers: small timm CNNs trained here on the full train split, saved as local checkpoints and
   loaded by the ImageNet+ pipeline exactly as a user would (`teachers: [{model, checkpoint}]`).
3. Reinforcement: the student subset, written as WebDataset shards (png + cls), goes through the
   real pipeline (`run_recipe`) on an embedded local Ray: N stored augmentations per image
   (RRC + RandAugment, no flip: digits are not mirror-symmetric), teacher ensemble top-k
   probabilities; once without and once with MixUp/CutMix.
4. Students (one timm architecture, same steps / optimizer / batch / augmentation family):
     a  plain labels, the same augmentations drawn live, one-hot targets
     b  reinforced shards: ReinforcedImageNet(run_dir, mode="random") + kd_loss
     c  control: b with each replayed view given the stored target of a *different* stored
        augmentation of the same image (misaligned)
     d  online KD: live augmentations, teacher ensemble forward every step (what the shards save)
   "+mix" rows use the MixUp/CutMix run (b, c) or draw MixUp/CutMix live (a: mixed one-hot, d;
   not in the default set, add them with --arms).
5. Prints (and writes to bench/results/) test accuracy mean ± std over seeds, the paired
   difference to (a), training wall and CPU time, and the teachers' own accuracy.

CPU use: each model is trained in its own single-threaded process, two side by side (--jobs 2
--threads 1 = the 2 cores). Measured here: these 32 px models are data-bound, so a second torch
thread gives almost nothing, and torch with 2 threads slows down up to ~8x when anything else runs
on the 2 cores; CPU seconds are reported beside wall seconds because they are steadier on a shared
machine. `--jobs 1 --threads 2` runs everything in one process.

What tuning showed (same teachers and seeds, 250 steps): the gap between (b) and (d) is the number of
stored augmentations. N=64 gave (b) 97.3 vs (d) 97.8 % (each image is visited ~70 times, so stored
views repeat); N=128 and N=256 gave 98.1 / 98.0 %. Top-10 instead of top-5 made no difference at
N=64 (97.2 vs 97.4 %, 4 seeds). Replay is exact (checked in every run, see replay_check). A milder
crop (RRC scale 0.35) left too little headroom: all four arms within 97.5-98.2 %, inside seed noise.
The reader's cost per item grows with N (it decodes all N entries and probabilities to use one):
sample() 0.30 ms at N=64, 0.72 ms at N=256 (no mixing), so N=128 is the default here.

Defaults: ~8 min on 2 quiet cores; --quick (100 steps, N=32, no MixUp/CutMix rows) ~2.5 min.
Run: ../shared/tools/offline .venv/bin/python bench/dr_effect.py [--quick]
"""
from __future__ import annotations

import argparse
import io
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # storage_codecs (arm b-q8)
from conftest import write_shard  # noqa: E402  the tests' WebDataset shard writer

from reinforge.readers import ReinforcedImageNet, kd_loss  # noqa: E402
from reinforge.formats.augment import Augmenter  # noqa: E402
from reinforge.formats.image import decode_rgb  # noqa: E402
from reinforge.formats.imagenet_plus import densify  # noqa: E402

NUM_CLASSES = 10
MEAN_STD = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
ARM_NAMES = {
    "a": "(a) plain labels, live aug",
    "a+mix": "(a) plain labels, live aug + MixUp/CutMix",
    "b": "(b) reinforced shards (KD from stored top-k)",
    "b+mix": "(b) reinforced shards + MixUp/CutMix",
    "b-q8": "(b) from a compressed run: top-k as 8-bit log-probabilities",
    "c": "(c) control: misaligned stored targets",
    "c+mix": "(c) control: misaligned + MixUp/CutMix",
    "d": "(d) online KD, live teachers every step",
    "d+mix": "(d) online KD + MixUp/CutMix",
}


def augmentation(size: int, scale: tuple[float, float], mix: bool) -> dict:
    aug = {"random_resized_crop": {"size": size, "scale": list(scale)},
           "rand_augment": {"p": 1.0},
           "normalize": MEAN_STD}
    if mix:  # as ImageNet+: MixUp alpha 1 (lam / 2, p 0.5) or CutMix alpha 1 (p 0.5)
        aug.update({"mixup": {"alpha": 1.0, "p": 0.5, "div_by": 2.0}, "cutmix": {"alpha": 1.0, "p": 0.5}})
    return aug


# ------------------------------------------------------------------------------------------------
# 1. data

def digit_png(x: np.ndarray, size: int) -> bytes:
    from PIL import Image
    img = Image.fromarray(np.round(x.reshape(8, 8) * (255.0 / 16.0)).astype(np.uint8), "L")
    buf = io.BytesIO()
    img.resize((size, size), Image.BICUBIC).save(buf, format="PNG")
    return buf.getvalue()


def make_data(work: str, size: int, subset_fraction: float, shards: int, test_fraction: float = 0.3) -> dict:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    X, y = load_digits(return_X_y=True)
    idx = np.arange(len(y))
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, stratify=y, random_state=0)
    subset_idx, _ = train_test_split(train_idx, train_size=subset_fraction, stratify=y[train_idx], random_state=0)
    data = {}
    for split, ids in (("train", train_idx), ("test", test_idx), ("subset", subset_idx)):
        files = []
        for i in sorted(ids.tolist()):
            folder = os.path.join(work, "digits", "train" if split == "subset" else split, str(y[i]))
            path = os.path.join(folder, f"{i:04d}.png")
            if split != "subset":  # real image files, ImageFolder layout
                os.makedirs(folder, exist_ok=True)
                with open(path, "wb") as f:
                    f.write(digit_png(X[i], size))
            files.append((i, path, int(y[i])))
        data[split] = files
    # the student subset as WebDataset input shards: png + cls members, read from the files above
    folder = os.path.join(work, "input")
    os.makedirs(folder, exist_ok=True)
    per = math.ceil(len(data["subset"]) / shards)
    for s in range(shards):
        write_shard(os.path.join(folder, f"subset-{s:04d}.tar"), [
            (f"digit{i:04d}", {"png": open(path, "rb").read(), "cls": str(label).encode()})
            for i, path, label in data["subset"][s * per:(s + 1) * per]])
    data["input_path"] = os.path.join(folder, f"subset-{{0000..{shards - 1:04d}}}.tar")
    return data


def load_images(files: list) -> tuple[list[torch.Tensor], list[int]]:
    images, labels = [], []
    for _, path, label in files:
        with open(path, "rb") as f:
            images.append(decode_rgb(f.read()))  # the reader's own decoder
        labels.append(label)
    return images, labels


# ------------------------------------------------------------------------------------------------
# datasets: item i of epoch e -> (float view CHW, dense target [C])

class LiveAugmented(torch.utils.data.Dataset):
    """The Augmenter config drawn live: a fresh random.Random per (seed, epoch, item); one-hot targets
    (mixed by the drawn lam when MixUp/CutMix fire, the partner drawn from the whole set)."""

    def __init__(self, images: list[torch.Tensor], labels: list[int], image_augmentation: dict, seed: int):
        self.images, self.labels, self.seed, self.epoch = images, labels, seed, 0
        self.augmenter = Augmenter(image_augmentation)
        self.layout = self.augmenter.layout()

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int):
        rng = random.Random(f"live:{self.seed}:{self.epoch}:{i}")
        target = F.one_hot(torch.tensor(self.labels[i]), NUM_CLASSES).float()
        if not self.augmenter.uses_partner:
            _, view = self.augmenter.augment(rng, self.images[i])
            return view, target
        p = (i + 1 + rng.randrange(len(self.images) - 1)) % len(self.images)
        entry, view = self.augmenter.augment(rng, self.images[i], p, self.images[p])
        if entry[0] is not None:
            slots = dict(zip(self.layout, entry))
            lam = slots["mixup"] if slots.get("mixup") is not None else slots["cutmix"][0]
            target = lam * target + (1 - lam) * F.one_hot(torch.tensor(self.labels[p]), NUM_CLASSES).float()
        return view, target


class MisalignedTargets(torch.utils.data.Dataset):
    """Control (c): the view replays stored augmentation j (exactly as ReinforcedImageNet does), the
    target is the stored probabilities of another augmentation j' != j of the same image."""

    def __init__(self, base: ReinforcedImageNet):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __getitem__(self, i: int):
        view, _ = self.base[i]
        sample = self.base.sample(i)
        n = sample.num_augmentations
        j = self.base.choose(i, n)  # the augmentation base[i] just replayed (p_plain = 0)
        rng = random.Random(f"misaligned:{self.base.seed}:{self.base.epoch}:{i}")
        other = (j + 1 + rng.randrange(n - 1)) % n
        return view, densify(sample.values[other], sample.ids[other], self.base.num_classes)


class Epochs(torch.utils.data.Dataset):
    """Global index epoch * n + i -> dataset.set_epoch(epoch); dataset[i]. Works in persistent workers."""

    def __init__(self, dataset):
        self.dataset, self.n = dataset, len(dataset)

    def __len__(self) -> int:
        return 1 << 40

    def __getitem__(self, g: int):
        epoch, i = divmod(g, self.n)
        if epoch != getattr(self.dataset, "epoch", None):
            self.dataset.set_epoch(epoch)
        return self.dataset[i]


class EpochPermutations(torch.utils.data.Sampler):
    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed

    def __iter__(self):
        epoch = 0
        while True:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            yield from (epoch * self.n + torch.randperm(self.n, generator=g)).tolist()
            epoch += 1


def batches(dataset, batch_size: int, seed: int, workers: int):
    loader = torch.utils.data.DataLoader(
        Epochs(dataset), batch_sampler=torch.utils.data.BatchSampler(EpochPermutations(len(dataset), seed),
                                                                     batch_size, drop_last=True),
        num_workers=workers, persistent_workers=workers > 0)
    return iter(loader)


# ------------------------------------------------------------------------------------------------
# training

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_model(name: str, seed: int) -> torch.nn.Module:
    import timm
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=NUM_CLASSES)


def train(model: torch.nn.Module, data, steps: int, lr: float, weight_decay: float,
          teachers=None) -> tuple[float, float]:
    """AdamW, linear warm-up then cosine; loss = kd_loss(logits, target) (= cross-entropy for one-hot).
    With `teachers`, the target is replaced by the ensemble's probabilities of the same views.
    Returns (wall seconds, CPU seconds of this process): the machine is shared, CPU time is steadier."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else
                                              0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))))
    model.train()
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        x, target = next(data)
        if teachers is not None:
            target = teachers.probabilities(x).clone()  # clone: out of inference mode
        loss = kd_loss(model(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return time.perf_counter() - started, time.process_time() - cpu


@torch.inference_mode()
def predict_probs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([torch.softmax(model(x[s:s + 512]), -1) for s in range(0, len(x), 512)])


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probs.argmax(-1) == labels).float().mean()) * 100


# ------------------------------------------------------------------------------------------------
# 3. reinforcement with the real pipeline

def reinforce(work: str, name: str, input_path: str, teachers: list[dict], image_augmentation: dict,
              num_samples: int, top_k: int, reuse: bool = False) -> tuple[str, float]:
    from reinforge.runtime.runner import run_recipe
    from reinforge.products.registry import parse_recipe
    output = os.path.join(work, name)
    if not reuse:
        shutil.rmtree(output, ignore_errors=True)
    recipe = parse_recipe({
        "product": "imagenet_plus", "output": output, "seed": 0,
        "input": {"format": "webdataset", "path": input_path},
        "augmentation": {"num_samples": num_samples, "image_augmentation": image_augmentation},
        "teachers": teachers, "top_k": top_k,
        "resources": {"num_actors": 2, "cpus_per_actor": 1, "object_store_memory_mb": 256},
    })
    started = time.perf_counter()
    summary = run_recipe(recipe, progress=False)
    if not summary.ok or summary.errors:
        raise SystemExit(f"reinforcement {name} failed: {summary}")
    return output, time.perf_counter() - started



def replay_check(run_dir: str, teacher_specs: list[dict], images: int = 8) -> tuple[int, int, float]:
    """Re-render every stored augmentation of the first images as Apple's ml-dr trainer does (PIL replay,
    tests/consumer_reference.py; partners found by key) and re-score them with the same teachers: (rows
    with identical top-k ids, rows, max |stored - recomputed| probability). Stored values are float16,
    so ~1e-3 is exact."""
    from consumer_reference import default_loader, reapply
    from reinforge.models.specs import TimmTeacherSpec
    from reinforge.stages.teachers import TeacherEnsemble
    ds = ReinforcedImageNet(run_dir)
    ensemble = TeacherEnsemble([TimmTeacherSpec(**t) for t in teacher_specs], top_k=NUM_CLASSES, device="cpu")
    ensemble.setup()
    same = rows = 0
    worst = 0.0
    for i in range(min(images, len(ds))):
        sample = ds.sample(i)
        image = default_loader(sample.image)
        views = []
        for entry in sample.entries:
            partner = entry[0] if ds.augmenter.uses_partner else None
            partner_image = None if partner is None else default_loader(ds.sample(ds.index_of(partner)).image)
            views.append(reapply(ds.augmenter.config(), entry, image, partner_image))
        values, ids = torch.topk(ensemble.probabilities(torch.stack(views)), sample.ids.shape[1], dim=-1)
        same += int((ids.numpy() == sample.ids).all(1).sum())
        rows += len(sample.entries)
        worst = max(worst, float(np.abs(values.numpy() - sample.values).max()))
    return same, rows, worst


# ------------------------------------------------------------------------------------------------
# jobs: one model trained and tested, in a single-threaded worker process (two run side by side)

_IMAGES: dict = {}


def _images(files: tuple) -> tuple[list[torch.Tensor], list[int]]:
    if files not in _IMAGES:  # decoded once per worker process
        _IMAGES[files] = load_images(list(files))
    return _IMAGES[files]


def _test_set(spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = _images(spec["test_files"])
    plain = Augmenter(spec["augmentation"])
    return torch.stack([plain.plain(im) for im in images]), torch.tensor(labels)


def teacher_job(spec: dict) -> dict:
    """Train one teacher on the full train split (live augmentation, one-hot) and save its checkpoint."""
    torch.set_num_threads(spec["threads"])
    seed_everything(spec["seed"])
    model = make_model(spec["model"], spec["seed"])
    if spec["reuse"] and os.path.exists(spec["checkpoint"]):
        model.load_state_dict(torch.load(spec["checkpoint"], weights_only=True))
        wall = cpu = 0.0
    else:
        images, labels = _images(spec["train_files"])
        live = LiveAugmented(images, labels, spec["augmentation"], spec["seed"])
        wall, cpu = train(model, batches(live, spec["batch_size"], spec["seed"], 0), spec["steps"], spec["lr"],
                          spec["weight_decay"])
        torch.save(model.state_dict(), spec["checkpoint"])
    test_x, test_y = _test_set(spec)
    probs = predict_probs(model, test_x)
    return {"model": spec["model"], "probs": probs.numpy(), "acc": accuracy(probs, test_y), "wall": wall, "cpu": cpu}


class CachedLastSample(ReinforcedImageNet):
    """ReinforcedImageNet that keeps the last decoded sample, so that the control reads each item once."""
    _last: tuple | None = None

    def sample(self, i: int):
        if self._last is None or self._last[0] != i:
            self._last = (i, super().sample(i))
        return self._last[1]


class Logq8Targets(ReinforcedImageNet):
    """(b-q8): what a reader decodes from a run whose top-k probabilities were stored as 8-bit codes of -log p
    (bench/storage_codecs.py): the same views, the stored values through that codec's round trip."""

    def sample(self, i: int):
        from storage_codecs import logq8_decode, logq8_encode
        sample = super().sample(i)
        sample.values = logq8_decode(logq8_encode(sample.values))
        return sample


def student_setup(spec: dict) -> tuple:
    """(dataset, teachers or None, model) of one student arm and seed."""
    arm, seed = spec["arm"], spec["seed"]
    kind, mix = arm[0], arm.endswith("+mix")
    seed_everything(seed)
    teachers = None
    if kind in "ad":
        images, labels = _images(spec["subset_files"])
        dataset = LiveAugmented(images, labels, augmentation(spec["size"], spec["scale"], mix), seed)
        if kind == "d":
            from reinforge.models.specs import TimmTeacherSpec
            from reinforge.stages.teachers import TeacherEnsemble
            teachers = TeacherEnsemble([TimmTeacherSpec(**t) for t in spec["teachers"]], top_k=NUM_CLASSES, device="cpu")
            teachers.setup()  # the same checkpoints and ensemble code the pipeline used
    elif arm.startswith("b-q8"):
        dataset = Logq8Targets(spec["run_dirs"][mix], mode="random", seed=seed)
    elif kind == "b":
        dataset = ReinforcedImageNet(spec["run_dirs"][mix], mode="random", seed=seed)
    else:
        dataset = MisalignedTargets(CachedLastSample(spec["run_dirs"][mix], mode="random", seed=seed))
    return dataset, teachers, make_model(spec["student"], seed)


def student_job(spec: dict) -> dict:
    """Train one student arm for one seed; returns its test accuracy and training wall / CPU seconds."""
    torch.set_num_threads(spec["threads"])
    dataset, teachers, model = student_setup(spec)
    wall, cpu = train(model, batches(dataset, spec["batch_size"], spec["seed"], spec["workers"]), spec["steps"],
                      spec["lr"], spec["weight_decay"], teachers=teachers)
    test_x, test_y = _test_set(spec)
    return {"arm": spec["arm"], "seed": spec["seed"], "acc": accuracy(predict_probs(model, test_x), test_y),
            "wall": wall, "cpu": cpu}


def timing_job(spec: dict) -> dict:
    """Per-step cost of arms a, b, d measured interleaved in one process (rounds of `steps` steps, the
    order rotating each round), so that load from other work hits every arm alike; median over rounds."""
    torch.set_num_threads(spec["threads"])
    arms = [a for a in ("a", "b", "d") if a in spec["arms"]]
    setups = {}
    for arm in arms:
        dataset, teachers, model = student_setup({**spec, "arm": arm, "seed": 0})
        setups[arm] = (batches(dataset, spec["batch_size"], 0, spec["workers"]), teachers, model)
    wall: dict = {a: [] for a in arms}
    cpu: dict = {a: [] for a in arms}
    for r in range(spec["rounds"] + 1):
        for arm in arms[r % len(arms):] + arms[:r % len(arms)]:
            data, teachers, model = setups[arm]
            w, c = train(model, data, spec["steps"], spec["lr"], spec["weight_decay"], teachers=teachers)
            if r:  # round 0 warms up
                wall[arm].append(w / spec["steps"] * 1000)
                cpu[arm].append(c / spec["steps"] * 1000)
    return {a: (statistics.median(wall[a]), statistics.median(cpu[a])) for a in arms}


def run_jobs(pool, fn, specs: list[dict]):
    if pool is None:
        yield from map(fn, specs)
    else:
        yield from pool.imap_unordered(fn, specs)


# ------------------------------------------------------------------------------------------------

def fmt(values: list[float], signed: bool = False) -> str:
    mean = f"{statistics.mean(values):{'+' if signed else ''}.2f}"
    return mean if len(values) < 2 else f"{mean} ± {statistics.stdev(values):.2f}"


ARM_COST = {"d": 4, "c": 3, "b": 2, "a": 1}  # longest jobs first, for an even split over the workers


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="~2 minute version: fewer steps, N and arms")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, help="student training steps (same for every arm)")
    p.add_argument("--teacher-steps", type=int)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--student", default="test_resnet")
    p.add_argument("--teachers", default="resnet10t,resnet18")
    p.add_argument("--num-samples", type=int, help="N stored augmentations per image")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--scale", type=float, nargs=2, default=(0.15, 1.0), help="RandomResizedCrop scale")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--subset-fraction", type=float, default=0.25, help="student subset, fraction of train")
    p.add_argument("--test-fraction", type=float, default=0.5, help="held-out test split of the 1,797 digits")
    p.add_argument("--arms", help="comma list of " + ",".join(ARM_NAMES))
    p.add_argument("--jobs", type=int, default=2, help="models trained side by side (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job (jobs x threads = cores)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per job")
    p.add_argument("--work", help="working folder (default: a temporary one, removed afterwards)")
    p.add_argument("--reuse", action="store_true", help="with --work: reuse teacher checkpoints and finished "
                   "runs found there (for iterating on the students; timings of those steps are then meaningless)")
    p.add_argument("--out", help="markdown result file (default bench/results/dr_effect[_quick].md)")
    args = p.parse_args(argv)
    quick = args.quick
    steps = args.steps or (100 if quick else 250)
    teacher_steps = args.teacher_steps or (100 if quick else 200)
    num_samples = args.num_samples or (32 if quick else 128)
    arms = (args.arms or ("a,b,c,d" if quick else "a,b,c,d,b+mix,c+mix")).split(",")
    unknown = [a for a in arms if a not in ARM_NAMES]
    if unknown:
        p.error(f"unknown arms {unknown}")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"dr_effect{'_quick' if quick else ''}.md")
    command = " ".join(["../shared/tools/offline .venv/bin/python bench/dr_effect.py",
                        *(sys.argv[1:] if argv is None else argv)])

    torch.set_num_threads(args.threads * args.jobs)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    work = args.work or tempfile.mkdtemp(prefix="dr-effect-")
    os.makedirs(work, exist_ok=True)
    pool = None
    if args.jobs > 1:  # spawn: no fork of a process that holds torch / Ray threads
        import multiprocessing
        pool = multiprocessing.get_context("spawn").Pool(args.jobs)
    try:
        seed_everything(0)
        data = make_data(work, args.size, args.subset_fraction, shards=4, test_fraction=args.test_fraction)
        n_train, n_subset, n_test = len(data["train"]), len(data["subset"]), len(data["test"])
        common = {"threads": args.threads, "batch_size": args.batch_size, "lr": args.lr,
                  "weight_decay": args.weight_decay, "augmentation": augmentation(args.size, args.scale, False),
                  "test_files": tuple(data["test"]), "reuse": args.reuse}
        print(f"digits at {args.size}px: train {n_train}, test {n_test}, student subset {n_subset} "
              f"({args.subset_fraction:.0%} of train); {args.jobs} job(s) x {args.threads} thread(s)", flush=True)

        # 2. teachers, trained on the full train split, saved as user checkpoints
        os.makedirs(os.path.join(work, "teachers"), exist_ok=True)
        names = args.teachers.split(",")
        specs = [{**common, "model": name, "seed": 1000 + k, "steps": teacher_steps,
                  "train_files": tuple(data["train"]),
                  "checkpoint": os.path.join(work, "teachers", f"{name}.pth")} for k, name in enumerate(names)]
        t0 = time.perf_counter()
        done = {r["model"]: r for r in run_jobs(pool, teacher_job, specs)}
        teacher_seconds = time.perf_counter() - t0
        test_y = torch.tensor([label for _, _, label in data["test"]])
        teacher_acc = {name: done[name]["acc"] for name in names}
        teacher_acc["ensemble (mean softmax)"] = accuracy(
            torch.from_numpy(np.mean([done[n]["probs"] for n in names], axis=0)), test_y)
        for name in names:
            print(f"teacher {name}: test acc {done[name]['acc']:.2f}% ({teacher_steps} steps, "
                  f"{done[name]['wall']:.0f}s)", flush=True)
        print(f"teacher ensemble: test acc {teacher_acc['ensemble (mean softmax)']:.2f}%", flush=True)
        teacher_specs = [{"model": s["model"], "num_classes": NUM_CLASSES, "checkpoint": s["checkpoint"],
                          "batch_size": 256} for s in specs]

        # 3. reinforce the student subset with the real pipeline on local Ray
        import ray

        from reinforge.runtime.ray_session import start_local_ray
        run_dirs, reinforce_seconds, replay = {}, {}, {}
        t0 = time.perf_counter()
        start_local_ray(num_cpus=2, object_store_memory_mb=256)
        try:
            for mix in sorted({a.endswith("+mix") for a in arms if a[0] in "bc"}):
                name = "run-mix" if mix else "run"
                run_dirs[mix], reinforce_seconds[name] = reinforce(
                    work, name, data["input_path"], teacher_specs, augmentation(args.size, args.scale, mix),
                    num_samples, args.top_k, args.reuse)
                print(f"reinforced {n_subset} images x N={num_samples} ({name}): "
                      f"{reinforce_seconds[name]:.0f}s", flush=True)
                replay[name] = replay_check(run_dirs[mix], teacher_specs)
                print(f"replay check ({name}): top-{args.top_k} ids identical in {replay[name][0]}/{replay[name][1]} "
                      f"re-rendered views, max |stored - recomputed| = {replay[name][2]:.1e}", flush=True)
        finally:
            ray.shutdown()
        ray_seconds = time.perf_counter() - t0

        # 4. students: every arm x seed is one job
        specs = [{**common, "arm": arm, "seed": seed, "steps": steps, "student": args.student,
                  "workers": args.workers, "size": args.size, "scale": tuple(args.scale),
                  "subset_files": tuple(data["subset"]), "teachers": teacher_specs, "run_dirs": run_dirs}
                 for seed in range(args.seeds) for arm in arms]
        specs.sort(key=lambda s: (-ARM_COST[s["arm"][0]], s["seed"]))
        results = {a: {} for a in arms}
        t0 = time.perf_counter()
        for r in run_jobs(pool, student_job, specs):
            results[r["arm"]][r["seed"]] = r
            print(f"seed {r['seed']} {r['arm']:6s} test acc {r['acc']:6.2f}%  train {r['wall']:5.1f}s wall, "
                  f"{r['cpu']:5.1f}s CPU", flush=True)
        student_seconds = time.perf_counter() - t0

        # per-step cost of a, b, d, interleaved in one single job (the other worker idles)
        timing = {}
        if {"b", "d"} <= set(arms):
            spec = {**specs[0], "arms": arms, "steps": 15, "rounds": 4}
            timing = pool.apply(timing_job, (spec,)) if pool is not None else timing_job(spec)
        total = time.perf_counter() - t_start
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    # 5. report
    def col(arm: str, field: str) -> list[float]:
        return [results[arm][seed][field] for seed in sorted(results[arm])]

    lines = [
        f"Student `{args.student}` on {n_subset} digits ({args.subset_fraction:.0%} of the {n_train}-image "
        f"train split), {args.size}px, tested on {n_test} held-out digits. Every arm: {steps} steps x batch "
        f"{args.batch_size}, AdamW lr {args.lr} wd {args.weight_decay}, warm-up + cosine, loss `kd_loss` "
        f"(= cross-entropy for one-hot targets); {args.seeds} seeds (mean ± sample std).",
        f"Augmentation family: RandomResizedCrop({args.size}, scale={tuple(args.scale)}) + RandAugment(2 ops, m9), "
        f"no flip; +mix adds MixUp (alpha 1, lam/2, p 0.5) or CutMix (alpha 1, p 0.5); views rendered by the "
        f"`pil` replay backend (Apple's trainers' computation), live and replayed. Reinforced shards: "
        f"N={num_samples} stored augmentations per image, top-{args.top_k} of {NUM_CLASSES} classes (the reader "
        f"spreads the rest of the mass uniformly). Teachers: {', '.join(names)} ({teacher_steps} steps each on "
        f"the full train split).",
        "",
        "| arm | test acc % | Δ vs (a), paired by seed | train wall s | train CPU s |",
        "|---|---|---|---|---|",
    ]
    for arm in arms:
        delta = "" if arm == "a" or "a" not in results else fmt(
            [x - y for x, y in zip(col(arm, "acc"), col("a", "acc"))], signed=True)
        lines.append(f"| {ARM_NAMES[arm]} | {fmt(col(arm, 'acc'))} | {delta} | "
                     f"{statistics.mean(col(arm, 'wall')):.1f} | {statistics.mean(col(arm, 'cpu')):.1f} |")
    lines += ["", "| teacher (trained on the full train split) | test acc % |", "|---|---|"]
    lines += [f"| {name} | {acc:.2f} |" for name, acc in teacher_acc.items()]
    lines.append("")
    for mix in ("", "+mix"):
        if f"b{mix}" in results and f"d{mix}" in results:
            b, d = statistics.mean(col(f"b{mix}", "wall")), statistics.mean(col(f"d{mix}", "wall"))
            bc, dc = statistics.mean(col(f"b{mix}", "cpu")), statistics.mean(col(f"d{mix}", "cpu"))
            lines.append(f"- training cost{mix}, from the runs above: (b) {b:.1f}s vs (d) {d:.1f}s wall per student "
                         f"= {b / d:.2f}x (CPU {bc:.1f}s vs {dc:.1f}s = {bc / dc:.2f}x)")
    if timing:
        ms = {a: timing[a][0] for a in timing}
        lines.append(f"- training cost per step (batch {args.batch_size}, {args.threads} thread(s)), measured "
                     f"interleaved a/b/d in one process, median of 4 rounds x 15 steps: "
                     + ", ".join(f"({a}) {ms[a]:.0f} ms" for a in ms)
                     + f" -> (b)/(d) = {ms['b'] / ms['d']:.2f}x"
                     + (f"; teacher forward (d)-(a) {ms['d'] - ms['a']:.0f} ms, reader overhead over live "
                        f"augmentation (b)-(a) {ms['b'] - ms['a']:.0f} ms" if "a" in ms else ""))
    for name, (same, rows, worst) in replay.items():
        lines.append(f"- replay check ({name}): the first 8 images' stored augmentations re-rendered as ml-dr's "
                     f"trainer does (PIL) and re-scored by the teachers: top-{args.top_k} ids identical in {same}/{rows} views, "
                     f"max |stored - recomputed| probability {worst:.1e} (float16 storage)")
    lines.append(f"- one-off costs: teachers {teacher_seconds:.0f}s; reinforcement "
                 + ", ".join(f"{k} {v:.0f}s" for k, v in reinforce_seconds.items())
                 + f" (with Ray start/stop: {ray_seconds:.0f}s); students {student_seconds:.0f}s "
                 f"({len(specs)} runs, {args.jobs} side by side x {args.threads} thread(s)); "
                 f"whole benchmark {total:.0f}s")
    lines.append(f"- machine load (1-min load average, {os.cpu_count()} cores) at start {load_start:.1f}, at end "
                 f"{os.getloadavg()[0]:.1f}: above ~{args.jobs * args.threads} other work shared the cores and "
                 f"inflated the seconds above (accuracies do not depend on it)")
    text = "\n".join(lines)
    print("\n" + text)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(f"# Dataset Reinforcement in miniature (bench/dr_effect.py)\n\nCommand (repository root, "
                f"2 CPU cores shared with other work, no GPU):\n\n    {command}\n\n{text}\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
