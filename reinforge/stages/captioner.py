"""Synthetic captions from an open_clip CoCa model (DataCompDR: coca_ViT-L-14, top-p 0.9, 5 captions).

Top-p sampling is our own loop on top of the CoCa model rather than `model.generate`, which draws
from the global RNG: caption c of sample k uses a torch.Generator seeded by (run seed, key, c, ...),
so no row's draws depend on the other rows of its batch. Each row draws one uniform per step from
its generator and picks the token by inverse CDF over the top-p nucleus (the same distribution as
torch.multinomial), vectorised over rows.

What this guarantees: a rerun of the same recipe (batch sizes are part of it, hence of the digest) on
the same hardware gives identical captions, whichever worker runs the task. Changing `batch_size`
keeps the seeds but not always the text: float32 matmuls are not batch-invariant (a row's logits move
by ~1e-7 with the batch shape), and where the next-token distribution is flat an inverse-CDF draw
that lands that close to a boundary picks the neighbouring token. Exact-arithmetic independence of
batching is tested in float64, where that noise is ~1e-16. Beam search is deterministic; ours returns the
`num_captions` best distinct beams (open_clip's returns one).

Lengths follow open_clip's generate(seq_len=max_length, min_seq_len=min_length): they count the
start token, the end token cannot be drawn before min_length tokens, and a row is ended at
max_length. Text: special tokens stripped, cut at the end token and at the first period
(FORMATS §2), whitespace stripped. A sampled caption that is empty after cleaning (e.g. it began
with a period) is drawn again from the next generator stream, up to EMPTY_RETRIES times, then
kept as "" so every sample has exactly num_captions captions (syn_emb rows line up with them).
"""
from __future__ import annotations

import torch
from PIL import Image

from reinforge.formats.seeds import entry_seed
from reinforge.models.open_clip import load_coca
from reinforge.models.precision import autocast
from reinforge.models.specs import CaptionerSpec
from reinforge.stages.base import Batch, SkipSample, Stage, run_isolated, sample_error

EMPTY_RETRIES = 3


def clean_caption(tokens: list[int], tokenizer) -> str:
    """Generated ids (without the start token) -> text: cut at the end token, drop special tokens,
    cut at the first period, strip."""
    eot = tokenizer.eot_token_id
    if eot in tokens:
        tokens = tokens[:tokens.index(eot)]
    special = set(tokenizer.all_special_ids)
    text = tokenizer.decode([t for t in tokens if t not in special and t in tokenizer.decoder])
    return text.split(".", 1)[0].strip()


class CocaCaptioner(Stage):
    """Writes sample["syn"][spec.syn_key] = [num_captions captions] from sample["image"]."""

    name = "captioner"
    is_model = True

    def __init__(self, spec: CaptionerSpec, seed: int, device: str | None = None):
        # lengths and beams were checked when the spec was validated (CaptionerSpec)
        self.spec = spec
        self.seed = seed
        self.device = device
        self.model = None
        self._version: dict = {}

    def setup(self) -> None:
        if self.model is not None:  # idempotent
            return
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.preprocess, self.tokenizer, self._version = load_coca(self.spec, self.device)
        self.sot, self.eot = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id
        self._version.update(generation=self.spec.generation, precision=self.spec.precision)

    def versions(self) -> dict:
        # keyed by syn key: the executor merges every stage's dict, and a run may hold several captioners
        return {f"captioner_{self.spec.syn_key}": {**self._version, "syn_key": self.spec.syn_key,
                                                   "device": str(self.device)}}

    # -- model steps ---------------------------------------------------------------------------

    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = next(self.model.parameters()).dtype  # float32, or float64 in the batching test
        with autocast(self.device, self.spec.precision):
            out = self.model(images.to(self.device, dtype))
        return out["image_features"], out["image_embs"]

    def _next_logits(self, latent: torch.Tensor, embs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Float32 logits of the next token for each row [R, V]. No KV cache in open_clip's CoCa:
        the prefix is recomputed each step (fine at 30 tokens)."""
        with autocast(self.device, self.spec.precision):
            logits = self.model(None, tokens, image_latent=latent, image_embs=embs, output_labels=False)["logits"]
        return logits[:, -1].float()

    def _pick(self, logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """One token per row: temperature, top-p nucleus (smallest set of mass >= top_p, at least one
        token), then the token whose CDF interval holds the row's own uniform draw."""
        probs = torch.softmax(logits / self.spec.temperature, dim=-1).double()
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)  # stable: ties break the same everywhere
        mass_before = sorted_p.cumsum(-1) - sorted_p
        sorted_p = sorted_p * (mass_before < self.spec.top_p)
        cdf = sorted_p.cumsum(-1)
        # the uniforms come from CPU generators, so the draws are the same on every device
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators]).to(cdf.device)
        index = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True)
        index = index.clamp_(max=cdf.shape[1] - 1)
        return order.gather(1, index).squeeze(1)

    @torch.inference_mode()
    def sample_rows(self, latent: torch.Tensor, embs: torch.Tensor,
                    generators: list[torch.Generator]) -> list[list[int]]:
        """Top-p sampling for R rows (image features already repeated per row) -> generated ids per row
        (without the start token, ending with the end token). Row r only ever reads its own generator,
        and only while it is running, so its tokens do not depend on the other rows."""
        rows = len(generators)
        tokens = torch.full((rows, 1), self.sot, dtype=torch.long, device=embs.device)
        running = torch.ones(rows, dtype=torch.bool)
        while bool(running.any()) and tokens.shape[1] < self.spec.max_length:
            active = running.nonzero().squeeze(1)
            nxt = torch.full((rows,), self.eot, dtype=torch.long, device=embs.device)  # ended rows: padding
            if tokens.shape[1] + 1 < self.spec.max_length:  # the last slot is always the end token
                idx = active.to(embs.device)
                logits = self._next_logits(latent[idx], embs[idx], tokens[idx])
                if tokens.shape[1] < self.spec.min_length:
                    logits[:, self.eot] = float("-inf")
                nxt[idx] = self._pick(logits, [generators[i] for i in active.tolist()])
            tokens = torch.cat([tokens, nxt.unsqueeze(1)], dim=1)
            running &= (nxt != self.eot).cpu()
        return [row[1:] for row in tokens.tolist()]

    @torch.inference_mode()
    def beam_search(self, latent: torch.Tensor, embs: torch.Tensor) -> list[list[tuple[float, list[int]]]]:
        """Beam search per image (features [B, ...]) -> the num_captions best finished beams per image,
        best first, as (score, generated ids ending with the end token). Scores are summed
        log-probabilities divided by the generated length (length penalty 1, as transformers'
        default); an image stops once num_beams beams have finished and no running beam can still
        beat the worst of them (transformers' heuristic), or at max_length, where the running beams
        end."""
        K, keep = self.spec.num_beams, self.spec.num_captions
        B = embs.shape[0]
        dev = embs.device
        latent, embs = latent.repeat_interleave(K, 0), embs.repeat_interleave(K, 0)
        tokens = torch.full((B * K, 1), self.sot, dtype=torch.long, device=dev)
        scores = torch.full((B, K), float("-inf"), dtype=torch.float64, device=dev)
        scores[:, 0] = 0.0  # one live beam at first, or all K would pick the same tokens
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
        done = [False] * B
        while not all(done):
            cur = tokens.shape[1]
            if cur + 1 >= self.spec.max_length:  # out of room: running beams end here
                last, ids = scores.cpu(), tokens[:, 1:].tolist()
                for b in range(B):
                    if not done[b]:
                        finished[b] += [(float(last[b, k]) / cur, ids[b * K + k] + [self.eot])
                                        for k in range(K) if float(last[b, k]) > float("-inf")]
                break
            logp = torch.log_softmax(self._next_logits(latent, embs, tokens), dim=-1).double()
            if cur < self.spec.min_length:
                logp[:, self.eot] = float("-inf")
            V = logp.shape[1]
            cand = (scores.view(B * K, 1) + logp).view(B, K * V)
            top, top_idx = (t.cpu() for t in cand.topk(2 * K, dim=1))  # only 2K candidates leave the device
            src = torch.arange(B * K)
            nxt = torch.full((B * K,), self.eot, dtype=torch.long)
            new_scores = torch.full((B, K), float("-inf"), dtype=torch.float64)
            for b in range(B):
                if done[b]:
                    continue
                chosen = 0
                for rank in range(2 * K):
                    score, flat = float(top[b, rank]), int(top_idx[b, rank])
                    if score == float("-inf"):
                        break
                    k, token = divmod(flat, V)
                    if token == self.eot:
                        if rank < K:  # as transformers: an end among the top K candidates finishes a beam
                            finished[b].append((score / cur, tokens[b * K + k, 1:].tolist() + [self.eot]))
                        continue
                    src[b * K + chosen], nxt[b * K + chosen] = b * K + k, token
                    new_scores[b, chosen] = score
                    chosen += 1
                    if chosen == K:
                        break
                finished[b] = sorted(finished[b], key=lambda h: -h[0])[:K]
                best_running = float(new_scores[b].max())
                if len(finished[b]) >= K and best_running / (cur + 1) <= finished[b][-1][0]:
                    done[b] = True
            tokens = torch.cat([tokens[src.to(dev)], nxt.to(dev).unsqueeze(1)], dim=1)
            scores = new_scores.to(dev)
        return [sorted(hyps, key=lambda h: -h[0])[:keep] for hyps in finished]

    # -- per batch -----------------------------------------------------------------------------

    def _generator(self, key: str, index: int, attempt: int) -> torch.Generator:
        g = torch.Generator()  # CPU: the same stream whatever the model's device
        g.manual_seed(entry_seed(self.seed, key, index, "caption", self.spec.syn_key, attempt))
        return g

    @torch.inference_mode()
    def _caption_chunk(self, samples: list[dict]) -> list[list[str]]:
        images = torch.stack([s["_caption_input"] for s in samples])
        latent, embs = self._encode(images)
        if self.spec.generation == "beam_search":
            beams = self.beam_search(latent, embs)
            if any(len(hyps) < self.spec.num_captions for hyps in beams):
                raise RuntimeError("beam search finished fewer beams than num_captions")
            return [[clean_caption(ids, self.tokenizer) for _, ids in hyps] for hyps in beams]
        n = self.spec.num_captions
        rows = [(i, c) for i in range(len(samples)) for c in range(n)]
        captions = [[""] * n for _ in samples]
        for attempt in range(1 + EMPTY_RETRIES):
            if not rows:
                break
            idx = torch.tensor([i for i, _ in rows], device=embs.device)
            gens = [self._generator(samples[i]["__key__"], c, attempt) for i, c in rows]
            for (i, c), ids in zip(rows, self.sample_rows(latent[idx], embs[idx], gens)):
                captions[i][c] = clean_caption(ids, self.tokenizer)
            rows = [(i, c) for i, c in rows if not captions[i][c]]  # empty: draw again, deterministically
        return captions

    def _caption(self, samples: list[dict]) -> list[list[str]]:
        out = []
        for start in range(0, len(samples), self.spec.batch_size):
            out += self._caption_chunk(samples[start:start + self.spec.batch_size])
        return out

    def _prepare(self, sample: dict) -> torch.Tensor:
        image = sample.get("image")
        if not (isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.ndim == 3
                and image.shape[0] == 3):
            raise SkipSample("bad_image", "image must be a uint8 CHW RGB tensor")
        if not isinstance(sample.get("syn", {}), dict):
            raise SkipSample("bad_synthetic_captions", "syn must be a dict")
        # the captioner's own eval preprocessing (resize, crop, its mean/std), on the decoded original
        return self.preprocess(Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()))

    def __call__(self, batch: Batch) -> Batch:
        if not batch.samples:
            return batch
        self.setup()
        valid, errors = [], list(batch.errors)
        for sample in batch.samples:
            try:
                sample["_caption_input"] = self._prepare(sample)
                valid.append(sample)
            except Exception as exc:  # noqa: BLE001 - per-sample failures are counted, never fatal
                errors.append(sample_error(sample, self.name, exc))
        kept, failed = run_isolated(self.name, valid, self._caption) if valid else ([], [])
        for sample in batch.samples:
            sample.pop("_caption_input", None)
        for sample, captions in kept:
            sample.setdefault("syn", {})[self.spec.syn_key] = captions
        return Batch([sample for sample, _ in kept], errors + failed)
