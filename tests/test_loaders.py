"""Every product's output loads with the standard loaders users already have (Hugging Face datasets,
Ray Data, timm, open_clip), and each of them returns what reinforge's own reader reads.

One small real run per kind of output: ImageNet+ (2 shards x 4 images, MixUp/CutMix), DataCompDR
with npz and with bf16 pth.gz (2 x 4, tiny real open_clip models), and a DataComp reshard folder.
"""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import uuid
from argparse import Namespace
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import jpeg_bytes, make_input_shards, photo, tiny_open_clip, tiny_recipe, write_shard
from PIL import Image

from reinforge.runtime.runner import run_recipe
from reinforge.io.runs import committed_shards
from reinforge.products.registry import parse_recipe
from reinforge.formats.members import decode_member, decode_members
from reinforge.formats.subset import make_subset, write_subset
from reinforge.formats.wds import iter_samples

pytestmark = pytest.mark.ray
RUNS = ("imagenet_plus", "dr_npz", "dr_pth", "reshard")
CAPTIONS = ["a cat sitting on a sofa", "a cup of coffee", "an astronaut in a suit", "a rocket on a launch pad"]


def _uid(i: int) -> str:
    return uuid.UUID(int=1000 + i).hex


def _datacomp_shards(folder) -> str:
    folder.mkdir(parents=True)
    for s in range(2):
        write_shard(folder / f"{s:08d}.tar", [
            (f"{i:09d}", {"jpg": jpeg_bytes(photo(i, 48)), "txt": CAPTIONS[i % 4].encode(),
                          "json": json.dumps({"uid": _uid(i)}).encode()}) for i in range(4 * s, 4 * s + 4)])
    return str(folder / "*.tar")


def _dr_recipe(inputs: str, output, **changes) -> dict:
    return {"product": "mobileclip_dr", "output": str(output), "seed": 3,
            "input": {"format": "webdataset", "path": inputs},
            "augmentation": {"num_samples": 3, "samples_per_batch": 4, "image_augmentation": {
                "random_resized_crop": {"size": 32, "interpolation": "bicubic"}, "rand_augment": {"p": 1.0}}},
            "captioners": [{"model": tiny_open_clip("coca"), "num_captions": 2, "max_length": 8, "batch_size": 4}],
            "teachers": [{"model": tiny_open_clip("clip", 32, seed=1), "batch_size": 8}],
            "max_error_fraction": 0.5, "resources": {"cpus_per_actor": 1, "object_store_memory_mb": 256}, **changes}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_local) -> dict[str, str]:
    root = tmp_path_factory.mktemp("loaders")
    dc = _datacomp_shards(root / "datacomp")
    subset = make_subset(*np.array([divmod(uuid.UUID(_uid(i)).int, 2**64) for i in (0, 1, 2, 4, 5, 7)], np.uint64).T)
    write_subset(str(root / "subset.npy"), np.sort(subset, order=["f0", "f1"]))
    recipes = {
        "imagenet_plus": tiny_recipe(make_input_shards(root / "in", shards=2, per_shard=4), root / "imagenet_plus"),
        "dr_npz": _dr_recipe(dc, root / "dr_npz"),
        "dr_pth": _dr_recipe(dc, root / "dr_pth", storage={"format": "pth.gz", "dtype": "bfloat16"}),
        "reshard": {"product": "reshard", "output": str(root / "reshard"), "subset": str(root / "subset.npy"),
                    "input": {"path": dc}, "samples_per_shard": 4, "seed": 3,
                    "resources": {"cpus_per_actor": 1, "object_store_memory_mb": 256}},
    }
    for name, recipe in recipes.items():
        summary = run_recipe(parse_recipe(recipe), progress=False)
        assert summary.ok, (name, summary.failed)
    return {name: str(root / name) for name in recipes}


def own_samples(run: str) -> list[dict]:
    """What reinforge's own reader returns: raw members of the committed shards, in order."""
    samples = []
    for shard in committed_shards(run):
        with open(shard.url, "rb") as f:
            samples += [{**s, "__url__": shard.url} for s in iter_samples(f)]
    return samples


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def same_json(got, want, ulps: int = 0) -> bool:
    """Equal JSON values, types included; floats may differ by `ulps` units in the last place."""
    if isinstance(want, float) and isinstance(got, float):
        return got == want or abs(got - want) <= ulps * math.ulp(want)
    if isinstance(want, (list, tuple)):
        return isinstance(got, (list, tuple)) and len(got) == len(want) and all(
            same_json(g, w, ulps) for g, w in zip(got, want))
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(same_json(got[k], want[k], ulps) for k in want)
    return type(got) is type(want) and got == want


def check_hf_row(row: dict, raw: dict, json_ulps: int) -> None:
    """A Hugging Face row against the raw members: images by pixels, arrays bit for bit, the rest decoded."""
    assert row["__key__"] == raw["__key__"]
    assert set(row) - {"__url__"} == set(raw) - {"__url__"}, (sorted(row), sorted(raw))
    for ext, data in raw.items():
        if ext.startswith("__"):
            continue
        want = decode_member(ext, data)
        if ext == "jpg":
            assert np.array_equal(np.asarray(row[ext]), pixels(data))
        elif ext in ("npz", "prob.npz"):
            for name, array in want.items():
                got = np.asarray(row[ext][name], dtype=array.dtype)
                assert got.shape == array.shape and got.tobytes() == array.tobytes(), (ext, name)
        elif ext == "pth.gz":
            for name, tensor in want.items():  # bfloat16 arrives as float32 holding the same values
                got = torch.as_tensor(np.asarray(row[ext][name], dtype=np.float32))
                assert torch.equal(got.to(torch.bfloat16).view(torch.int16), tensor.view(torch.int16)), name
                assert torch.equal(got, tensor.float()), name
        else:
            assert same_json(row[ext], want, json_ulps), (ext, row[ext], want)


def test_loader_files_sit_beside_the_shards(runs):
    for name, run in runs.items():
        shards = committed_shards(run)
        folder = os.path.join(run, "shards")
        sizes = json.load(open(os.path.join(folder, "sizes.json")))
        assert sizes == {os.path.basename(s.url): s.samples for s in shards}
        info = json.load(open(os.path.join(folder, "_info.json")))["splits"]["train"]
        assert info["filenames"] == list(sizes) and info["shard_lengths"] == list(sizes.values())
        assert info["num_samples"] == sum(sizes.values()) == len(own_samples(run))
        for card in (os.path.join(folder, "README.md"), os.path.join(run, "README.md")):
            assert open(card).read().startswith("---\nconfigs:\n- config_name: default\n")
    # the DataComp layout of a reshard folder is untouched: its own files, names and sizes.json content
    folder = os.path.join(runs["reshard"], "shards")
    assert {"00000000_stats.json", "00000001_stats.json", "meta.json"} <= set(os.listdir(folder))
    planned = json.load(open(os.path.join(runs["reshard"], "plan", "plan.json")))["sizes"]
    assert list(json.load(open(os.path.join(folder, "sizes.json"))).values()) == planned
    # what Apple's consumers read keeps its name and bytes
    assert all("paug.json" in s and "paug.json.gz" not in s for s in own_samples(runs["dr_npz"]))


@pytest.mark.parametrize("name", RUNS)
def test_hugging_face_load_dataset_decodes_every_member(runs, name, tmp_path):
    datasets = pytest.importorskip("datasets", reason="Hugging Face datasets is in the test extra")
    want = own_samples(runs[name])
    # the run folder (non-streaming) and the shards folder (streaming): the cards pick the webdataset builder
    for path, streaming in ((runs[name], False), (os.path.join(runs[name], "shards"), True)):
        rows = list(datasets.load_dataset(path, split="train", streaming=streaming, cache_dir=str(tmp_path)))
        assert len(rows) == len(want)
        for row, raw in zip(rows, want):
            check_hf_row(row, raw, json_ulps=1)  # HF's Json parser may land one ulp off


def test_hugging_face_webdataset_builder_with_the_runs_features(runs, tmp_path):
    datasets = pytest.importorskip("datasets", reason="Hugging Face datasets is in the test extra")
    from reinforge.readers.hf import features
    run = runs["imagenet_plus"]
    ds = datasets.load_dataset("webdataset", data_files=os.path.join(run, "shards", "*.tar"), split="train",
                               features=features(run), cache_dir=str(tmp_path))
    for row, raw in zip(ds, own_samples(run), strict=True):
        check_hf_row(row, raw, json_ulps=1)


@pytest.mark.parametrize("name", RUNS)
def test_hugging_face_load_run_is_exact(runs, name, tmp_path):
    pytest.importorskip("datasets", reason="Hugging Face datasets is in the test extra")
    from reinforge.readers.hf import load_run
    want = own_samples(runs[name])
    for streaming in (False, True):
        rows = list(load_run(runs[name], streaming=streaming, cache_dir=str(tmp_path)))
        assert len(rows) == len(want)
        for row, raw in zip(rows, want):
            check_hf_row(row, raw, json_ulps=0)


def _same_value(got, want) -> bool:
    if isinstance(want, dict):
        return got.keys() == want.keys() and all(_same_value(got[k], want[k]) for k in want)
    if isinstance(want, torch.Tensor):
        return got.dtype == want.dtype and torch.equal(got.view(torch.int16) if got.dtype == torch.bfloat16 else got,
                                                       want.view(torch.int16) if want.dtype == torch.bfloat16 else want)
    if isinstance(want, np.ndarray):
        return got.dtype == want.dtype and got.tobytes() == want.tobytes()
    return same_json(got, want)


@pytest.mark.parametrize("name", RUNS)
def test_ray_data_read_run_decodes_committed_shards(runs, name):
    import ray.data

    from reinforge.readers.ray_data import read_run
    want = [decode_members(s) for s in own_samples(runs[name])]
    rows = sorted(read_run(runs[name]).take_all(), key=lambda r: (r["__url__"], r["__key__"]))
    want.sort(key=lambda r: (r["__url__"], r["__key__"]))
    assert len(rows) == len(want)
    for row, raw in zip(rows, want):
        for ext, value in raw.items():
            assert _same_value(row[ext], value), (ext, row[ext], value)
    if name == "reshard":  # plain Ray on a DataComp folder: the one line it needs
        plain = ray.data.read_webdataset(os.path.join(runs[name], "shards"), file_extensions=["tar"])
        assert plain.count() == len(want)


def test_ray_replay_is_the_readers_view(runs):
    from reinforge.readers.imagenet_plus import ReinforcedImageNet
    from reinforge.readers.mobileclip import MobileCLIPDRDataset
    from reinforge.readers.ray_data import Replay, read_run
    run = runs["imagenet_plus"]  # MixUp/CutMix entries: partners come from the row's own shard
    rows = read_run(run, decode=False).flat_map(Replay(run, mode="epoch", epoch=3)).take_all()
    reader = ReinforcedImageNet(run, mode="epoch")
    reader.set_epoch(3)
    assert len(rows) == len(reader) == 8
    for row in rows:
        view, target = reader[reader.index_of(row["__key__"])]
        assert torch.equal(torch.from_numpy(np.array(row["image"])), view)
        assert torch.equal(torch.from_numpy(np.array(row["target"])), target)
    run = runs["dr_pth"]
    rows = {r["uid"]: r for r in read_run(run, decode=False).flat_map(Replay(run, mode="epoch", epoch=1)).take_all()}
    reader = MobileCLIPDRDataset(run, lambda text: [text], mode="epoch")
    reader.set_epoch(1)
    items = list(reader)
    assert len(rows) == len(items) == 8
    for item in items:
        row = rows[item["uid"]]
        assert row["text"] == item["text"] and row["aug_index"] == item["aug_index"]
        for field in ("image", "image_emb", "text_emb", "syn_emb"):
            assert torch.equal(torch.from_numpy(np.array(row[field])), item[field]), field


def test_timm_create_dataset_reads_imagenet_plus_with_labels(runs):
    from timm.data import create_dataset
    run = runs["imagenet_plus"]
    want = own_samples(run)
    ds = create_dataset("wds/reinforge", root=os.path.join(run, "shards"), split="train")
    got = list(ds)
    assert len(got) == len(want)
    for (image, label), raw in zip(got, want):
        assert label == int(raw["cls"]) and np.array_equal(np.asarray(image), pixels(raw["jpg"]))
    assert sorted(int(s["cls"]) for s in want) != [0] * len(want)  # real labels, not all 0
    training = create_dataset("wds/reinforge", root=os.path.join(run, "shards"), split="train", is_training=True,
                              batch_size=2)
    assert Counter(label for _, label in training) == Counter(int(s["cls"]) for s in want)


@pytest.mark.parametrize("name", ["dr_npz", "reshard"])
def test_open_clip_get_wds_dataset_trains_without_a_sample_count(runs, name):
    import open_clip
    from open_clip_train.data import get_wds_dataset
    from torchvision import transforms
    run = runs[name]
    names = sorted(json.load(open(os.path.join(run, "shards", "sizes.json"))))
    args = Namespace(train_data=os.path.join(run, "shards", "{" + ",".join(n[:-4] for n in names) + "}.tar"),
                     val_data=None, train_num_samples=None, dataset_resampled=False,
                     train_data_upsampling_factors=None, seed=0, batch_size=2, workers=0, world_size=1)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    preprocess = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])
    data = get_wds_dataset(args, preprocess, is_train=True, tokenizer=tokenizer)
    want = own_samples(run)
    assert data.dataloader.num_samples == len(want)
    texts = [tuple(t.tolist()) for _, batch in data.dataloader for t in batch]
    assert Counter(texts) == Counter(tuple(tokenizer(s["txt"].decode())[0].tolist()) for s in want)



def test_bundled_recipes_resolve_from_any_directory(tmp_path, monkeypatch):
    """A real command from outside the repository finds configs/demo.yaml in the package (and reads it: the
    bad override is the only complaint). `reinforge demo` itself runs from a temporary folder in test_cli."""
    result = subprocess.run([sys.executable, "-m", "reinforge.cli.main", "run", "configs/demo.yaml", "--set", "bogus=1"],
                            capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))})
    assert result.returncode == 2 and result.stderr.startswith("config error: bogus: Extra inputs"), result.stderr
    from reinforge.cli.common import resolve_config
    monkeypatch.chdir(tmp_path)
    assert open(resolve_config("configs/demo.yaml")).read() == open(os.path.join(
        os.path.dirname(__file__), "..", "configs", "demo.yaml")).read()


def test_card_features_for_every_array_shape():
    datasets = pytest.importorskip("datasets", reason="Hugging Face datasets is in the test extra")
    import gzip

    from reinforge.formats.hf_card import hf_features
    npz = io.BytesIO()
    np.savez(npz, s=np.array(1.5), x=np.zeros(2, np.float16), y=np.zeros((2, 3, 4), np.int32))
    buf = io.BytesIO()
    torch.save({"a": torch.zeros(3, dtype=torch.bfloat16), "b": torch.zeros(2, 3, 4, dtype=torch.bfloat16)}, buf)
    sample = {"__key__": "k", "png": b"\x89PNG", "npz": npz.getvalue(),
              "pth.gz": gzip.compress(buf.getvalue()), "cls": b"3", "bin": b"x"}
    f = datasets.Features._from_yaml_list(hf_features(sample))
    assert f["png"] == datasets.Image() and f["cls"] == datasets.Value("int64") and f["bin"] == datasets.Value("binary")
    assert f["npz"] == {"s": datasets.Value("float64"), "x": datasets.List(datasets.Value("float16")),
                        "y": datasets.Array3D((None, 3, 4), "int32")}
    assert f["pth.gz"] == {"a": datasets.List(datasets.Value("float32")), "b": datasets.Array3D((None, 3, 4), "float32")}
    assert list(f)[-2:] == ["__key__", "__url__"]


def test_an_unreadable_manifest_means_not_done_for_every_reader(runs, tmp_path):
    """One task's manifest truncated (a crash on a store without rename): status, validate, the run's
    own readers, Hugging Face and Ray Data all leave that task's shard out; none crashes."""
    import shutil

    from reinforge.ops.rundir import run_status, validate_run
    from reinforge.readers.hf import load_run
    from reinforge.readers.imagenet_plus import ReinforcedImageNet
    from reinforge.readers.mobileclip import MobileCLIPDRDataset
    from reinforge.readers.ray_data import read_run
    for name in ("imagenet_plus", "dr_npz"):
        run = str(tmp_path / name)
        shutil.copytree(runs[name], run)
        first, *rest = committed_shards(run)
        manifest = os.path.join(run, "manifests", os.path.basename(first.url).replace(".tar", ".json"))
        with open(manifest, "r+b") as f:
            f.truncate(os.path.getsize(manifest) // 2)
        kept = sum(s.samples for s in rest)
        assert [s.url for s in committed_shards(run)] == [s.url for s in rest] and kept > 0
        status = run_status(run)
        assert len(status.pending) == 1 and len(status.done) == len(rest)
        assert any("unreadable manifest" in p for p in validate_run(run)[1])
        assert len(load_run(run, cache_dir=str(tmp_path / f"hf-{name}"))) == kept
        assert read_run(run).count() == kept
        reader = (ReinforcedImageNet(run) if name == "imagenet_plus" else MobileCLIPDRDataset(run, lambda t: [t]))
        keys = list(reader.keys) if name == "imagenet_plus" else [item["uid"] for item in reader]
        assert len(keys) == kept


def test_validate_in_parallel_reports_what_one_process_does(runs, tmp_path):
    """validate's worker processes (and Ray tasks) check tasks in parallel; the problems come back in manifest
    order, the same list as a single process gives (here: one shard's bytes changed, another's manifest digest)."""
    import json
    import shutil

    from reinforge.ops.rundir import validate_run
    run = str(tmp_path / "run")
    shutil.copytree(runs["imagenet_plus"], run)
    shards = committed_shards(run)
    assert len(shards) >= 2
    with open(shards[-1].url, "r+b") as f:
        f.seek(700)
        f.write(b"\xff" * 16)
    manifest = os.path.join(run, "manifests", os.path.basename(shards[0].url).replace(".tar", ".json"))
    with open(manifest) as f:
        record = json.load(f)
    record["config_digest"] = "0" * len(record["config_digest"])
    with open(manifest, "w") as f:
        json.dump(record, f)
    serial = validate_run(run, workers=1)
    assert len(serial[1]) >= 2
    assert validate_run(run, workers=2) == serial
    from reinforge.runtime.ray_session import ray_session
    with ray_session():  # the Ray of the process: the groups run as Ray tasks
        assert validate_run(run, workers=2) == serial
