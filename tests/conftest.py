"""Shared fixtures: real photos as input shards, small real timm teachers, one embedded Ray."""
from __future__ import annotations

import io
import os
import struct
import zlib
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

PHOTO_NAMES = ("chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry", "hubble_deep_field")


def photo(index: int, size: int = 96) -> Image.Image:
    """A real photo from scikit-image, resized and shifted so that every index gives distinct pixels."""
    import skimage.data
    base = Image.fromarray(getattr(skimage.data, PHOTO_NAMES[index % len(PHOTO_NAMES)])()).convert("RGB")
    w, h = base.size
    shift = (index // len(PHOTO_NAMES)) * 7 % max(1, min(w, h) // 4)
    return base.crop((shift, shift, w - shift, h - shift)).resize((size + index % 5 * 4, size))


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A valid tiny PNG whose header claims width x height: a decompression bomb to the decoder."""
    data = bytearray(png_bytes(Image.new("RGB", (1, 1))))
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def encoded(image: Image.Image, format: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=format, **options)
    return buf.getvalue()


def rgba_with_holes(index: int, size: int) -> Image.Image:
    """A photo whose alpha runs from fully transparent (left) to opaque, with hidden colour under it."""
    image = photo(index, size).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, image.width).astype(np.uint8), (image.height, 1))
    image.putalpha(Image.fromarray(alpha))
    return image


def gray16(index: int, size: int) -> Image.Image:
    """A 16-bit grayscale photo (mode I;16) using the full 0..65535 range."""
    return Image.fromarray(np.asarray(photo(index, size).convert("L"), dtype=np.uint16) * 257)


def messy_image_folder(root, size: int = 40) -> dict:
    """An ImageFolder tree with what real ones hold: many formats and modes (RGBA with transparency,
    palette with transparency, 16-bit, CMYK, L, 1-bit), upper-case suffixes, nested and symlinked
    sub-folders (files before and after them by name, and "sub.b" which sorts between "sub" and
    "sub/deeper"), hidden files and a hidden class, a non-image, a corrupt JPEG and a dangling symlink.
    Returns {"root", "corrupt", "unreadable"} (paths as torchvision lists them)."""
    root = str(root)
    files = {
        ".hidden_class/a.jpg": jpeg_bytes(photo(0, size)),
        ".hidden_class/.hidden.jpg": jpeg_bytes(photo(1, size)),
        "cat/.hidden.jpg": jpeg_bytes(photo(2, size)),
        "cat/A.JPG": jpeg_bytes(photo(3, size)),
        "cat/a.jpg": jpeg_bytes(photo(4, size)),
        "cat/b.bmp": encoded(photo(5, size), "BMP"),
        "cat/c_rgba.png": png_bytes(rgba_with_holes(6, size)),
        "cat/notes.txt": b"not an image",
        "cat/sub/d.tif": encoded(photo(7, size), "TIFF"),
        "cat/sub/e.jpeg": jpeg_bytes(photo(8, size)),
        "cat/sub/deeper/f.png": png_bytes(photo(9, size).convert("L")),
        "cat/sub.b/g.ppm": encoded(photo(10, size), "PPM"),
        "cat/zz.jpg": jpeg_bytes(photo(11, size)),
        "cup/cmyk.jpg": jpeg_bytes(photo(12, size).convert("CMYK")),
        "cup/corrupt.jpg": jpeg_bytes(photo(13, size))[:200],
        "cup/gray16.png": png_bytes(gray16(14, size)),
        "cup/l.pgm": encoded(photo(15, size).convert("L"), "PPM"),
        "cup/one_bit.png": png_bytes(photo(16, size).convert("1")),
        "cup/palette.png": encoded(photo(17, size).convert("P", palette=Image.Palette.ADAPTIVE, colors=24), "PNG",
                                   transparency=3),
        "cup/rgba.webp": encoded(rgba_with_holes(18, size), "WEBP", lossless=True),
        "cup/upper.TIFF": encoded(rgba_with_holes(19, size).convert("LA"), "TIFF"),
        "rocket/one_bit.bmp": encoded(photo(20, size).convert("1"), "BMP"),
        "rocket/r.png": png_bytes(photo(21, size)),
        "elsewhere/s.jpg": jpeg_bytes(photo(22, size)),  # outside the root, reached through a link
    }
    for name, data in files.items():
        base = os.path.join(root, "tree") if not name.startswith("elsewhere/") else root
        path = os.path.join(base, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    tree = os.path.join(root, "tree")
    os.symlink(os.path.join(root, "elsewhere"), os.path.join(tree, "rocket", "linked"))  # followlinks=True
    os.symlink(os.path.join(root, "missing.jpg"), os.path.join(tree, "rocket", "dangling.jpg"))
    return {"root": tree, "corrupt": os.path.join(tree, "cup", "corrupt.jpg"),
            "unreadable": os.path.join(tree, "rocket", "dangling.jpg")}


def write_shard(path, samples: list[tuple[str, dict]]) -> None:
    from reinforge.formats.wds import ShardWriter
    with open(path, "wb") as f, ShardWriter(f) as writer:
        for key, members in samples:
            writer.write(key, members)


def make_input_shards(folder, shards: int, per_shard: int, num_classes: int = 10, size: int = 72) -> str:
    """Input WebDataset shards of real photos (jpg + cls); returns the brace pattern."""
    os.makedirs(folder, exist_ok=True)
    i = 0
    for s in range(shards):
        samples = []
        for _ in range(per_shard):
            samples.append((f"img{i:05d}", {"jpg": jpeg_bytes(photo(i, size)), "cls": str(i % num_classes).encode()}))
            i += 1
        write_shard(os.path.join(folder, f"train-{s:04d}.tar"), samples)
    return os.path.join(str(folder), f"train-{{0000..{shards - 1:04d}}}.tar")


_CHECKPOINTS: dict[str, str] = {}


def teacher_checkpoint(model: str, num_classes: int = 10) -> str:
    """A local checkpoint of a random-init timm model (seeded), written once per test session, so that
    every worker and the tests load identical teacher weights, as users load their own checkpoints."""
    import tempfile

    import timm
    import torch
    if model not in _CHECKPOINTS:
        torch.manual_seed(len(_CHECKPOINTS))
        path = os.path.join(tempfile.mkdtemp(prefix="reinforge-teachers-"), f"{model}.pth")
        torch.save(timm.create_model(model, num_classes=num_classes).state_dict(), path)
        _CHECKPOINTS[model] = path
    return _CHECKPOINTS[model]


def tiny_recipe(input_path: str, output: str, **overrides) -> dict:
    """A small but real ImageNet+ recipe: two timm CNNs from local checkpoints, 32 px views, full augmentation set."""
    recipe = {
        "product": "imagenet_plus",
        "output": str(output),
        "seed": 7,
        "input": {"format": "webdataset", "path": input_path},
        "augmentation": {"num_samples": 4, "image_augmentation": {
            "random_resized_crop": {"size": 32},
            "random_horizontal_flip": {"p": 0.5},
            "rand_augment": {"p": 1.0},
            "random_erase": {"p": 0.25},
            "normalize": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
            "mixup": {"alpha": 1.0, "p": 0.5},
            "cutmix": {"alpha": 1.0, "p": 0.5},
        }},
        "teachers": [{"model": "resnet10t", "num_classes": 10, "batch_size": 16,
                      "checkpoint": teacher_checkpoint("resnet10t")},
                     {"model": "mobilenetv3_small_050", "num_classes": 10, "batch_size": 8,
                      "checkpoint": teacher_checkpoint("mobilenetv3_small_050")}],
        "top_k": 3,
        "max_error_fraction": 0.5,
        "resources": {"cpus_per_actor": 1, "object_store_memory_mb": 256},
    }
    for dotted, value in overrides.items():
        node = recipe
        *path, last = dotted.split("__")
        for part in path:
            node = node[part]
        node[last] = value
    return recipe


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the session (2 CPUs); tests that need another Ray shut it down themselves."""
    import ray

    from reinforge.runtime.ray_session import start_local_ray
    if not ray.is_initialized():
        start_local_ray(num_cpus=2, object_store_memory_mb=256)
    yield
    ray.shutdown()


@pytest.fixture
def local_ray(ray_local):
    import ray

    from reinforge.runtime.ray_session import start_local_ray
    if not ray.is_initialized():
        start_local_ray(num_cpus=2, object_store_memory_mb=256)


@contextmanager
def two_node_cluster():
    """A real 2-node Ray cluster (ray.cluster_utils, 1 CPU each) in place of the session's embedded Ray;
    yields its address. Afterwards the next `local_ray` test starts the embedded one again."""
    import ray
    from ray.cluster_utils import Cluster

    from reinforge.runtime.ray_session import offline_ray_env
    ray.shutdown()
    with offline_ray_env():
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "include_dashboard": False, "object_store_memory": 150 * 2**20})
        cluster.add_node(num_cpus=1, object_store_memory=150 * 2**20)
        cluster.wait_for_nodes()
    try:
        yield cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()


def manifest_nodes(run_dir) -> set[str]:
    """The Ray node ids that ran a run's tasks, from its manifests."""
    import json
    folder = os.path.join(str(run_dir), "manifests")
    return {json.loads(open(os.path.join(folder, n)).read())["worker"]["node_id"] for n in os.listdir(folder)}


def tree_state(root) -> dict:
    """Every file and folder under root with its size and mtime: what a read-only command must not change."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.stat(os.path.join(folder, name))
            state[os.path.relpath(os.path.join(folder, name), root)] = (st.st_size, st.st_mtime_ns)
    return state


def shard_bytes(run_dir) -> dict[str, bytes]:
    folder = os.path.join(str(run_dir), "shards")
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


@pytest.fixture(autouse=True)
def _seeded():
    np.random.seed(0)


TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
TINY_COCA = {"embed_dim": 64,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32,
                            "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
             "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                          "embed_cls": True, "output_tokens": True},
             "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                                "attn_pooler_heads": 2},
             "custom_text": True}
_OPEN_CLIP_DIRS: dict[tuple, str] = {}


def write_open_clip_dir(folder: str, cfg: dict, seed: int) -> str:
    """A real open_clip model folder (config + seeded random weights), as a user's own model directory:
    every Ray worker loads identical weights. Returns its `local-dir:` name."""
    import json

    import open_clip
    import torch

    from reinforge.models.open_clip import init_coca_decoder
    os.makedirs(folder, exist_ok=True)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OpenAI CLIP's
    with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": cfg, "preprocess_cfg": {"mean": list(mean), "std": list(std),
                                                        "interpolation": "bicubic", "resize_mode": "shortest"}}, f)
    torch.manual_seed(seed)
    model_cls = open_clip.CoCa if "multimodal_cfg" in cfg else open_clip.CLIP
    model = model_cls(**{k: v for k, v in cfg.items() if k != "custom_text"})
    init_coca_decoder(model)
    torch.save(model.state_dict(), os.path.join(folder, "open_clip_pytorch_model.bin"))
    return "local-dir:" + folder


def tiny_open_clip(kind: str = "clip", image_size: int = 32, seed: int = 0) -> str:
    """A tiny random-init open_clip model folder (write_open_clip_dir), made once per process.
    kind: "clip" or "coca"."""
    import copy
    import tempfile
    key = (kind, image_size, seed)
    if key not in _OPEN_CLIP_DIRS:
        cfg = copy.deepcopy(TINY_COCA if kind == "coca" else TINY_CLIP)
        cfg["vision_cfg"]["image_size"] = image_size
        _OPEN_CLIP_DIRS[key] = write_open_clip_dir(tempfile.mkdtemp(prefix=f"reinforge-{kind}-"), cfg, seed)
    return _OPEN_CLIP_DIRS[key]


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (Ray starts its daemons in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            ppid = int(stat.rpartition(")")[2].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree
