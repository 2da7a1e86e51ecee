"""ImageFolder input is torchvision's ImageFolder, index for index and pixel for pixel (FORMATS §1, §3):
the consumers' trainers (ml-dr, ml-mobileclip) list and decode with torchvision, so a stored record
belongs to the image at that index only if we list and decode exactly as they do."""
from __future__ import annotations

import json
import os
import shutil
import tarfile
import uuid

import fsspec
import numpy as np
import pytest
import torch
from conftest import encoded, messy_image_folder, photo, rgba_with_holes, tiny_recipe
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader
from torchvision.transforms.functional import pil_to_tensor

from reinforge.formats.sources import IMAGEFOLDER_SUFFIXES, ImageFolderSource, InputError, member_extension
from reinforge.formats.image import IMAGE_EXTENSIONS, ImageDecodeError, decode_rgb, find_image
from reinforge.stages.base import Batch
from reinforge.stages.decode import DecodeImage


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return messy_image_folder(tmp_path_factory.mktemp("imagefolder"))


def torchvision_pixels(path: str) -> torch.Tensor:
    return pil_to_tensor(default_loader(path))


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_suffixes_are_torchvisions_and_every_one_decodes():
    assert IMAGEFOLDER_SUFFIXES == IMG_EXTENSIONS
    for suffix in IMG_EXTENSIONS:
        ext = member_extension("x" + suffix.upper())
        assert ext in IMAGE_EXTENSIONS and find_image({ext: b"data"}) == (ext, b"data")


def test_listing_is_torchvisions_index_for_index(tree):
    reference = ImageFolder(tree["root"])
    classes, files = ImageFolderSource(tree["root"], 5).listing()
    assert classes == reference.classes == [".hidden_class", "cat", "cup", "rocket"]
    assert files == reference.samples
    relative = [os.path.relpath(path, tree["root"]) for path, _ in files]
    # the cases this tree is built to exercise, in torchvision's order
    assert relative[:2] == [".hidden_class/.hidden.jpg", ".hidden_class/a.jpg"]
    assert relative[2:12] == ["cat/.hidden.jpg", "cat/A.JPG", "cat/a.jpg", "cat/b.bmp", "cat/c_rgba.png",
                              "cat/zz.jpg", "cat/sub/d.tif", "cat/sub/e.jpeg", "cat/sub.b/g.ppm",
                              "cat/sub/deeper/f.png"]
    assert "cat/notes.txt" not in relative and "cup/upper.TIFF" in relative
    assert relative[-4:] == ["rocket/dangling.jpg", "rocket/one_bit.bmp", "rocket/r.png", "rocket/linked/s.jpg"]


def test_fsspec_root_lists_in_the_same_order(tree):
    """A remote root (here fsspec's in-memory filesystem) walks to the same order as os.walk."""
    fs = fsspec.filesystem("memory")
    base = f"/tree-{uuid.uuid4().hex[:8]}"
    reference = ImageFolder(tree["root"])
    readable = [(path, c) for path, c in reference.samples if os.path.exists(path)]
    for dirpath, _, names in os.walk(tree["root"], followlinks=True):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.path.exists(path):
                fs.pipe_file(base + "/" + os.path.relpath(path, tree["root"]), read_bytes(path))
    try:
        classes, files = ImageFolderSource(f"memory://{base}", 5).listing()
    finally:
        fs.rm(base, recursive=True)
    assert classes == reference.classes
    assert [(url.removeprefix(f"memory://{base}/"), c) for url, c in files] == \
        [(os.path.relpath(path, tree["root"]), c) for path, c in readable]


def test_a_class_without_images_is_refused_as_torchvision_does(tmp_path):
    for name, data in [("cat/a.jpg", encoded(photo(0, 16), "JPEG")), (".ipynb_checkpoints/notes.txt", b"x")]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    with pytest.raises(FileNotFoundError, match=r"\.ipynb_checkpoints"):
        ImageFolder(str(tmp_path))
    with pytest.raises(InputError, match=r"class folder\(s\) \.ipynb_checkpoints"):
        ImageFolderSource(str(tmp_path), 5).listing()


def test_decoded_pixels_are_default_loaders(tree):
    modes = set()
    for path, _ in ImageFolder(tree["root"]).samples:
        if path in (tree["corrupt"], tree["unreadable"]):
            continue
        modes.add(Image.open(path).mode)
        assert torch.equal(decode_rgb(read_bytes(path)), torchvision_pixels(path)), path
    assert {"RGB", "RGBA", "LA", "P", "I;16", "CMYK", "L", "1"} <= modes
    with pytest.raises(OSError):
        default_loader(tree["corrupt"])
    with pytest.raises(ImageDecodeError) as info:
        decode_rgb(read_bytes(tree["corrupt"]))
    assert info.value.reason == "corrupt_image"


def more_modes() -> dict[str, bytes]:
    """Modes the tree lacks, as files PIL writes (32-bit and float TIFF, big-endian 16-bit, LAB, YCbCr)."""
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, 24 * 20 * 3, dtype=np.uint8).tobytes()
    wide = rng.integers(-70000, 70000, (20, 24), dtype=np.int32)
    big_endian = rng.integers(0, 2**16, 480, dtype=np.uint16).astype(">u2").tobytes()
    return {
        "i32.tif": encoded(Image.fromarray(wide), "TIFF"),
        "float.tif": encoded(Image.fromarray(wide.astype(np.float32) / 100), "TIFF"),
        "i16b.tif": encoded(Image.frombytes("I;16B", (24, 20), big_endian), "TIFF"),
        "lab.tif": encoded(Image.frombytes("LAB", (24, 20), raw), "TIFF"),
        "ycbcr.tif": encoded(Image.frombytes("YCbCr", (24, 20), raw), "TIFF"),
        "rgb_trns.png": encoded(photo(3, 24), "PNG", transparency=(10, 20, 30)),
        "palette_alphas.png": encoded(photo(4, 24).convert("P", palette=Image.Palette.ADAPTIVE, colors=8), "PNG",
                                      transparency=bytes(range(0, 256, 32))),
        "rgba.tif": encoded(rgba_with_holes(5, 24), "TIFF"),
    }


def test_every_mode_decodes_as_default_loader(tmp_path):
    for name, data in more_modes().items():
        (tmp_path / name).write_bytes(data)
        assert torch.equal(decode_rgb(data), torchvision_pixels(str(tmp_path / name))), name


def test_transparency_is_dropped_not_composited(tmp_path):
    """default_loader drops alpha: the colour under a fully transparent pixel is what the trainer sees."""
    data = encoded(Image.new("RGBA", (4, 4), (10, 20, 30, 0)), "PNG")
    assert decode_rgb(data).flatten(1).T.unique(dim=0).tolist() == [[10, 20, 30]]


def test_webdataset_pilrgba_then_rgb_is_default_loader(tree, tmp_path):
    """Apple's MobileCLIP trainer decodes `wds.decode("pilrgba")` then `.convert("RGB")`: the same pixels as
    default_loader, for every mode here."""
    from webdataset.autodecode import imagehandler
    pilrgba = imagehandler("pilrgba")
    files = [path for path, _ in ImageFolder(tree["root"]).samples if path not in (tree["corrupt"], tree["unreadable"])]
    for name, data in more_modes().items():
        (tmp_path / name).write_bytes(data)
        files.append(str(tmp_path / name))
    for path in files:
        decoded = pilrgba("sample." + member_extension(path), read_bytes(path))
        assert torch.equal(pil_to_tensor(decoded.convert("RGB")), torchvision_pixels(path)), path


def test_unreadable_and_corrupt_files_keep_their_index(tree):
    """Reading and decoding without Ray: every other file keeps torchvision's index; the two bad ones
    are counted skips under their own index, with a reason."""
    reference = ImageFolder(tree["root"]).samples
    bad = {reference.index((tree["corrupt"], 2)): "corrupt_image",
           reference.index((tree["unreadable"], 3)): "unreadable_file"}
    source = ImageFolderSource(tree["root"], 5)
    decode = DecodeImage()
    kept, errors = [], []
    for task in source.tasks():
        batch = decode(Batch(list(source.read(task))))
        kept += batch.samples
        errors += batch.errors
    assert {int(e.key): e.reason for e in errors} == bad
    assert [int(s["__key__"]) for s in kept] == [i for i in range(len(reference)) if i not in bad]
    for s in kept:
        path, target = reference[int(s["__key__"])]
        assert int(s["cls"]) == target and s["__source__"] == os.path.relpath(path, tree["root"])
        assert s["image_ext"] == member_extension(path) and torch.equal(s["image"], torchvision_pixels(path))


@pytest.mark.ray
def test_imagenet_plus_run_on_the_tree_keys_by_torchvision_index(tree, tmp_path, local_ray):
    """The product end to end: keys = torchvision indices, cls = its targets, the image bytes as read (any
    suffix), the corrupt and unreadable files counted errors under their index; ML-DR records by index."""
    from reinforge.ops.export_mldr import export_ml_dr
    from reinforge.runtime.runner import run_recipe
    from reinforge.readers.imagenet_plus import ReinforcedImageNet
    from reinforge.products.registry import parse_recipe

    reference = ImageFolder(tree["root"]).samples
    bad = {reference.index((tree["corrupt"], 2)), reference.index((tree["unreadable"], 3))}
    out = tmp_path / "run"
    recipe = tiny_recipe(tree["root"], out, input={"format": "imagefolder", "path": tree["root"],
                                                   "samples_per_task": 6})
    summary = run_recipe(parse_recipe(recipe), progress=False)
    assert summary.ok and summary.tasks == 4 and summary.samples == len(reference) - 2 and summary.errors == 2

    dataset = ReinforcedImageNet(str(out))
    samples = [dataset.sample(i) for i in range(len(dataset))]
    assert [int(s.key) for s in samples] == [i for i in range(len(reference)) if i not in bad]
    for s in samples:
        path, target = reference[int(s.key)]
        assert s.label == target and s.image == read_bytes(path) and s.image_ext == member_extension(path)
        assert torch.equal(decode_rgb(s.image), torchvision_pixels(path))
    errors = [json.loads(line) for name in sorted(os.listdir(out / "errors"))
              for line in (out / "errors" / name).read_text().splitlines()]
    assert sorted((int(e["key"]), e["stage"], e["reason"]) for e in errors) == sorted(
        [(reference.index((tree["corrupt"], 2)), "decode", "corrupt_image"),
         (reference.index((tree["unreadable"], 3)), "decode", "unreadable_file")])
    with tarfile.open(out / "shards" / "part-000000.tar") as tar:
        assert "00000005.bmp" in tar.getnames()  # cat/b.bmp keeps its suffix as its member

    mldr = tmp_path / "mldr"
    export_ml_dr(str(out), str(mldr))
    records = sorted(int(name.split(".")[0]) for name in os.listdir(mldr) if name[0].isdigit())
    assert records == [int(s.key) for s in samples]
    last = int(samples[-1].key)  # rocket/linked/s.jpg, reached through a symlinked folder
    index, entries = torch.load(mldr / f"{last}.pth.tar", weights_only=True)
    assert index == last == len(reference) - 1 and len(entries) == 4
    shutil.rmtree(out)
