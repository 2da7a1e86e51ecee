"""Storage codecs for DataCompDR embeddings (formats.codecs): round trips within their error bounds, byte-identical
reruns, transparent reading by reinforge's readers, `reinforge export datacompdr` back to the standard layout,
and clear errors for bad names and parameters. No Ray; real photos, hand-made unit-norm rows."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import re
import uuid

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import jpeg_bytes, photo

from reinforge.cli.main import cli
from reinforge.ops.export_datacompdr import export_datacompdr
from reinforge.readers.mobileclip import MobileCLIPDRDataset
from reinforge.formats.arrays import load_npz, npz_bytes
from reinforge.formats.augment import Augmenter
from reinforge.formats.codecs import CODEC_MEMBER, CodecError, Int8Row, Quant, decode_member, make_codec
from reinforge.formats.recipe import ConfigError, config_digest
from reinforge.products.mobileclip_dr.recipe import DRStorage
from reinforge.products.registry import parse_recipe
from reinforge.formats.datacomp_dr import (DRSample, StorageSpec, decode_dr_sample, embedding_arrays, encode_dr_sample)
from reinforge.formats.dr_trainer_config import dr_trainer_config
from reinforge.formats.imagenet_plus import SchemaError, sha256_hex
from reinforge.io.manifest import OutputFile, RunLayout, TaskManifest
from reinforge.formats.members import decode_member as decode_by_extension
from reinforge.formats.wds import ShardWriter, iter_samples

AUG = {"random_resized_crop": {"size": 32, "interpolation": "bicubic"}, "rand_augment": {"p": 1.0}}
N, S, DIMS = 5, 3, [24, 16]
STEP = 2.0 ** -12


def unit_rows(rng: np.random.Generator, rows: int, base: np.ndarray | None = None) -> np.ndarray:
    """Rows unit-norm per teacher slice; correlated around `base` when given (views of one image)."""
    x = rng.standard_normal((rows, sum(DIMS))).astype(np.float32)
    if base is not None:
        x = base + 0.4 * x
    out, start = [], 0
    for d in DIMS:
        part = x[:, start:start + d]
        out.append(part / np.linalg.norm(part, axis=1, keepdims=True))
        start += d
    return np.concatenate(out, 1).astype(np.float32)


def make_samples(count: int = 4) -> list[DRSample]:
    rng, augmenter, draws = np.random.default_rng(0), Augmenter(AUG), random.Random(0)
    out = []
    for i in range(count):
        image = jpeg_bytes(photo(i, 48))
        base = rng.standard_normal(sum(DIMS)).astype(np.float32)
        entries = [augmenter.sample(draws, (48, 48 + i % 5 * 4)) for _ in range(N)]
        text = unit_rows(rng, 1 + S, base)
        out.append(DRSample(uid=uuid.UUID(int=i + 1).hex, image_ext="jpg", image=image, caption=f"caption {i}",
                            url=None, syn={"syn_text": [f"synthetic {i} {c}" for c in range(S)]}, entries=entries,
                            image_emb=unit_rows(rng, N, base), text_emb=text[:1], syn_emb={"syn_text": text[1:]}))
    return out


def write_run(root: str, samples: list[DRSample], storage: StorageSpec) -> str:
    """A finished run as the pipeline leaves it: shards, manifests, run.json, dr_config.json."""
    run = os.path.join(root, "run")
    layout = RunLayout(run)
    for d in layout.directories:
        os.makedirs(d, exist_ok=True)
    for s in range(0, len(samples), 2):
        task = f"part-{s // 2:06d}"
        with open(layout.shard(task), "wb") as f, ShardWriter(f) as writer:
            for sample in samples[s:s + 2]:
                writer.write(sample.uid, encode_dr_sample(sample, storage))
        data = open(layout.shard(task), "rb").read()
        manifest = TaskManifest(task_id=task, inputs=[], samples_in=2, samples_out=2,
                                outputs=[OutputFile(f"shards/{task}.tar", len(data), sha256_hex(data), 2)],
                                config_digest="test", versions={}, stages={}, started_at=0.0, seconds=0.0)
        with open(layout.manifest(task), "w") as f:
            f.write(manifest.to_json())
    with open(layout.run_file, "w") as f:
        json.dump({"config_digest": "test", "product": "mobileclip_dr"}, f)
    config = dr_trainer_config(AUG, N, [{"model": f"t{i}", "dim": d} for i, d in enumerate(DIMS)])
    config["storage"] = {"format": storage.format, "dtype": storage.dtype, "layout": storage.layout,
                         **({"codec": storage.codec, "codec_params": storage.codec_params or {}}
                            if storage.codec != "none" else {})}
    with open(layout.dr_config, "w") as f:
        json.dump(config, f)
    return run


def arrays_of(sample: DRSample) -> dict[str, np.ndarray]:
    return embedding_arrays(sample, "legacy")


# ---------------------------------------------------------------------------------------------
# Round trips, error bounds, determinism

@pytest.mark.parametrize("step", [2.0 ** -13, STEP, 1e-3, 0.01])
def test_quant_round_trip_is_rounding_to_the_step(step):
    arrays = arrays_of(make_samples(1)[0])
    codec = Quant(step)
    decoded = decode_member(codec.encode(arrays))
    assert set(decoded) == set(arrays)
    for name, array in arrays.items():
        assert decoded[name].dtype == np.float32 and decoded[name].shape == array.shape
        assert np.abs(decoded[name] - array).max() <= step / 2 + 1e-7
        # exactly the nearest multiple of the step: the mean removal is lossless
        np.testing.assert_array_equal(decoded[name], (np.rint(array.astype(np.float64) / step) * np.float32(step))
                                      .astype(np.float32))


@pytest.mark.parametrize("mean_grid", [2, 64, Quant.MAX_MEAN_GRID])
def test_quant_mean_grid_changes_bytes_not_values(mean_grid):
    arrays = arrays_of(make_samples(1)[0])
    exact, coarse = Quant(2.0 ** -13), Quant(2.0 ** -13, mean_grid=mean_grid)
    decoded = decode_member(coarse.encode(arrays))  # the header carries mean_grid: no codec passed to decode
    for name, values in decode_member(exact.encode(arrays)).items():
        np.testing.assert_array_equal(decoded[name], values)
    assert coarse.describe() == {"codec": "quant", "step": 2.0 ** -13, "mean_grid": mean_grid}
    assert exact.describe() == {"codec": "quant", "step": 2.0 ** -13}  # mean_grid 1: the header as before it existed
    assert Quant(STEP, mean_grid=1).encode(arrays) == Quant(STEP).encode(arrays)


def test_int8_row_round_trip_within_half_a_row_scale():
    arrays = arrays_of(make_samples(1)[0])
    decoded = decode_member(Int8Row().encode(arrays))
    for name, array in arrays.items():
        scale = np.abs(array).max(axis=1, keepdims=True) / 127
        assert (np.abs(decoded[name] - array) <= scale / 2 + 1e-7).all()


def test_quant_is_smaller_than_fp16_npz_on_correlated_rows():
    rng = np.random.default_rng(1)
    base = rng.standard_normal(512)
    views = base + 0.5 * rng.standard_normal((30, 512))  # N=30 correlated views, unit rows
    arrays = {"image_emb": (views / np.linalg.norm(views, axis=1, keepdims=True)).astype(np.float32)}
    plain = npz_bytes({k: v.astype(np.float16) for k, v in arrays.items()})
    assert len(Quant(STEP).encode(arrays)) < 0.8 * len(plain)


@pytest.mark.parametrize("codec, params", [("quant", {"step": STEP}), ("int8_row", None)])
def test_reruns_are_byte_identical(codec, params):
    storage = StorageSpec("npz", "float16", codec=codec, codec_params=params)
    first = [encode_dr_sample(s, storage) for s in make_samples()]
    again = [encode_dr_sample(s, storage) for s in make_samples()]
    assert first == again


def test_no_codec_writes_the_standard_members_as_before():
    sample = make_samples(1)[0]
    assert encode_dr_sample(sample, StorageSpec("npz", "float16")) == \
        encode_dr_sample(sample, StorageSpec("npz", "float16", codec="none"))
    assert DRStorage().model_dump(mode="json") == {"format": "npz", "dtype": "float16", "layout": "legacy"}


# ---------------------------------------------------------------------------------------------
# Readers decode transparently

@pytest.mark.parametrize("codec, params", [("quant", {"step": STEP}), ("int8_row", None)])
def test_sample_decodes_as_the_codec_decodes(codec, params):
    sample = make_samples(1)[0]
    members = encode_dr_sample(sample, StorageSpec(codec=codec, codec_params=params))
    expected = make_codec(codec, params)
    raw = expected.decode(load_npz(members[CODEC_MEMBER]))
    back = decode_dr_sample({"__key__": sample.uid, **members})
    np.testing.assert_array_equal(back.image_emb, raw["image_emb"])
    np.testing.assert_array_equal(back.text_emb, raw["text_emb"][:1])
    np.testing.assert_array_equal(back.syn_emb["syn_text"], raw["text_emb"][1:])
    by_extension = decode_by_extension(CODEC_MEMBER, members[CODEC_MEMBER])  # the HF / Ray Data readers' path
    assert all(np.array_equal(by_extension[k], raw[k]) for k in raw)


def test_dataset_reads_a_codec_run_identically_to_decode(tmp_path):
    import open_clip
    samples = make_samples()
    storage = StorageSpec(codec="quant", codec_params={"step": STEP})
    run = write_run(str(tmp_path), samples, storage)
    dataset = MobileCLIPDRDataset(run, open_clip.get_tokenizer("ViT-B-32"))
    items = list(dataset)
    assert len(items) == len(samples) and dataset.skipped == {}
    by_uid = {s.uid: decode_dr_sample({"__key__": s.uid, **encode_dr_sample(s, storage)}) for s in samples}
    for item in items:
        decoded = by_uid[item["uid"]]
        np.testing.assert_array_equal(item["image_emb"].numpy(), decoded.image_emb[item["aug_index"]])
        np.testing.assert_array_equal(item["syn_emb"].numpy(), decoded.syn_emb["syn_text"][item["syn_index"]])


# ---------------------------------------------------------------------------------------------
# Export to the standard layout

def test_export_reexpands_to_the_standard_layout(tmp_path):
    import open_clip
    samples = make_samples()
    storage = StorageSpec("npz", "float16", codec="quant", codec_params={"step": STEP})
    run = write_run(str(tmp_path / "coded"), samples, storage)
    out = str(tmp_path / "exported")
    counts = export_datacompdr(run, out)
    assert counts == {"shards": 2, "samples": len(samples), "skipped": {}}
    # each sample is what a run written without a codec holds for the decoded embeddings, byte for byte
    plain = StorageSpec("npz", "float16")
    expected = []
    for s in samples:
        d = decode_dr_sample({"__key__": s.uid, **encode_dr_sample(s, storage)})
        expected.append(encode_dr_sample(dataclasses.replace(s, image_emb=d.image_emb, text_emb=d.text_emb,
                                                             syn_emb=d.syn_emb), plain))
    got = []
    for task in ("part-000000", "part-000001"):
        with open(RunLayout(out).shard(task), "rb") as f:
            got += [{k: v for k, v in m.items() if not k.startswith("__")} for m in iter_samples(f)]
    assert got == expected
    for members in got:  # what Apple's trainer decodes: np.load of the npz member
        with np.load(io.BytesIO(members["npz"]), allow_pickle=False) as npz:
            assert set(npz.files) == {"image_emb", "text_emb"} and npz["image_emb"].dtype == np.float16
    config = json.load(open(RunLayout(out).dr_config))
    assert config["storage"] == {"format": "npz", "dtype": "float16", "layout": "legacy"}
    assert config["exported_from"] == {"codec": "quant", "codec_params": {"step": STEP}}
    dataset = MobileCLIPDRDataset(out, open_clip.get_tokenizer("ViT-B-32"))
    assert len(list(dataset)) == len(samples) and dataset.skipped == {}
    # a rerun writes the same bytes
    again = str(tmp_path / "again")
    export_datacompdr(run, again)
    for task in ("part-000000", "part-000001"):
        assert open(RunLayout(out).shard(task), "rb").read() == open(RunLayout(again).shard(task), "rb").read()


def test_export_cli_to_bf16_and_its_errors(tmp_path):
    run = write_run(str(tmp_path / "coded"), make_samples(2), StorageSpec(codec="int8_row"))
    out = str(tmp_path / "bf16")
    result = CliRunner().invoke(cli, ["export", "datacompdr", run, out, "--format", "pth.gz"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "wrote 2 samples in 1 shards" in result.output
    with open(RunLayout(out).shard("part-000000"), "rb") as f:
        members = next(iter_samples(f))
    assert "pth.gz" in members and CODEC_MEMBER not in members
    bad = CliRunner().invoke(cli, ["export", "datacompdr", run, str(tmp_path / "x"), "--format", "npz",
                                   "--dtype", "bfloat16"])
    assert bad.exit_code == 2 and "npz cannot hold bfloat16" in bad.output
    missing = CliRunner().invoke(cli, ["export", "datacompdr", str(tmp_path), str(tmp_path / "y")])
    assert missing.exit_code == 2 and "no dr_config.json" in missing.output


# ---------------------------------------------------------------------------------------------
# Bad names, parameters and members

@pytest.mark.parametrize("codec, params, message", [
    ("zip", None, "unknown storage codec 'zip'"),
    ("quant", {"stp": 0.01}, "unknown parameter(s) ['stp']"),
    ("quant", {"step": 0}, "step must be a number"),
    ("quant", {"step": "big"}, "step must be a number"),
    ("quant", {"mean_grid": 3}, "mean_grid must be a power of two"),
    ("quant", {"mean_grid": 1 << 13}, "mean_grid must be a power of two"),
    ("quant", {"mean_grid": 2.0}, "mean_grid must be a power of two"),
    ("int8_row", {"step": 0.1}, "unknown parameter(s) ['step']"),
    ("none", {"step": 0.1}, "without a codec"),
])
def test_bad_codec_names_and_parameters_are_clear_errors(codec, params, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        StorageSpec(codec=codec, codec_params=params)


def test_bad_codec_in_a_recipe_is_one_config_line():
    recipe = {"product": "mobileclip_dr", "output": "/tmp/x", "input": {"format": "webdataset", "path": "a.tar"},
              "mode": "embeddings", "augmentation": {"image_augmentation": AUG}, "teachers": [{"model": "ViT-S-32"}]}
    with pytest.raises(ConfigError, match=r"^config error: storage: Value error, unknown storage codec 'zip'"):
        parse_recipe(json.loads(json.dumps(recipe)), ("storage.codec=zip",))
    with pytest.raises(ConfigError, match=r"step must be a number"):
        parse_recipe(json.loads(json.dumps(recipe)), ("storage.codec=quant", "storage.codec_params.step=-1"))
    plain = parse_recipe(json.loads(json.dumps(recipe)))
    coded = parse_recipe(json.loads(json.dumps(recipe)), ("storage.codec=quant",))
    assert "codec" not in plain.model_dump(mode="json")["storage"]  # digests of runs without a codec unchanged
    assert config_digest(plain) != config_digest(coded)


def test_values_a_codec_cannot_store_are_refused_on_write():
    with pytest.raises(ValueError, match="unit-norm"):
        Quant(STEP).encode({"image_emb": np.full((2, 4), 3.0, np.float32)})
    with pytest.raises(ValueError, match="finite"):
        Int8Row().encode({"image_emb": np.array([[np.nan, 0.0]], np.float32)})


def test_damaged_codec_members_are_schema_errors():
    sample = make_samples(1)[0]
    members = {"__key__": sample.uid, **encode_dr_sample(sample, StorageSpec(codec="quant"))}
    with pytest.raises(SchemaError, match=CODEC_MEMBER):
        decode_dr_sample({**members, CODEC_MEMBER: members[CODEC_MEMBER][:100]})
    arrays = load_npz(members[CODEC_MEMBER])
    header = json.dumps({"codec": "quant", "step": -1}).encode()
    with pytest.raises(CodecError, match="bad __codec__ header"):
        decode_member(npz_bytes({**arrays, "__codec__": np.frombuffer(header, np.uint8)}))
    arrays["image_emb"] = arrays["image_emb"][:1]
    with pytest.raises(CodecError, match=r"image_emb: expected one uint8 array \[2, 1 \+ rows, D\]"):
        decode_member(npz_bytes(arrays))


def test_the_encode_stage_writes_the_codec_member_and_records_it_in_manifests():
    from reinforge.products.mobileclip_dr.encode import EncodeDataCompDR
    sample = make_samples(1)[0]
    stage = EncodeDataCompDR(StorageSpec(codec="quant"))
    assert stage.versions() == {"storage_codec": {"codec": "quant", "step": Quant.DEFAULT_STEP}}
    assert EncodeDataCompDR(StorageSpec()).versions() == {}  # manifests of runs without a codec: as before
    out = stage.process({"__key__": sample.uid, "image_bytes": sample.image, "image_ext": "jpg",
                         "caption": sample.caption, "syn": sample.syn, "entries": sample.entries,
                         "image_emb": sample.image_emb, "text_emb": sample.text_emb, "syn_emb": sample.syn_emb})
    assert list(out["members"]) == ["jpg", "txt", "syn.json", "paug.json", CODEC_MEMBER, "json"]
    decoded = decode_dr_sample({"__key__": sample.uid, **out["members"]})
    assert np.abs(decoded.image_emb - sample.image_emb).max() <= Quant.DEFAULT_STEP / 2 + 1e-7
