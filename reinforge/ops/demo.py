"""`reinforge demo`: real photos (scikit-image) -> WebDataset input shards -> ImageNet+ run on a
local Ray with the real efficientnet_lite0 ImageNet teacher -> what was written, and what the
teacher sees in the un-augmented photos."""
from __future__ import annotations

import io
import random

from PIL import Image

from reinforge.formats.wds import ShardWriter
from reinforge.io.manifest import RunLayout
from reinforge.io.storage import atomic_open

# (scikit-image photo, ImageNet class index of what it shows)
PHOTOS = [("chelsea", 281), ("coffee", 967), ("rocket", 657)]


def _variants(image: Image.Image) -> list[Image.Image]:
    w, h = image.size
    return [image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
            image.crop((w // 8, h // 8, w - w // 8, h - h // 8)), image.resize((w * 3 // 4, h * 3 // 4))]


def write_demo_inputs(folder: str, shards: int = 2) -> int:
    """Real photos and simple variants of them, split over `shards` input shards (jpg + cls)."""
    import skimage.data
    samples = []
    for name, label in PHOTOS:
        for v, image in enumerate(_variants(Image.fromarray(getattr(skimage.data, name)()).convert("RGB"))):
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=92)
            samples.append((f"{name}_{v}", {"jpg": buf.getvalue(), "cls": str(label).encode()}))
    per_shard = -(-len(samples) // shards)
    for s in range(shards):
        with atomic_open(f"{folder}/demo-{s:06d}.tar") as out, ShardWriter(out) as writer:
            for key, members in samples[s * per_shard:(s + 1) * per_shard]:
                writer.write(key, members)
    return len(samples)


def run_demo(recipe, input_folder: str, address, echo=print) -> None:
    import torch
    from timm.data import ImageNetInfo

    from reinforge.formats.augment import Augmenter
    from reinforge.formats.image import decode_rgb
    from reinforge.models.timm import load_timm
    from reinforge.readers.imagenet_plus import ReinforcedImageNet
    from reinforge.runtime.runner import run_recipe

    n = write_demo_inputs(input_folder)
    echo(f"input: {n} real photos (scikit-image) in {input_folder}")
    summary = run_recipe(recipe, address=address, force=True, redo_changed=True)  # its inputs are rewritten above
    layout = RunLayout(recipe.output)
    echo(f"shards: {layout.shards_dir}/  ({summary.done} tasks run, {summary.skipped} already done)")
    echo(f"throughput: {summary.samples} images x {recipe.augmentation.num_samples} augmentations at "
         f"{summary.samples_per_second:.2f} images/s "
         f"({summary.samples_per_second * recipe.augmentation.num_samples:.1f} teacher views/s)")
    echo(f"skipped samples: {summary.errors}; trainer config: {layout.dr_config}")

    names = ImageNetInfo()
    teacher, _ = load_timm(recipe.teachers[0])
    plain = Augmenter({"normalize": recipe.augmentation.image_augmentation["normalize"],
                       "resize": {"size": 256}, "center_crop": {"size": 224}})
    dataset = ReinforcedImageNet(recipe.output)
    echo("teacher top-1 on the un-augmented photos, and over the stored augmentations:")
    for i in range(len(dataset)):
        sample = dataset.sample(i)
        if not sample.key.endswith("_0"):
            continue
        with torch.inference_mode():
            image = decode_rgb(sample.image)
            entry = plain.sample(random.Random(0), tuple(image.shape[-2:]))  # no random slots: resize's size
            top1 = int(teacher(plain.apply(entry, image)[None]).argmax())
        votes = torch.bincount(torch.as_tensor(sample.ids[:, 0]), minlength=1000)
        echo(f"  {sample.key:<10} label {names.index_to_description(sample.label):<22.22} "
             f"teacher: {names.index_to_description(top1):<22.22} "
             f"augmented views agree: {int(votes[top1])}/{sample.num_augmentations}")
    if not summary.ok:
        raise SystemExit(1)
