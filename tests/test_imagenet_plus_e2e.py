"""End to end on a real embedded Ray: valid shards, trainable, resumable, deterministic, robust."""
from __future__ import annotations

import json
import os
import tarfile

import numpy as np
import pytest
import torch
from conftest import (jpeg_bytes, make_input_shards, photo, png_bytes, png_header_claiming, shard_bytes,
                      tiny_recipe, write_shard)
from PIL import Image

from reinforge.ops.rundir import run_status, validate_run
from reinforge.runtime.runner import ConfigChangedError, run_recipe
from reinforge.products.registry import parse_recipe

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_input_shards(tmp_path_factory.mktemp("inputs"), shards=3, per_shard=6)


@pytest.fixture(scope="module")
def reference_run(inputs, tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("ref") / "run"
    summary = run_recipe(parse_recipe(tiny_recipe(inputs, out, resources__num_actors=1)), progress=False)
    assert summary.ok and summary.done == 3 and summary.samples == 18 and summary.errors == 0
    return out


def test_run_writes_valid_shards(reference_run):
    checked, problems = validate_run(str(reference_run))
    assert problems == [] and checked == 18
    status = run_status(str(reference_run))
    assert len(status.done) == 3 and not status.pending and not status.failed
    with tarfile.open(reference_run / "shards" / "train-0000.tar") as tar:
        names = tar.getnames()
    assert names[:5] == ["img00000.jpg", "img00000.cls", "img00000.json", "img00000.paug.json.gz", "img00000.prob.npz"]
    manifest = json.loads((reference_run / "manifests" / "train-0000.json").read_text())
    assert manifest["samples_out"] == 6 and manifest["outputs"][0]["samples"] == 6
    assert set(manifest["stages"]) == {"decode", "label", "augment", "teachers", "encode"}
    assert manifest["versions"]["teachers"][0]["model"] == "resnet10t"
    config = json.loads((reference_run / "dr_config.json").read_text())
    assert config["reinforce"]["num_samples"] == 4 and "mixup" in config["reinforce"]["image_augmentation"]


def test_stored_probabilities_match_replayed_augmentations(reference_run):
    """The point of the format: replaying entry n and running the teachers gives the stored top-k,
    for every sample of a multi-batch shard, mixing partners included."""
    from reinforge.readers.imagenet_plus import ReinforcedImageNet
    from reinforge.formats.augment import Augmenter
    from reinforge.formats.image import decode_rgb
    from reinforge.formats.imagenet_plus import sparsify
    from reinforge.stages.teachers import TeacherEnsemble

    recipe = parse_recipe(json.loads((reference_run / "run.json").read_text())["recipe"] | {"output": "x"})
    augmenter = Augmenter(recipe.augmentation.image_augmentation)
    dataset = ReinforcedImageNet(str(reference_run))
    ensemble = TeacherEnsemble(recipe.teachers, recipe.top_k, recipe.temperature)
    ensemble.setup()
    samples = {s.key: s for s in (dataset.sample(i) for i in range(len(dataset)))}
    assert len(samples) == 18
    mixed = 0
    for sample in samples.values():
        views = []
        for entry in sample.entries:
            partner = samples[entry[0]] if entry[0] is not None else None
            mixed += partner is not None
            views.append(augmenter.apply(entry, decode_rgb(sample.image), decode_rgb(partner.image) if partner else None))
        values, ids = sparsify(ensemble.probabilities(torch.stack(views)), recipe.top_k)
        assert np.array_equal(ids[:, 0], sample.ids[:, 0])
        np.testing.assert_allclose(values, sample.values, atol=2e-3)
        assert sample.values.shape == (4, 3) and np.all(np.diff(sample.values, axis=1) <= 0)
    assert mixed > 0


def test_reader_trains_a_student(reference_run):
    import timm

    from reinforge.readers.imagenet_plus import ReinforcedImageNet, kd_loss
    torch.manual_seed(0)
    dataset = ReinforcedImageNet(str(reference_run))
    loader = torch.utils.data.DataLoader(dataset, batch_size=6, shuffle=False)
    batch = [next(iter(loader))]
    student = timm.create_model("resnet10t", num_classes=10)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for step in range(25):  # overfit a fixed batch: the targets must be learnable
        images, targets = batch[0]
        loss = kd_loss(student(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_rerun_skips_done_and_refuses_changed_config(reference_run, inputs):
    again = run_recipe(parse_recipe(tiny_recipe(inputs, reference_run)), progress=False)
    assert again.skipped == 3 and again.done == 0 and again.ok
    with pytest.raises(ConfigChangedError, match="top_k"):
        run_recipe(parse_recipe(tiny_recipe(inputs, reference_run, top_k=2)), progress=False)


def test_force_redoes_tasks_with_the_new_config(inputs, tmp_path, local_ray):
    out = tmp_path / "run"
    run_recipe(parse_recipe(tiny_recipe(inputs, out, augmentation__num_samples=2)), progress=False)
    forced = run_recipe(parse_recipe(tiny_recipe(inputs, out, augmentation__num_samples=3)), force=True, progress=False)
    assert forced.done == 3 and forced.skipped == 0
    checked, problems = validate_run(str(out))
    assert problems == [] and checked == 18


def test_output_is_byte_identical_whatever_the_pool_size(reference_run, inputs, tmp_path, local_ray):
    out = tmp_path / "run"
    run_recipe(parse_recipe(tiny_recipe(inputs, out, resources__num_actors=2)), progress=False)
    assert shard_bytes(out) == shard_bytes(reference_run)


def test_output_is_byte_identical_with_prep_threads_and_overlap(reference_run, inputs, tmp_path, local_ray):
    """Two decode/augment threads per actor, preparing the next batch while the teachers run."""
    out = tmp_path / "run"
    resources = {"num_actors": 1, "cpus_per_actor": 2, "overlap_prep": True, "object_store_memory_mb": 256}
    run_recipe(parse_recipe(tiny_recipe(inputs, out, resources=resources)), progress=False)
    assert shard_bytes(out) == shard_bytes(reference_run)


def test_bad_inputs_are_counted_skips_or_failed_tasks(tmp_path, local_ray):
    folder = tmp_path / "in"
    folder.mkdir()
    good = [(f"ok{i}", {"jpg": jpeg_bytes(photo(i)), "cls": b"1"}) for i in range(6)]
    cmyk = Image.new("CMYK", (40, 40), (10, 200, 30, 0))
    rgba = photo(1).convert("RGBA")
    gray = photo(2).convert("L")
    corrupt = jpeg_bytes(photo(3))
    corrupt = corrupt[:len(corrupt) // 2]
    broken = [
        ("cmyk", {"jpg": jpeg_bytes(cmyk), "cls": b"2"}),
        ("alpha", {"png": png_bytes(rgba), "cls": b"3"}),
        ("gray", {"jpg": jpeg_bytes(gray), "cls": b"4"}),
        ("corrupt", {"jpg": corrupt, "cls": b"5"}),
        ("zerobyte", {"jpg": b"", "cls": b"5"}),
        ("nolabel", {"jpg": jpeg_bytes(photo(4))}),
        ("bomb", {"png": png_header_claiming(20000, 20000), "cls": b"6"}),
        ("notanimage", {"jpg": b"hello world, not a jpeg", "cls": b"6"}),
    ]
    write_shard(folder / "a-0.tar", good + broken)
    write_shard(folder / "a-1.tar", good)
    data = (folder / "a-1.tar").read_bytes()
    (folder / "a-1.tar").write_bytes(data[: len(data) // 2 + 100])  # truncated mid-member
    write_shard(folder / "a-2.tar", good[:2] + broken[3:])  # 2 good, 5 bad: over budget
    out = tmp_path / "run"
    summary = run_recipe(parse_recipe(tiny_recipe(str(folder / "a-*.tar"), out)), progress=False)

    assert summary.done == 1 and summary.samples == 6 + 3 and summary.errors == 5
    failed = {f["task"]: f["reason"] for f in summary.failed}
    assert set(failed) == {"a-1", "a-2"}
    assert "unreadable tar" in failed["a-1"]
    assert "error budget exceeded: 5/7" in failed["a-2"]
    errors = [json.loads(line) for line in (out / "errors" / "a-0.jsonl").read_text().splitlines()]
    assert {(e["key"], e["stage"], e["reason"]) for e in errors} == {
        ("corrupt", "decode", "corrupt_image"), ("zerobyte", "decode", "empty_image"),
        ("nolabel", "label", "missing_label"), ("bomb", "decode", "image_too_large"),
        ("notanimage", "decode", "corrupt_image")}
    status = run_status(str(out))
    assert status.done == ["a-0"] and set(status.failed) == {"a-1", "a-2"}
    assert not (out / "shards" / "a-1.tar").exists() and not (out / "manifests" / "a-2.json").exists()
    assert [n for n in os.listdir(out / "shards") if n.startswith(".tmp-")] == []
    checked, problems = validate_run(str(out))
    assert problems == [] and checked == 9


def test_imagefolder_input_keys_by_dataset_index(tmp_path, local_ray):
    """ImageFolder order (sorted classes, sorted files): key = dataset index, cls = class index."""
    from reinforge.ops.export_mldr import export_ml_dr
    from reinforge.readers.imagenet_plus import ReinforcedImageNet
    root = tmp_path / "folder"
    for c, name in enumerate(["cat", "cup", "rocket"]):
        (root / name).mkdir(parents=True)
        for i in range(3):
            (root / name / f"img{i}.jpg").write_bytes(jpeg_bytes(photo(c * 3 + i)))
    (root / "cup" / "notes.txt").write_text("not an image")
    out = tmp_path / "run"
    recipe = tiny_recipe(str(root), out, input={"format": "imagefolder", "path": str(root), "samples_per_task": 4})
    summary = run_recipe(parse_recipe(recipe), progress=False)
    assert summary.ok and summary.tasks == 3 and summary.samples == 9
    dataset = ReinforcedImageNet(str(out))
    samples = [dataset.sample(i) for i in range(len(dataset))]
    assert [s.key for s in samples] == [f"{i:08d}" for i in range(9)]
    assert [s.label for s in samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert samples[4].meta["source"] == "cup/img1.jpg"
    counts = export_ml_dr(str(out), str(tmp_path / "mldr"))
    assert counts == {"images": 9, "augmentations": 36}
    assert (tmp_path / "mldr" / "8.pth.tar").exists()


def test_one_bad_sample_costs_only_itself_in_the_teacher_stage():
    """The timm ensemble isolates a failing batch: the bad sample is a counted error, the others are
    scored exactly as in a batch of their own."""
    from conftest import tiny_recipe

    from reinforge.stages.base import Batch
    from reinforge.stages.teachers import TeacherEnsemble
    recipe = parse_recipe(tiny_recipe("unused", "unused"))
    ensemble = TeacherEnsemble(recipe.teachers, recipe.top_k, recipe.temperature)
    ensemble.setup()
    torch.manual_seed(0)
    good = [{"__key__": f"k{i}", "entries": [None] * 2, "views": torch.rand(2, 3, 32, 32)} for i in range(3)]
    bad = {"__key__": "bad", "entries": [None] * 2, "views": torch.rand(2, 1, 32, 32)}  # one channel
    alone = ensemble(Batch([{**s, "views": s["views"].clone()} for s in good]))
    out = ensemble(Batch([{**good[0]}, bad, {**good[1]}, {**good[2]}]))
    assert [s["__key__"] for s in out.samples] == ["k0", "k1", "k2"], out.errors
    assert [(e.key, e.stage) for e in out.errors] == [("bad", "teachers")]
    for got, want in zip(out.samples, alone.samples):
        assert np.array_equal(got["ids"], want["ids"]) and np.allclose(got["values"], want["values"], atol=1e-6)
