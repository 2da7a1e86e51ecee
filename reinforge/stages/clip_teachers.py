"""CLIP teacher ensemble for multi-modal reinforcement (DataCompDR / DFNDR, FORMATS §2).

Every teacher embeds the N shared augmentation views of an image (resized to its own input size,
normalised with its own mean/std) and every caption (with its own tokenizer). Each teacher's
embeddings are L2-normalised on their own and concatenated in teacher order; the concatenation is
not renormalised. One actor holds the whole ensemble, so views are moved to the device once.

Weights come from open_clip names only: a pretrained tag, an `hf-hub:` id, a `local-dir:` model
folder, or a local checkpoint file (`pkg:` paths allowed). Files are always loaded with
torch.load(weights_only=True): never unpickle arbitrary objects.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from reinforge.models.specs import ClipTeacherSpec
from reinforge.stages.base import Batch, SkipSample, Stage, run_isolated, sample_error
from reinforge.stages.teachers import resolve_checkpoint

__all__ = ["ClipTeacherSpec", "ClipTeacherEnsemble", "clip_teacher_info", "fit_views", "init_coca_decoder",
           "load_open_clip", "trainer_open_clip_args"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RANDOM_INIT_LOGIT_SCALE = 100.0  # what the DataCompDR trainer uses; a random model has no learned scale


# ---------------------------------------------------------------------------------------------
# Resolving open_clip model names, shared with the CoCa captioner.

@dataclass
class OpenClipSource:
    """How one (model, pretrained) pair of a recipe maps onto open_clip.create_model's arguments."""
    model: str                      # recipe's model name, as given
    pretrained: str | None          # recipe's pretrained value, as given
    model_name: str                 # open_clip model_name (may carry an hf-hub: / local-dir: schema)
    create_pretrained: str | None   # open_clip `pretrained`: a tag or a local file, None with a schema
    checkpoint: str | None = None   # local weights file (sha256 recorded); None for tags until loaded
    tag_cfg: dict = field(default_factory=dict)  # open_clip's pretrained cfg of a tag (mean/std, quick_gelu)

    @property
    def random_init(self) -> bool:
        schema = _schema(self.model_name)
        if schema == "local-dir":
            return self.checkpoint is None
        return schema is None and self.create_pretrained is None


def _schema(name: str) -> str | None:
    import open_clip.factory as factory
    return factory.parse_model_name(name)[0]


def _looks_like_path(value: str) -> bool:
    return (value.startswith(("pkg:", "/", "./", "../", "~")) or os.sep in value
            or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".npz")))


def resolve_source(model: str, pretrained: str | None) -> OpenClipSource:
    """Check a (model, pretrained) pair and resolve it without reading any weights."""
    import open_clip
    import open_clip.factory as factory
    schema = _schema(model)
    if schema is not None:
        if pretrained:
            # open_clip would silently ignore it; a user who set it expects it to matter
            raise ValueError(f"model {model!r} names its own weights ({schema}:); leave pretrained empty")
        checkpoint = None
        if schema == "local-dir":
            folder = Path(model[len("local-dir:"):])
            if not (folder / "open_clip_config.json").is_file():
                raise FileNotFoundError(f"{model}: no open_clip_config.json in {folder}")
            checkpoint = factory._find_checkpoint_in_dir(folder)  # the file open_clip will load
        return OpenClipSource(model, pretrained, model, None, checkpoint)
    if open_clip.get_model_config(model) is None:
        raise ValueError(f"unknown open_clip model {model!r}: not a built-in or registered config "
                         f"(open_clip.add_model_config), nor an hf-hub: / local-dir: name")
    if not pretrained:
        return OpenClipSource(model, pretrained, model, None)
    if pretrained.startswith("hf-hub:"):
        # the hub repo carries config and weights; open_clip takes it as the model name
        return OpenClipSource(model, pretrained, pretrained, None)
    path = os.path.expanduser(resolve_checkpoint(pretrained))
    if os.path.isfile(path):
        return OpenClipSource(model, pretrained, model, path, checkpoint=path)
    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if tag_cfg:
        return OpenClipSource(model, pretrained, model, pretrained, tag_cfg=dict(tag_cfg))
    if _looks_like_path(pretrained):
        raise FileNotFoundError(f"pretrained checkpoint {pretrained!r} not found ({path})")
    known = open_clip.list_pretrained_tags_by_model(model)
    raise ValueError(f"pretrained {pretrained!r} is neither a known tag of {model} {known} nor a checkpoint file")


def trainer_open_clip_args(src: OpenClipSource) -> dict:
    """{"model_name", "pretrained"} with which open_clip.create_model rebuilds this teacher in another
    process: the MobileCLIP trainer's --distill-model / --distill-pretrained (one comma-joined pair per
    teacher). hf-hub: and local-dir: names carry their own weights, so pretrained is "" (the pinned
    open_clip of Apple's patch raises on any other value for hf-hub:; local-dir: needs open_clip >= 3.0);
    a checkpoint is an absolute path (the trainer runs elsewhere); a QuickGELU tag (ViT-L-14 openai)
    names open_clip's -quickgelu config, since the trainer does not force QuickGELU on its teacher.
    Random init gives "": open_clip then builds the architecture with fresh random weights."""
    schema = _schema(src.model_name)
    if schema == "local-dir":
        return {"model_name": "local-dir:" + os.path.abspath(src.model_name[len("local-dir:"):]), "pretrained": ""}
    if schema is not None:
        return {"model_name": src.model_name, "pretrained": ""}
    if src.checkpoint:
        return {"model_name": src.model_name, "pretrained": os.path.abspath(src.checkpoint)}
    if src.tag_cfg:
        return {"model_name": _quick_gelu_name(src), "pretrained": src.create_pretrained}
    return {"model_name": src.model_name, "pretrained": ""}


def _quick_gelu_name(src: OpenClipSource) -> str:
    """The open_clip config name that builds a tag's activation without force_quick_gelu."""
    import open_clip
    if not src.tag_cfg.get("quick_gelu") or open_clip.get_model_config(src.model_name).get("quick_gelu"):
        return src.model_name
    variant = f"{src.model_name}-quickgelu"
    if open_clip.get_model_config(variant) and open_clip.get_pretrained_cfg(variant, src.create_pretrained):
        return variant
    return src.model_name  # no such config: the trainer's open_clip only warns about the mismatch


def _model_and_preprocess_cfg(src: OpenClipSource) -> tuple[dict, dict]:
    """The architecture config and preprocessing config open_clip will use, from config files only."""
    from dataclasses import asdict

    import open_clip.factory as factory
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict
    preprocess = asdict(PreprocessCfg())
    schema = _schema(src.model_name)
    if schema == "local-dir":
        with open(Path(src.model_name[len("local-dir:"):]) / "open_clip_config.json", encoding="utf-8") as f:
            config = json.load(f)
    elif schema == "hf-hub":
        try:  # reads the Hugging Face cache only when HF_HUB_OFFLINE=1
            config = factory._get_hf_config(src.model_name[len("hf-hub:"):])
        except Exception as exc:  # noqa: BLE001 - hub/cache errors come in many types
            raise ValueError(f"{src.model_name}: its open_clip_config.json is not available "
                             f"({type(exc).__name__}); with no network it must be in the Hugging Face "
                             f"cache, or use a local-dir: copy of the repo") from None
    else:
        config = {"model_cfg": factory.get_model_config(src.model_name)}
    model_cfg = config.get("model_cfg", config)
    preprocess = merge_preprocess_dict(preprocess, config.get("preprocess_cfg", {}))
    preprocess = merge_preprocess_dict(preprocess, src.tag_cfg)
    return model_cfg, preprocess


def _square_size(size) -> int:
    if isinstance(size, (list, tuple)):
        return int(max(size))
    return int(size)


def clip_teacher_info(spec: ClipTeacherSpec) -> dict:
    """image_size (int; the larger side if not square), embed_dim, mean, std of a teacher and the
    open_clip arguments a trainer rebuilds it with (trainer_open_clip_args), from its config files only
    (no weights are read). Raises ValueError / FileNotFoundError naming the problem."""
    src = resolve_source(spec.model, spec.pretrained)
    model_cfg, preprocess = _model_and_preprocess_cfg(src)
    if not model_cfg or "vision_cfg" not in model_cfg or "embed_dim" not in model_cfg:
        raise ValueError(f"{spec.model}: not an open_clip image-text model config")
    size = model_cfg["vision_cfg"].get("image_size", preprocess["size"])
    info = {"image_size": _square_size(size), "embed_dim": int(model_cfg["embed_dim"]),
            "mean": [float(x) for x in preprocess["mean"]], "std": [float(x) for x in preprocess["std"]],
            "quick_gelu": bool(model_cfg.get("quick_gelu") or src.tag_cfg.get("quick_gelu"))}
    if spec.logit_scale is not None:
        info["logit_scale"] = float(spec.logit_scale)
    info["open_clip"] = trainer_open_clip_args(src)
    return info


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _downloaded_checkpoint(src: OpenClipSource) -> str | None:
    """The cached weights file of a tag / hub repo once open_clip has fetched it (no new download)."""
    try:
        import open_clip
        if src.tag_cfg:
            return open_clip.download_pretrained(src.tag_cfg) or None
        if _schema(src.model_name) == "hf-hub":
            from open_clip.pretrained import download_pretrained_from_hf
            return download_pretrained_from_hf(src.model_name[len("hf-hub:"):])
    except Exception:  # noqa: BLE001 - the hash is a record, not a requirement
        return None
    return None


def init_coca_decoder(model: torch.nn.Module) -> None:
    """open_clip (3.3) builds CoCa's text-decoder projection with torch.empty and never initialises
    it (the decoder's own init_parameters() is never called, and fails if called): a CoCa created
    without weights holds whatever the heap held there (logits up to 1e38, captions that change from
    process to process). Initialise it as that init_parameters() intends. Call on every CoCa made with
    random weights before using or saving it."""
    projection = getattr(getattr(model, "text_decoder", None), "text_projection", None)
    if isinstance(projection, torch.nn.Parameter):
        with torch.no_grad():
            torch.nn.init.normal_(projection, std=model.text_decoder.width ** -0.5)


def load_open_clip(model: str, pretrained: str | None, device: str | torch.device = "cpu"):
    """(model in eval mode, eval preprocess, tokenizer, version dict, source) for one open_clip model."""
    import open_clip
    src = resolve_source(model, pretrained)
    # open_clip 3.x only warns when a tag was trained with QuickGELU (e.g. ViT-L-14 `openai`) but the
    # config uses GELU; the embeddings would be silently wrong, so follow the tag.
    quick_gelu = bool(src.tag_cfg.get("quick_gelu"))
    # Random weights are seeded by the model name, so every worker builds the same model; the global
    # RNG is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int.from_bytes(hashlib.blake2b(model.encode(), digest_size=8).digest(), "big"))
        net, _, preprocess = open_clip.create_model_and_transforms(
            src.model_name, pretrained=src.create_pretrained, device=device, force_quick_gelu=quick_gelu,
            weights_only=True)
        if src.random_init:
            init_coca_decoder(net)
    tokenizer = open_clip.get_tokenizer(src.model_name)
    version = {"model": model, "pretrained": pretrained, "open_clip": open_clip.__version__,
               "weights": "random_init" if src.random_init else "loaded"}
    if quick_gelu:
        version["quick_gelu"] = True
    checkpoint = src.checkpoint or _downloaded_checkpoint(src)
    if checkpoint and os.path.isfile(checkpoint):
        version["checkpoint_sha256"] = sha256_file(checkpoint)
    return net.eval(), preprocess, tokenizer, version, src


def autocast(device: str | torch.device, precision: str):
    if precision == "float32":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_DTYPES[precision])


# ---------------------------------------------------------------------------------------------
# The ensemble.

def fit_views(views: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Views [N, 3, h, w] in [0, 1] at a teacher's input size (H, W): unchanged when equal, else
    resized (bicubic, antialias) to cover it and center-cropped, as open_clip's eval transform does
    (a plain resize for square views and a square teacher). Clamped to [0, 1]: bicubic overshoots,
    where the PIL pipeline the teacher was trained with would saturate."""
    h, w = views.shape[-2:]
    H, W = size
    if (h, w) == (H, W):
        return views
    scale = max(H / h, W / w)
    rh, rw = max(H, round(h * scale)), max(W, round(w * scale))
    x = F.interpolate(views, size=(rh, rw), mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
    top, left = int(round((rh - H) / 2.0)), int(round((rw - W) / 2.0))  # torchvision center_crop
    return x[..., top:top + H, left:left + W]


@dataclass
class _Teacher:
    spec: ClipTeacherSpec
    model: torch.nn.Module
    tokenizer: Callable
    size: tuple[int, int]
    mean: torch.Tensor   # [1, 3, 1, 1] on the device
    std: torch.Tensor
    dim: int
    logit_scale: float
    version: dict


class ClipTeacherEnsemble(Stage):
    """Adds image_emb [N, D], text_emb [1, D] ([0, D] without a caption when require_caption=False)
    and syn_emb {syn_key: [S, D]} (float32, CPU) to each sample and drops its views."""

    name = "clip_teachers"
    is_model = True

    def __init__(self, specs: list[ClipTeacherSpec], device: str | None = None, require_caption: bool = True):
        if not specs:
            raise ValueError("ClipTeacherEnsemble needs at least one teacher")
        self.specs = list(specs)
        self.device = device
        self.require_caption = require_caption
        self.teachers: list[_Teacher] = []

    def setup(self) -> None:
        if self.teachers:  # idempotent
            return
        import open_clip
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        for spec in self.specs:
            info = clip_teacher_info(spec)
            model, _, tokenizer, version, src = load_open_clip(spec.model, spec.pretrained, self.device)
            cfg = open_clip.get_model_preprocess_cfg(model)
            size = cfg["size"] if isinstance(cfg["size"], (list, tuple)) else (cfg["size"], cfg["size"])
            if spec.logit_scale is not None:
                scale = float(spec.logit_scale)
            elif src.random_init:
                scale = RANDOM_INIT_LOGIT_SCALE
            else:
                scale = float(model.logit_scale.detach().float().exp().reshape(-1)[0])
            version.update(embed_dim=info["embed_dim"], image_size=list(size), mean=list(cfg["mean"]),
                           std=list(cfg["std"]), logit_scale=scale, precision=spec.precision)
            self.teachers.append(_Teacher(
                spec, model, tokenizer, (int(size[0]), int(size[1])),
                torch.tensor(cfg["mean"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1),
                torch.tensor(cfg["std"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1),
                info["embed_dim"], scale, version))

    def dims(self) -> list[int]:
        return [t.dim for t in self.teachers]

    def logit_scales(self) -> list[float]:
        return [t.logit_scale for t in self.teachers]

    def versions(self) -> dict:
        # one top-level key: the executor merges every stage's dict into the manifest
        return {"clip_teachers": {"teachers": [t.version for t in self.teachers], "device": str(self.device)}}

    # -- encoding ------------------------------------------------------------------------------

    def _chunks(self, teacher: _Teacher, x: torch.Tensor, encode: Callable) -> torch.Tensor:
        """Encode in chunks of the teacher's batch size; L2-normalise in float32 on their own."""
        out = []
        for start in range(0, x.shape[0], teacher.spec.batch_size):
            with autocast(self.device, teacher.spec.precision):
                features = encode(x[start:start + teacher.spec.batch_size])
            out.append(F.normalize(features.float(), dim=-1))
        if not out:
            return torch.zeros(0, teacher.dim, device=self.device)
        emb = torch.cat(out)
        if emb.shape[-1] != teacher.dim:
            raise RuntimeError(f"teacher {teacher.spec.model}: embeddings of dim {emb.shape[-1]}, "
                               f"its config says {teacher.dim}")
        return emb

    @torch.inference_mode()
    def embed_views(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per image, its views [N_i, 3, h, w] in [0, 1] -> [N_i, D_total] float32 on the CPU."""
        views = [v.to(self.device, torch.float32, non_blocking=True) for v in views]
        per_teacher = []
        for t in self.teachers:
            x = torch.cat([fit_views(v, t.size) for v in views])
            x = (x - t.mean) / t.std
            per_teacher.append(self._chunks(t, x, lambda chunk, m=t.model: m.encode_image(chunk, normalize=False)))
        emb = torch.cat(per_teacher, dim=-1).cpu()
        return list(emb.split([v.shape[0] for v in views]))

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Captions -> [len(texts), D_total] float32 on the CPU, each teacher with its own tokenizer."""
        per_teacher = []
        for t in self.teachers:
            tokens = t.tokenizer(texts) if texts else torch.zeros(0, 1, dtype=torch.long)
            tokens = tokens.to(self.device)
            per_teacher.append(self._chunks(t, tokens, lambda chunk, m=t.model: m.encode_text(chunk, normalize=False)))
        return torch.cat(per_teacher, dim=-1).cpu()

    def _check(self, sample: dict) -> None:
        views = sample.get("views")
        if not (isinstance(views, torch.Tensor) and views.ndim == 4 and views.shape[1] == 3
                and views.is_floating_point() and views.shape[0] > 0):
            got = f"{getattr(views, 'dtype', type(views).__name__)} {tuple(getattr(views, 'shape', ()))}"
            raise SkipSample("bad_views", f"views must be a float [N, 3, h, w] tensor, got {got}")
        caption = sample.get("caption")
        if caption is not None and not isinstance(caption, str):
            raise SkipSample("bad_caption", f"caption must be a str, got {type(caption).__name__}")
        if self.require_caption and not (caption or "").strip():
            raise SkipSample("missing_caption", "no ground-truth caption to embed")
        syn = sample.get("syn") or {}
        if not (isinstance(syn, dict) and all(isinstance(v, list) and all(isinstance(c, str) for c in v)
                                              for v in syn.values())):
            raise SkipSample("bad_synthetic_captions", "syn must map keys to lists of strings")

    def _embed(self, samples: list[dict]) -> list[dict]:
        image_emb = self.embed_views([s["views"] for s in samples])
        # every caption of the batch in one pass per teacher: ground truth first, then syn lists in order
        texts, layout = [], []
        for s in samples:
            caption = (s.get("caption") or "").strip()
            parts = [("text_emb", [caption] if caption else [])]
            parts += [(key, captions) for key, captions in (s.get("syn") or {}).items()]
            layout.append([(name, len(items)) for name, items in parts])
            texts += [text for _, items in parts for text in items]
        text_emb = self.embed_texts(texts)
        results, offset = [], 0
        for emb, parts in zip(image_emb, layout):
            out = {"image_emb": emb, "syn_emb": {}}
            for name, count in parts:
                rows = text_emb[offset:offset + count]
                offset += count
                if name == "text_emb":
                    out["text_emb"] = rows
                else:
                    out["syn_emb"][name] = rows
            results.append(out)
        return results

    def __call__(self, batch: Batch) -> Batch:
        if not batch.samples:
            return batch
        self.setup()
        valid, errors = [], list(batch.errors)
        for sample in batch.samples:
            try:
                self._check(sample)
                valid.append(sample)
            except SkipSample as exc:
                errors.append(sample_error(sample, self.name, exc))
        kept, failed = run_isolated(self.name, valid, self._embed) if valid else ([], [])
        for sample, result in kept:
            sample.pop("views")  # the views are only teacher inputs; replay rebuilds them from the entries
            sample.update(result)
        return Batch([sample for sample, _ in kept], errors + failed)
