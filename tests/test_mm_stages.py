"""CoCa captioner and CLIP teacher ensemble (MobileCLIP DR stages) with tiny random-init open_clip
models: registered configs (pretrained=None or a local checkpoint file) and a local-dir: model."""
from __future__ import annotations

import copy
import hashlib
import json
import random

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from conftest import TINY_CLIP, TINY_COCA, jpeg_bytes, photo, tiny_open_clip

from reinforge.formats.augment import Augmenter
from reinforge.formats.seeds import entry_seed
from reinforge.models.open_clip import clip_teacher_info, init_coca_decoder, load_open_clip
from reinforge.models.specs import CaptionerSpec, OpenClipTeacherSpec
from reinforge.formats.image import decode_rgb
from reinforge.stages.base import Batch
from reinforge.stages.captioner import CocaCaptioner, clean_caption
from reinforge.stages.clip_teachers import ClipTeacherEnsemble

KEYS = [hashlib.md5(str(i).encode()).hexdigest() for i in range(3)]  # DataComp-style 32-hex uids
NUM_VIEWS = 3
COCA = "rf-test-coca"
CLIP48 = "rf-test-clip-48"  # 48 px input, embed 24, text context 16: a different tokenizer length


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: on 2 shared cores, OpenMP's second thread only spins (measured ~20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Register tiny configs with open_clip; save the CoCa's seeded random weights as a checkpoint file."""
    folder = tmp_path_factory.mktemp("open_clip_configs")
    clip48 = copy.deepcopy(TINY_CLIP)
    clip48["embed_dim"] = 24
    clip48["vision_cfg"]["image_size"] = 48
    clip48["text_cfg"]["context_length"] = 16
    coca = copy.deepcopy(TINY_COCA)
    for name, cfg in ((COCA, coca), (CLIP48, clip48)):
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    checkpoint = tmp_path_factory.mktemp("coca") / "coca.pt"
    coca_model = open_clip.create_model(COCA)
    init_coca_decoder(coca_model)
    torch.save(coca_model.state_dict(), checkpoint)
    return {"coca_checkpoint": str(checkpoint), "clip64": tiny_open_clip("clip", image_size=64)}


def make_samples(with_views: bool = True) -> list[dict]:
    """Real photos decoded as the pipeline does, with N replayable 64 px views (not normalised)."""
    augmenter = Augmenter({"random_resized_crop": {"size": 64, "interpolation": "bicubic"},
                           "rand_augment": {"p": 1.0}})
    samples = []
    for i, key in enumerate(KEYS):
        image = decode_rgb(jpeg_bytes(photo(i, 80)))
        sample = {"__key__": key, "image": image, "caption": f"a photo number {i} of something. more text"}
        if with_views:
            views = []
            for n in range(NUM_VIEWS):
                entry = augmenter.sample(random.Random(entry_seed(0, key, n)), tuple(image.shape[-2:]))
                views.append(augmenter.apply(entry, image))
            sample["views"] = torch.stack(views)
        samples.append(sample)
    return samples


def captioner(models, seed: int = 7, **overrides) -> CocaCaptioner:
    spec = CaptionerSpec(model=COCA, pretrained=models["coca_checkpoint"],
                         **{"num_captions": 3, "max_length": 10, "min_length": 3, **overrides})
    stage = CocaCaptioner(spec, seed=seed, device="cpu")
    stage.setup()
    return stage


def run_captions(stage: CocaCaptioner, samples: list[dict]) -> dict[str, list[str]]:
    out = stage(Batch(samples))
    assert not out.errors
    return {s["__key__"]: s["syn"][stage.spec.syn_key] for s in out.samples}


# ---------------------------------------------------------------------------------------------
# Captioner

def test_top_p_captions_are_seeded_per_sample_and_independent_of_batching(models):
    batched = captioner(models, batch_size=3)
    first = run_captions(batched, make_samples(False))
    assert first == run_captions(batched, make_samples(False))  # deterministic
    # Batching: in float64, so that only the sampling algorithm is under test. In float32 a row's logits
    # move by ~1e-7 with the batch shape, and the random-init model's flat 49k-token distributions turn
    # that into a different draw (seen in CI); reruns of one recipe use the same batches (docstring).
    exact3, exact1 = captioner(models, batch_size=3), captioner(models, batch_size=1)
    exact3.model.double(), exact1.model.double()
    in_threes = run_captions(exact3, make_samples(False))
    assert in_threes == run_captions(exact1, make_samples(False))  # batch size 1 vs 3
    # a sample's captions do not depend on which other samples share its batch
    assert run_captions(exact3, make_samples(False)[1:2]) == {KEYS[1]: in_threes[KEYS[1]]}
    special = ("<start_of_text>", "<end_of_text>")
    # caption index = its own stream (a random-init model can be peaked, so not every image must differ)
    assert any(len(set(captions)) > 1 for captions in first.values()), first
    for captions in first.values():
        assert len(captions) == 3
        assert all(c == c.strip() and "." not in c and not any(t in c for t in special) for c in captions)
    assert run_captions(captioner(models, seed=8), make_samples(False)) != first
    versions = batched.versions()["captioner_syn_text"]
    with open(models["coca_checkpoint"], "rb") as f:
        assert versions["checkpoint_sha256"] == hashlib.sha256(f.read()).hexdigest()


def test_captions_are_cut_at_the_first_period(models):
    stage = captioner(models, num_captions=2)
    tok = stage.tokenizer
    period = tok.encode(".")[0]
    ids = tok.encode("a dog on grass. it runs") + [tok.eot_token_id] + tok.encode("junk")
    assert clean_caption(ids, tok) == "a dog on grass"
    assert clean_caption([tok.sot_token_id] + tok.encode("two cats") + [tok.eot_token_id], tok) == "two cats"

    original = stage._next_logits

    def period_after_two_words(latent, embs, tokens):  # make the model end sentences early
        logits = original(latent, embs, tokens)
        if tokens.shape[1] >= 3:
            logits[:, period] = logits.max(dim=-1).values + 100.0  # overwhelming, whatever the random init
        return logits

    stage._next_logits = period_after_two_words
    g = torch.Generator().manual_seed(0)
    image = stage.preprocess(Image.new("RGB", (40, 40))).unsqueeze(0)
    latent, embs = stage._encode(image)
    raw = stage.sample_rows(latent, embs, [g])[0]
    assert period in raw  # the model did emit the period, and more after it
    for captions in run_captions(stage, make_samples(False)).values():
        assert all("." not in c and len(c.split()) <= 2 for c in captions)  # "" only after 3 empty draws


def test_random_init_coca_is_seeded_and_fully_initialised(models):
    """open_clip leaves CoCa's decoder projection uninitialised (torch.empty): captions then depend on
    what the heap held. Random weights must be the same in every process, whatever ran before."""
    def dirty_heap(value):
        junk = [torch.full((256, 256), value) for _ in range(64)]
        del junk
    dirty_heap(1e30)
    first = load_open_clip(COCA, None)[0].state_dict()
    dirty_heap(-3e33)
    second = load_open_clip(COCA, None)[0].state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    for weights in (first, torch.load(models["coca_checkpoint"], weights_only=True)):
        projection = weights["text_decoder.text_projection"]
        assert torch.isfinite(projection).all() and 0.06 < float(projection.std()) < 0.25  # width 64: 0.125


def test_beam_search_returns_best_distinct_beams_deterministically(models):
    stage = captioner(models, generation="beam_search", num_beams=3, num_captions=2, max_length=7, min_length=3)
    batched = run_captions(stage, make_samples(False))
    assert run_captions(stage, make_samples(False)) == batched
    assert all(len(c) == 2 and all(c) for c in batched.values())
    # batch size 1 vs 3 in float64, where a row's logits do not move with the batch shape (see top-p)
    exact = {}
    for size in (3, 1):
        exact[size] = captioner(models, generation="beam_search", num_beams=3, num_captions=2, max_length=7,
                                min_length=3, batch_size=size)
        exact[size].model.double()
    assert run_captions(exact[1], make_samples(False)) == run_captions(exact[3], make_samples(False))

    # scores are the model's own length-normalised log-probabilities, best first
    images = torch.stack([stage._prepare(s) for s in make_samples(False)])
    latent, embs = stage._encode(images)
    for b, hyps in enumerate(stage.beam_search(latent, embs)):
        assert hyps[0][0] >= hyps[1][0] and hyps[0][1] != hyps[1][1]
        for score, ids in hyps:
            tokens = torch.tensor([[stage.sot] + ids])
            total = 0.0
            for t in range(1, tokens.shape[1] - 1):  # the final end token was forced at max_length
                logp = torch.log_softmax(stage._next_logits(latent[b:b + 1], embs[b:b + 1], tokens[:, :t]), -1)
                total += float(logp[0, tokens[0, t]].detach())
            assert score == pytest.approx(total / (tokens.shape[1] - 1), abs=1e-4)

    # one beam is greedy decoding: every chosen token is an argmax (ties may break either way)
    greedy = captioner(models, generation="beam_search", num_beams=1, num_captions=1, max_length=6, min_length=3)
    ids = greedy.beam_search(latent[:1], embs[:1])[0][0][1]
    tokens = torch.tensor([[greedy.sot]])
    for token in ids[:-1]:
        logits = greedy._next_logits(latent[:1], embs[:1], tokens)
        if tokens.shape[1] < 3:
            logits[:, greedy.eot] = float("-inf")
        assert float(logits[0, token]) >= float(logits.max()) - 1e-5
        tokens = torch.cat([tokens, torch.tensor([[token]])], 1)


def test_captioner_skips_bad_samples_only(models):
    samples = make_samples(False)
    samples[1]["image"] = samples[1]["image"].float()
    out = captioner(models, num_captions=1)(Batch(samples))
    assert [s["__key__"] for s in out.samples] == [KEYS[0], KEYS[2]]
    assert [(e.key, e.reason) for e in out.errors] == [(KEYS[1], "bad_image")]
    assert all("_caption_input" not in s for s in samples)


# ---------------------------------------------------------------------------------------------
# CLIP teachers

def by_hand(model, size: int, mean, std, views: torch.Tensor) -> torch.Tensor:
    """open_clip's embedding of views resized and normalised here, independently of the stage."""
    x = views
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return F.normalize(model.encode_image(x), dim=-1)


def text_by_hand(model_name: str, model, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(model.encode_text(open_clip.get_tokenizer(model_name)(texts)), dim=-1)


def test_clip_ensemble_matches_open_clip_per_teacher(models):
    specs = [OpenClipTeacherSpec(model=models["clip64"], batch_size=2), OpenClipTeacherSpec(model=CLIP48, batch_size=4)]
    stage = ClipTeacherEnsemble(specs, device="cpu")
    stage.setup()
    assert stage.dims() == [32, 24]
    assert stage.logit_scales() == pytest.approx([1 / 0.07, 100.0])  # own learned scale; random init -> 100
    recorded = stage.versions()["clip_teachers"]["teachers"]
    assert len(recorded[0]["checkpoint_sha256"]) == 64 and recorded[1]["weights"] == "random_init"
    json.dumps(stage.versions())  # goes into the task manifest
    samples = make_samples()
    views = {s["__key__"]: s["views"].clone() for s in samples}
    samples[0]["syn"] = {"syn_text": ["a cat", "a long caption " * 8], "syn_text_b": ["x"]}
    out = stage(Batch(samples))
    assert not out.errors and len(out.samples) == 3
    a, b = stage.teachers
    for s in out.samples:
        assert "views" not in s
        emb = s["image_emb"]
        assert emb.shape == (NUM_VIEWS, 56) and emb.dtype == torch.float32
        parts = emb.split([32, 24], dim=1)
        for part in parts:
            assert torch.allclose(part.norm(dim=1), torch.ones(NUM_VIEWS), atol=1e-5)
        v = views[s["__key__"]]
        assert torch.allclose(parts[0], by_hand(a.model, 64, list(a.mean), list(a.std), v),
                              atol=1e-5)
        assert torch.allclose(parts[1], by_hand(b.model, 48, list(b.mean), list(b.std), v),
                              atol=1e-5)
        # ground truth caption, each teacher with its own tokenizer (context 77 vs 16)
        expected = torch.cat([text_by_hand(models["clip64"], a.model, [s["caption"]]),
                              text_by_hand(CLIP48, b.model, [s["caption"]])], dim=1)
        assert s["text_emb"].shape == (1, 56) and torch.allclose(s["text_emb"], expected, atol=1e-5)
    syn = out.samples[0]["syn_emb"]
    assert {k: tuple(v.shape) for k, v in syn.items()} == {"syn_text": (2, 56), "syn_text_b": (1, 56)}
    assert torch.allclose(syn["syn_text"], stage.embed_texts(["a cat", "a long caption " * 8]), atol=1e-5)
    assert out.samples[1]["syn_emb"] == {}

    # concatenation follows teacher order
    flipped = ClipTeacherEnsemble(specs[::-1], device="cpu")
    flipped.setup()
    flipped.teachers[0].model.load_state_dict(b.model.state_dict())  # same random weights as above
    again = flipped(Batch([{**make_samples()[0]}]))
    assert torch.allclose(again.samples[0]["image_emb"],
                          torch.cat(out.samples[0]["image_emb"].split([32, 24], 1)[::-1], 1), atol=1e-5)


def test_missing_caption_is_skipped_unless_not_required(models):
    samples = make_samples()
    del samples[0]["caption"]
    samples[1]["caption"] = "  "
    stage = ClipTeacherEnsemble([OpenClipTeacherSpec(model=models["clip64"])], device="cpu")
    out = stage(Batch(samples))
    assert [e.reason for e in out.errors] == ["missing_caption", "missing_caption"]
    assert [s["__key__"] for s in out.samples] == [KEYS[2]]
    lenient = ClipTeacherEnsemble([OpenClipTeacherSpec(model=models["clip64"])], device="cpu", require_caption=False)
    sample = make_samples()[0]
    del sample["caption"]
    out = lenient(Batch([sample]))
    assert not out.errors and out.samples[0]["text_emb"].shape == (0, 32)


def test_clip_ensemble_isolates_a_bad_sample(models):
    """Views that pass the checks but break the batch (zero height) cost only their sample; the others
    are embedded as in a batch without it."""
    stage = ClipTeacherEnsemble([OpenClipTeacherSpec(model=models["clip64"])], device="cpu")
    alone = stage(Batch([s for s in make_samples() if s["__key__"] != KEYS[1]]))
    samples = make_samples()
    samples[1]["views"] = torch.rand(2, 3, 0, 64)
    out = stage(Batch(samples))
    assert [s["__key__"] for s in out.samples] == [KEYS[0], KEYS[2]]
    assert [(e.key, e.stage) for e in out.errors] == [(KEYS[1], "clip_teachers")]
    for got, want in zip(out.samples, alone.samples):
        assert torch.allclose(got["image_emb"], want["image_emb"], atol=1e-5)
        assert torch.allclose(got["text_emb"], want["text_emb"], atol=1e-5)


def test_clip_teacher_info_reads_configs_only(models, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("clip_teacher_info must not load weights")
    monkeypatch.setattr(torch, "load", no_weights)
    monkeypatch.setattr(open_clip, "create_model", no_weights)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", no_weights)
    info = clip_teacher_info(OpenClipTeacherSpec(model=CLIP48, logit_scale=50.0))
    assert (info["image_size"], info["embed_dim"], info["logit_scale"]) == (48, 24, 50.0)
    assert info["mean"] == pytest.approx(list(open_clip.OPENAI_DATASET_MEAN))
    info = clip_teacher_info(OpenClipTeacherSpec(model=models["clip64"]))
    assert (info["image_size"], info["embed_dim"]) == (64, 32) and "logit_scale" not in info
    info = clip_teacher_info(OpenClipTeacherSpec(model="ViT-L-14", pretrained="openai"))  # built-in + tag, no download
    assert (info["image_size"], info["embed_dim"], info["quick_gelu"]) == (224, 768, True)
    with pytest.raises(ValueError, match="unknown open_clip model"):
        clip_teacher_info(OpenClipTeacherSpec(model="no-such-model"))
    with pytest.raises(ValueError, match="neither a known tag"):
        clip_teacher_info(OpenClipTeacherSpec(model=CLIP48, pretrained="no_such_tag"))
    with pytest.raises(FileNotFoundError):
        clip_teacher_info(OpenClipTeacherSpec(model=CLIP48, pretrained="/nonexistent/weights.pt"))
    with pytest.raises(ValueError, match="leave pretrained empty"):
        clip_teacher_info(OpenClipTeacherSpec(model=models["clip64"], pretrained="openai"))
