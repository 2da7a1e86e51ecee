"""open_clip models: CLIP teachers (image and text towers) and CoCa captioners.

Weights come from open_clip names only: a pretrained tag, an `hf-hub:` id, a `local-dir:` model
folder, or a local checkpoint file (`pkg:` paths allowed). Files are always loaded with
torch.load(weights_only=True): never unpickle arbitrary objects. Random weights are seeded by the
model name, so every worker builds the same model.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from reinforge.models.specs import CaptionerSpec, OpenClipTeacherSpec
from reinforge.models.teacher import LoadedTeacher
from reinforge.models.timm import resolve_checkpoint

RANDOM_INIT_LOGIT_SCALE = 100.0  # what the DataCompDR trainer uses; a random model has no learned scale


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


def clip_teacher_info(spec: OpenClipTeacherSpec) -> dict:
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


def load_clip_teacher(spec: OpenClipTeacherSpec, device: str, precision: str, *, pooled: bool = False,
                      image_size: Optional[int] = None) -> LoadedTeacher:
    """A CLIP teacher: images() and texts() give unnormalised embeddings. Its input size, mean and std
    are the model's own preprocessing config (pooled and image_size do not apply: a CLIP model has one
    input size and no classifier head)."""
    import open_clip
    info = clip_teacher_info(spec)  # a config problem fails here, before any weights are read
    model, _, tokenizer, version, src = load_open_clip(spec.model, spec.pretrained, device)
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"] if isinstance(cfg["size"], (list, tuple)) else (cfg["size"], cfg["size"])
    if spec.logit_scale is not None:
        scale = float(spec.logit_scale)
    elif src.random_init:
        scale = RANDOM_INIT_LOGIT_SCALE
    else:
        scale = float(model.logit_scale.detach().float().exp().reshape(-1)[0])
    return LoadedTeacher(spec, model, device, precision, (int(size[0]), int(size[1])), tuple(cfg["mean"]),
                         tuple(cfg["std"]), info["embed_dim"], version,
                         encode_image=partial(model.encode_image, normalize=False),
                         encode_text=partial(model.encode_text, normalize=False),
                         tokenizer=tokenizer, logit_scale=scale)


def load_coca(spec: CaptionerSpec, device: str):
    """(CoCa model in eval mode, its eval preprocess, tokenizer, version dict) of a captioner; refuses
    other models, tokenizers our decoding cannot read, and a max_length beyond the context."""
    import open_clip
    model, preprocess, tokenizer, version, _ = load_open_clip(spec.model, spec.pretrained, device)
    if not isinstance(model, open_clip.CoCa):
        raise ValueError(f"captioner {spec.model!r} is a {type(model).__name__}, not an open_clip CoCa model")
    if not hasattr(tokenizer, "eot_token_id"):
        raise ValueError(f"captioner {spec.model!r}: only the CLIP BPE tokenizer is supported for decoding, "
                         f"got {type(tokenizer).__name__}")
    limit = min(model.text.context_length, model.text_decoder.context_length)
    if spec.max_length > limit:
        raise ValueError(f"captioner {spec.syn_key}: max_length {spec.max_length} exceeds the "
                         f"model's context length {limit}")
    return model, preprocess, tokenizer, version
