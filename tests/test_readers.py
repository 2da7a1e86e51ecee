"""ImageNet+ reader and ML-DR exporter on a hand-built run directory (no Ray): exact replay, targets,
validation, DataLoader workers, export round trip, and a small KD training run."""
from __future__ import annotations

import json
import math
import os
import pickle
import random

import numpy as np
import pytest
import torch
from consumer_reference import default_loader, reapply
from conftest import jpeg_bytes, photo, png_bytes

from reinforge.ops.export_mldr import export_ml_dr
from reinforge.readers import ReinforcedImageNet, kd_loss, shard_urls
from reinforge.formats.augment import Augmenter
from reinforge.formats.image import decode_rgb
from reinforge.formats.imagenet_plus import (ReinforcedSample, SchemaError, densify, encode_sample, sha256_hex, sparsify)
from reinforge.io.manifest import OutputFile, RunLayout, TaskManifest
from reinforge.formats.wds import ShardWriter

NUM_CLASSES, N, TOPK = 10, 4, 3
NORMALIZE = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
BASE = {"random_resized_crop": {"size": 32}, "random_horizontal_flip": {"p": 0.5}, "rand_augment": {"p": 1.0},
        "normalize": NORMALIZE}
MIXING = {**BASE, "mixup": {"alpha": 1.0, "p": 0.5}, "cutmix": {"alpha": 1.0, "p": 0.5}}


def make_run(root, image_augmentation: dict, keys: list[str], per_shard: int = 4, seed: int = 0,
             num_classes_in_config: bool = True, tamper=None) -> dict:
    """Write <root>/run like a finished ImageNet+ run; returns {key: ReinforcedSample} as written.
    `tamper(key, members)` may alter a sample's encoded members before it is written."""
    run = os.path.join(str(root), "run")
    layout = RunLayout(run)
    for d in layout.directories:
        os.makedirs(d, exist_ok=True)
    augmenter = Augmenter(image_augmentation)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    images = {k: (jpeg_bytes if i % 2 else png_bytes)(photo(i, 64 + 8 * i)) for i, k in enumerate(keys)}
    hw = {k: tuple(decode_rgb(b).shape[-2:]) for k, b in images.items()}
    written = {}
    for s in range(0, len(keys), per_shard):
        task = f"part-{s // per_shard:06d}"
        with open(layout.shard(task), "wb") as f, ShardWriter(f) as writer:
            for key in keys[s:s + per_shard]:
                label = keys.index(key) % NUM_CLASSES
                entries = []
                for _ in range(N):
                    partner = rng.choice([k for k in keys if k != key]) if augmenter.uses_partner else None
                    entries.append(augmenter.sample(rng, hw[key], partner=partner,
                                                    partner_hw=hw[partner] if partner else None))
                # peaked at the label so that the training check has something to learn
                logits = torch.randn(N, NUM_CLASSES) + 3.0 * torch.nn.functional.one_hot(
                    torch.tensor(label), NUM_CLASSES)
                values, ids = sparsify(torch.softmax(logits, -1), TOPK)
                sample = ReinforcedSample(key=key, image_ext="jpg" if keys.index(key) % 2 else "png",
                                          image=images[key], label=label, entries=entries, values=values, ids=ids)
                members = encode_sample(sample, NUM_CLASSES, compress_params=False)
                if tamper:
                    tamper(key, members)
                writer.write(key, members)
                written[key] = sample
        data = open(layout.shard(task), "rb").read()
        manifest = TaskManifest(task_id=task, inputs=[], samples_in=writer.samples, samples_out=writer.samples,
                                outputs=[OutputFile(f"shards/{task}.tar", len(data), sha256_hex(data), writer.samples)],
                                config_digest="test", versions={}, stages={}, started_at=0.0, seconds=0.0)
        with open(layout.manifest(task), "w") as f:
            f.write(manifest.to_json())
    with open(layout.run_file, "w") as f:  # the run's recipe digest: its manifests say "test"
        json.dump({"config_digest": "test", "product": "imagenet_plus"}, f)
    reinforce = {"image_augmentation": augmenter.config(), "num_samples": N, "topk": TOPK,
                 "replay_backend": augmenter.backend}
    if num_classes_in_config:
        reinforce["num_classes"] = NUM_CLASSES
    with open(layout.dr_config, "w") as f:
        json.dump({"reinforce": reinforce, "teachers": []}, f)
    return written


DECIMAL_KEYS = [f"{i:08d}" for i in range(8)]
NAMED_KEYS = [f"img_{c}" for c in "hgfedcba"]  # not decimal, not sorted: export indexes by position


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    return os.path.join(str(root), "run"), make_run(root, BASE, DECIMAL_KEYS)


@pytest.fixture(scope="module")
def mixing_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixing")
    return os.path.join(str(root), "run"), make_run(root, MIXING, NAMED_KEYS, seed=1)


def replay(augmenter: Augmenter, written: dict, key: str, j: int) -> torch.Tensor:
    entry = written[key].entries[j]
    partner = entry[0] if augmenter.uses_partner else None
    return augmenter.apply(entry, decode_rgb(written[key].image),
                           decode_rgb(written[partner].image) if partner is not None else None)


def test_length_keys_and_shard_urls(plain_run):
    run, written = plain_run
    urls = shard_urls(run)
    assert [os.path.basename(u) for u in urls] == ["part-000000.tar", "part-000001.tar"]
    ds = ReinforcedImageNet(run)
    assert len(ds) == 8 and ds.keys == DECIMAL_KEYS and ds.num_classes == NUM_CLASSES
    sample = ds.sample(3)
    assert sample.key == DECIMAL_KEYS[3] and sample.entries == written[sample.key].entries
    # explicit shard list + config gives the same dataset
    same = ReinforcedImageNet(urls, image_augmentation=BASE, num_classes=NUM_CLASSES)
    assert same.keys == ds.keys and torch.equal(same[5][0], ds[5][0])
    assert ds.augmenter.backend == same.augmenter.backend == "pil"


def test_backend_follows_the_run(plain_run):
    """The reader renders with the backend the run recorded (the view its teachers scored); runs from
    before it was recorded rendered on tensors."""
    run, written = plain_run
    config_path = RunLayout(run).dr_config
    original = open(config_path).read()
    config = json.loads(original)
    try:
        for recorded, expected in (("tensor", "tensor"), (None, "tensor")):
            config["reinforce"].pop("replay_backend", None)
            if recorded:
                config["reinforce"]["replay_backend"] = recorded
            with open(config_path, "w") as f:
                json.dump(config, f)
            ds = ReinforcedImageNet(run, mode="epoch")
            assert ds.augmenter.backend == expected
            tensor = Augmenter(BASE, "tensor")
            assert torch.equal(ds[2][0], replay(tensor, written, ds.keys[2], 0))
        assert ReinforcedImageNet(run, backend="pil").augmenter.backend == "pil"
    finally:
        with open(config_path, "w") as f:
            f.write(original)


@pytest.mark.parametrize("which", ["plain_run", "mixing_run"])
def test_getitem_replays_bit_identical(which, request):
    run, written = request.getfixturevalue(which)
    ds = ReinforcedImageNet(run, seed=3)
    augmenter = Augmenter(ds.config["reinforce"]["image_augmentation"])
    partners = 0
    chosen = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i, key in enumerate(ds.keys):
            j = ds.choose(i, N)
            chosen.add(j)
            image, target = ds[i]
            assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
            assert torch.equal(image, replay(augmenter, written, key, j))
            stored = ds.sample(i)  # probabilities as stored (float16)
            assert torch.equal(target, densify(stored.values[j], stored.ids[j], NUM_CLASSES))
            sample = written[key]
            assert np.allclose(stored.values, sample.values, atol=1e-3) and (stored.ids == sample.ids).all()
            assert target.shape == (NUM_CLASSES,) and abs(float(target.sum()) - 1) < 1e-5 and target.min() >= 0
            partners += augmenter.uses_partner and sample.entries[j][0] is not None
    assert chosen == set(range(N))  # uniform draws reach every stored augmentation
    if which == "mixing_run":
        assert partners > 0
    # the draw depends on (seed, sample key, epoch) only: not on shard order or on the shards loaded
    other = ReinforcedImageNet(list(reversed(ds.shards)), seed=3, num_classes=NUM_CLASSES,
                               image_augmentation=ds.config["reinforce"]["image_augmentation"])
    other.set_epoch(2)
    assert other.keys != ds.keys and sorted(other.keys) == sorted(ds.keys)
    assert ({k: other.choose(i, N) for i, k in enumerate(other.keys)}
            == {k: ds.choose(i, N) for i, k in enumerate(ds.keys)})


def test_epoch_mode_cycles(plain_run):
    run, written = plain_run
    ds = ReinforcedImageNet(run, mode="epoch")
    augmenter = Augmenter(BASE)
    for epoch in range(2 * N + 1):
        ds.set_epoch(epoch)
        image, target = ds[1]
        assert ds.choose(1, N) == epoch % N
        assert torch.equal(image, replay(augmenter, written, DECIMAL_KEYS[1], epoch % N))


def test_plain_view_with_one_hot(plain_run):
    run, written = plain_run
    ds = ReinforcedImageNet(run, p_plain=1.0)
    image, target = ds[2]
    sample = written[DECIMAL_KEYS[2]]
    assert torch.equal(image, Augmenter(BASE).plain(decode_rgb(sample.image)).float())
    assert torch.equal(target, torch.nn.functional.one_hot(torch.tensor(sample.label), NUM_CLASSES).float())
    mixed = ReinforcedImageNet(run, p_plain=0.5)
    plain = 0
    for epoch in range(20):
        mixed.set_epoch(epoch)
        plain += sum(mixed.choose(i, N) is None for i in range(8))
    assert 40 < plain < 120  # about half of 160 draws


def test_num_classes_from_argument(tmp_path):
    make_run(tmp_path, BASE, DECIMAL_KEYS[:2], num_classes_in_config=False)
    run = os.path.join(str(tmp_path), "run")
    with pytest.raises(ValueError, match="num_classes"):
        ReinforcedImageNet(run)[0]
    assert ReinforcedImageNet(run, num_classes=NUM_CLASSES)[0][1].shape == (NUM_CLASSES,)


def test_sha256_mismatch_is_skipped_counted_and_logged(tmp_path, caplog):
    def tamper(key, members):
        if key == DECIMAL_KEYS[1]:
            meta = json.loads(members["json"])
            meta["sha256"] = "0" * 64
            members["json"] = json.dumps(meta).encode()
    written = make_run(tmp_path, BASE, DECIMAL_KEYS[:3], tamper=tamper)
    ds = ReinforcedImageNet(os.path.join(str(tmp_path), "run"), mode="epoch")
    ds[0]
    with caplog.at_level("WARNING", logger="reinforge.readers.imagenet_plus"):
        view, _ = ds[1]  # item 2 in its place: an epoch never stops on one sample
    assert torch.equal(view, replay(ds.augmenter, written, DECIMAL_KEYS[2], 0))
    assert ds.skipped == {"sha256_mismatch": 1} and f"{DECIMAL_KEYS[1]} (sha256_mismatch)" in caplog.text
    ds[1]
    assert ds.skipped == {"sha256_mismatch": 1}  # met again, passed over unread
    with pytest.raises(ValueError, match=f"{DECIMAL_KEYS[1]}.*sha256"):
        ds._checked_image(ds.sample(1))


def test_crop_outside_image_is_skipped_and_counted(tmp_path):
    def tamper(key, members):
        if key == DECIMAL_KEYS[0]:
            params = json.loads(members["paug.json"])
            for entry in params["param_aug"]:
                entry[0] = [0, 0, 10_000, 20]  # random_resized_crop box far below the image
            members["paug.json"] = json.dumps(params).encode()
    make_run(tmp_path, BASE, DECIMAL_KEYS[:2], tamper=tamper)
    ds = ReinforcedImageNet(os.path.join(str(tmp_path), "run"))
    assert len([ds[0], ds[1]]) == 2 and ds.skipped == {"replay_error": 1}
    ds.reset_skipped()
    assert ds.skipped == {}


def test_kd_loss_matches_hand_computed_kl():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]])
    target = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.2, 0.6]])
    expected = 0.0
    for row_logits, row_target in zip(logits.tolist(), target.tolist()):
        z = sum(math.exp(x) for x in row_logits)
        q = [math.exp(x) / z for x in row_logits]
        expected += sum(p * math.log(p / qi) for p, qi in zip(row_target, q) if p > 0)
    loss = kd_loss(logits, target)
    assert loss.ndim == 0 and math.isclose(float(loss), expected / 2, rel_tol=1e-5)
    assert float(kd_loss(torch.randn(5, 10), torch.softmax(torch.randn(5, 10), -1))) >= 0
    exact = torch.tensor([[0.5, 0.5, 0.0]])
    assert abs(float(kd_loss(torch.log(exact + 1e-30), exact))) < 1e-6  # zero targets stay finite
    logits.requires_grad_(True)
    kd_loss(logits, target).backward()
    assert torch.isfinite(logits.grad).all()


def test_dataloader_with_workers(mixing_run):
    run, _ = mixing_run
    ds = ReinforcedImageNet(run, seed=5)
    ds[0]  # opens a handle in this process: workers must not inherit or pickle it
    pickle.dumps(ds)
    ds.set_epoch(1)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, shuffle=False)
    images, targets = zip(*loader)
    images, targets = torch.cat(images), torch.cat(targets)
    assert images.shape == (8, 3, 32, 32) and targets.shape == (8, NUM_CLASSES)
    for i in range(8):
        image, target = ds[i]
        assert torch.equal(images[i], image) and torch.equal(targets[i], target)



@pytest.mark.parametrize("which", ["plain_run", "mixing_run"])
def test_export_ml_dr_round_trip(which, request, tmp_path):
    run, written = request.getfixturevalue(which)
    counts = export_ml_dr(run, str(tmp_path / "mldr"))
    assert counts == {"images": 8, "augmentations": 8 * N}
    out = tmp_path / "mldr"
    config = torch.load(out / "config.pth.tar")  # ml-dr's own call; torch's default is weights_only=True
    as_json = json.loads((out / "config.json").read_text())
    for fields in as_json["reinforce"]["image_augmentation"].values():  # torchvision's defaults: left out
        if fields.get("interpolation") in ("bilinear", "nearest"):
            del fields["interpolation"]
    assert config == as_json
    assert config["reinforce"]["num_samples"] == N and "image_augmentation" in config["reinforce"]
    keys = list(written)
    index = {int(i): k for i, k in json.loads((out / "index.json").read_text()).items()}
    if which == "plain_run":
        assert index == {int(k): k for k in keys}  # ImageFolder keys are the dataset index
    else:
        assert index == dict(enumerate(keys))  # shard order, then order inside the shard
    position = {k: i for i, k in index.items()}
    mixing = Augmenter(config["reinforce"]["image_augmentation"]).uses_partner
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]
    for i, key in index.items():
        stored_index, records = torch.load(out / f"{i}.pth.tar", weights_only=False)
        sample = written[key]
        assert stored_index == i and len(records) == N
        for record, entry, values, ids in zip(records, sample.entries, sample.values, sample.ids):
            params = list(entry)
            if mixing and entry[0] is not None:
                assert isinstance(record["params"][0], int)
                params[0] = position[entry[0]]
            assert record["params"] == params
            rvalues, rids = record["prob"]
            assert all(type(v) is float for v in rvalues) and all(type(c) is int for c in rids)
            # stored as float16 in the shard: compare with what was written, rounded the same way
            assert rvalues == values.astype(np.float16).astype(np.float32).tolist() and rids == ids.tolist()
        # ml-dr's ReinforcedDataset: its record, its partner by dataset index, its PIL replay = reinforge's view
        j = i % N
        params = records[j]["params"]
        partner = index[params[0]] if mixing and params[0] is not None else None
        theirs = reapply(config["reinforce"]["image_augmentation"], params, default_loader(sample.image),
                         default_loader(written[partner].image) if partner else None)
        assert torch.equal(theirs, replay(Augmenter(BASE if which == "plain_run" else MIXING), written, key, j))


def test_export_ml_dr_interpolation_modes(tmp_path):
    """ml-dr hands config fields to torchvision as they are: interpolation must be an InterpolationMode
    (a string raises TypeError). Defaults are left out so the file loads with weights_only=True."""
    from torchvision.transforms import InterpolationMode
    config = {**BASE, "random_resized_crop": {"size": 32, "interpolation": "bicubic"},
              "rand_augment": {"p": 1.0, "interpolation": "bilinear"}}
    make_run(tmp_path, config, DECIMAL_KEYS[:4])
    export_ml_dr(str(tmp_path / "run"), str(tmp_path / "mldr"))
    with pytest.raises(Exception, match="InterpolationMode"):
        torch.load(tmp_path / "mldr" / "config.pth.tar")  # torch >= 2.6 default: enums need allow-listing
    with torch.serialization.safe_globals([InterpolationMode]):
        exported = torch.load(tmp_path / "mldr" / "config.pth.tar")["reinforce"]["image_augmentation"]
    assert exported["random_resized_crop"]["interpolation"] is InterpolationMode.BICUBIC
    assert exported["rand_augment"]["interpolation"] is InterpolationMode.BILINEAR
    with pytest.raises(SchemaError, match="center_crop"):
        make_run(tmp_path / "cc", {**BASE, "center_crop": {"size": 48}}, DECIMAL_KEYS[:2])
        export_ml_dr(str(tmp_path / "cc" / "run"), str(tmp_path / "cc_out"))


def test_kd_training_loss_decreases(plain_run):
    import timm
    run, _ = plain_run
    torch.manual_seed(0)
    ds = ReinforcedImageNet(run, seed=0, p_plain=0.01)
    loader_kwargs = {"batch_size": 8, "shuffle": True, "num_workers": 0}
    model = timm.create_model("resnet10t", num_classes=NUM_CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for epoch in range(30):
        ds.set_epoch(epoch)
        for images, targets in torch.utils.data.DataLoader(ds, **loader_kwargs):
            loss = kd_loss(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
