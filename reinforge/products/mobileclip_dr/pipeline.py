"""MobileCLIP multi-modal reinforcement (DataCompDR / DFNDR, FORMATS §2): CoCa captioners write
synthetic captions, a CLIP teacher ensemble embeds N replayable augmentations of each image and
every caption; shards keep jpg + txt so they train as written."""
from __future__ import annotations

import json

from reinforge.formats.augment import Augmenter
from reinforge.formats.limits import Limits
from reinforge.formats.recipe import ConfigError
from reinforge.formats.sources import WebDatasetSource
from reinforge.io.manifest import RunLayout
from reinforge.io.storage import write_bytes
from reinforge.products.mobileclip_dr.encode import EncodeDataCompDR
from reinforge.products.mobileclip_dr.recipe import MobileCLIPRecipe
from reinforge.runtime.pipeline import Pipeline
from reinforge.stages.augment import Augment
from reinforge.stages.base import Stage
from reinforge.stages.decode import DecodeImage
from reinforge.stages.text import ParseCaption, ParseUID, ReadSynCaptions


def check_teachers(recipe: MobileCLIPRecipe) -> list[dict]:
    """Config-time checks that need the teachers' model configs (no weights are loaded)."""
    from reinforge.models.open_clip import clip_teacher_info
    crop = Augmenter(recipe.augmentation.image_augmentation).output_size
    infos = []
    for i, spec in enumerate(recipe.teachers):
        try:
            info = clip_teacher_info(spec)
        except Exception as exc:  # noqa: BLE001 - unknown model names etc. become one clear line
            raise ConfigError(f"config error: teachers.{i}.model: {exc}") from None
        if crop is not None and info["image_size"] > min(crop):
            raise ConfigError(
                f"config error: teachers.{i}: input size {info['image_size']} exceeds the augmentation crop "
                f"{crop[0]}x{crop[1]}; upsampling would invent detail: raise random_resized_crop.size")
        infos.append(info)
    return infos


class MobileCLIPPipeline(Pipeline):
    def __init__(self, recipe: MobileCLIPRecipe):
        self.recipe = recipe
        self.source = WebDatasetSource(recipe.input.path, Limits.for_images(recipe.input.max_image_pixels))
        self.teacher_info = check_teachers(recipe) if recipe.mode != "captions" else []

    def samples_per_batch(self) -> int:
        return self.recipe.augmentation.samples_per_batch

    def storage(self):
        from reinforge.formats.datacomp_dr import StorageSpec
        s = self.recipe.storage
        return StorageSpec(format=s.format, dtype=s.dtype, layout=s.layout, codec=s.codec,
                           codec_params=dict(s.codec_params) or None)

    def build_stages(self) -> list[Stage]:
        r = self.recipe
        threads = max(1, int(r.resources.cpus_per_actor))
        stages: list[Stage] = [DecodeImage(r.input.max_image_pixels, threads), ParseUID(),
                               ParseCaption(r.caption_member, threads)]
        if r.mode == "embeddings":
            stages.append(ReadSynCaptions())
        else:
            from reinforge.stages.captioner import CocaCaptioner
            for spec in r.captioners:
                captioner = CocaCaptioner(spec, r.seed)
                captioner.name = f"captioner_{spec.syn_key}"
                stages.append(captioner)
        if r.mode != "captions":
            from reinforge.stages.clip_teachers import ClipTeacherEnsemble
            stages += [Augment(r.augmentation.image_augmentation, r.augmentation.num_samples, r.seed, threads,
                               r.augmentation.backend),
                       ClipTeacherEnsemble(r.teachers)]
        stages.append(EncodeDataCompDR(self.storage(), r.keep_images, with_embeddings=r.mode != "captions"))
        return stages

    def sample_checker(self, layout: RunLayout):
        """validate: layout and shapes (N, S, D), unit-norm teacher slices, sha256 and crop bounds."""
        if self.recipe.mode == "captions":
            return None
        import numpy as np

        from reinforge.formats.datacomp_dr import decode_dr_sample
        from reinforge.formats.datacomp_dr_replay import check_replayable
        augmenter = Augmenter(self.recipe.augmentation.image_augmentation, self.recipe.augmentation.backend)
        dims = [info["embed_dim"] for info in self.teacher_info]
        n = self.recipe.augmentation.num_samples
        limits = self.output_limits(layout)

        def check(members: dict) -> None:
            sample = decode_dr_sample(members, limits)
            if len(sample.entries) != n or sample.image_emb.shape[1] != sum(dims):
                raise ValueError(f"image_emb {sample.image_emb.shape}, expected ({n}, {sum(dims)})")
            start = 0
            for dim in dims:  # each teacher's slice is unit-norm on its own
                norms = np.linalg.norm(sample.image_emb[:, start:start + dim], axis=1)
                if not np.allclose(norms, 1, atol=1e-2):
                    raise ValueError(f"teacher slice [{start}:{start + dim}] is not unit-norm")
                start += dim
            if sample.image is not None:
                check_replayable(sample, sample.image, augmenter)

        return check

    def prepare(self, layout: RunLayout) -> None:
        if self.recipe.mode == "captions":
            return
        from reinforge.formats.dr_trainer_config import dr_trainer_config
        r = self.recipe
        config = dr_trainer_config(
            image_augmentation=Augmenter(r.augmentation.image_augmentation).config(),
            num_samples=r.augmentation.num_samples,
            teachers=[{**t.model_dump(mode="json"), "dim": info["embed_dim"], "image_size": info["image_size"],
                       "mean": info["mean"], "std": info["std"], "open_clip": info["open_clip"],
                       "logit_scale": t.logit_scale or info.get("logit_scale", 100.0)}
                      for t, info in zip(r.teachers, self.teacher_info)],
            replay_backend=r.augmentation.backend)
        config["storage"] = r.storage.model_dump(mode="json")
        config["captioners"] = [c.model_dump(mode="json") for c in r.captioners]
        write_bytes(layout.dr_config, json.dumps(config, indent=1, sort_keys=True).encode())
