"""Face blurring as DataComp's resharder does it (`--apply-blur`), and where the boxes come from.

DataComp blurs with img2dataset 1.40's BoundingBoxBlurrer (albumentations 1.3's gaussian_blur, i.e.
OpenCV's GaussianBlur) and re-encodes through OpenCV; its behaviour is the definition here:

  boxes    `face_bboxes` of the metadata parquet: [x_min, y_min, x_max, y_max] as fractions of the
           decoded image's width and height. Pixel box = int(x * W), int(y * H) (truncation).
  padding  side = max(box width, box height) in pixels; each edge moves out by 0.1 * side (int()
           truncation toward zero), then is clipped to [0, W-1] x [0, H-1]; the mask covers rows
           y0:y1 and columns x0:x1 (end excluded, so the image's last row/column is never masked).
  blur     sigma = 0.1 * the largest side of the image's boxes, kernel int(2*ceil(4*sigma)) + 1;
           image/255 and the 0/1 mask (float32, all channels) both go through cv2.GaussianBlur;
           out = img*(1-mask') + blur(img)*mask', then *255 truncated to uint8. Pixels farther than
           the kernel radius from every padded box come out exactly as they were.
  image    decoded by cv2.imdecode(IMREAD_UNCHANGED) (BGR, no EXIF rotation), re-encoded as WebP at
           `quality` (DataComp's --reencode-webp-quality, default 100: lossy WebP, which changes
           every pixel a little); the `jpg` member is replaced by a `webp` member.
  samples  only those with a non-empty box list are touched; `--inject-blur-metadata` adds the boxes
           to the json member as "face_bboxes" (the json is re-serialised).

Needs OpenCV (`pip install 'reinforge[blur]'`, opencv-python-headless); imported only when blurring.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reinforge.formats.sources import InputError
from reinforge.formats.subset import UID_OK, locate, parse_hex_uids
from reinforge.io.storage import filesystem, read_text

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
BOXES_TYPE = pa.list_(pa.list_(pa.float64()))
SAMPLE = 10


class BlurError(InputError):
    """Blur metadata that cannot be used, or no OpenCV to blur with."""


def cv2_module():
    try:
        import cv2
    except ImportError:
        raise BlurError("face blurring needs OpenCV: pip install 'reinforge[blur]' "
                          "(opencv-python-headless)") from None
    return cv2


def mask_box(box, width: int, height: int) -> tuple[int, int, int, int, int]:
    """(x0, y0, x1, y1, side): the padded, clipped pixel box of one fractional box, and its longer side."""
    x0, y0, x1, y1 = int(box[0] * width), int(box[1] * height), int(box[2] * width), int(box[3] * height)
    side = max(x1 - x0, y1 - y0)
    pad = 0.1 * side
    x0, y0, x1, y1 = int(x0 - pad), int(y0 - pad), int(x1 + pad), int(y1 + pad)
    clip_x = lambda v: min(max(v, 0), width - 1)  # noqa: E731
    clip_y = lambda v: min(max(v, 0), height - 1)  # noqa: E731
    return clip_x(x0), clip_y(y0), clip_x(x1), clip_y(y1), side


def blur_faces(pixels: np.ndarray, boxes) -> np.ndarray:
    """uint8 HxW or HxWxC pixels with the boxes blurred (see the module doc); no boxes: unchanged."""
    if len(boxes) == 0:
        return pixels
    cv2 = cv2_module()
    height, width = pixels.shape[:2]
    img = pixels.astype(np.float32) / 255.0
    mask = np.zeros_like(img)
    longest = 0
    for box in boxes:
        x0, y0, x1, y1, side = mask_box(box, width, height)
        longest = max(longest, side)
        mask[y0:y1, x0:x1, ...] = 1
    sigma = 0.1 * longest
    ksize = int(2 * math.ceil(4 * sigma)) + 1
    blurred = cv2.GaussianBlur(img, (ksize, ksize), sigmaX=sigma)
    soft = cv2.GaussianBlur(mask, (ksize, ksize), sigmaX=sigma)
    out = img * (1 - soft) + blurred * soft
    return (out * 255.0).astype(np.uint8)


def reencode_blurred(data: bytes, boxes, quality: int = 100) -> bytes:
    """Image bytes -> WebP bytes of the blurred image (DataComp's blur_image). Raises ValueError when
    OpenCV cannot decode the bytes or the image is not 8-bit."""
    cv2 = cv2_module()
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ValueError("OpenCV cannot decode the image")
    if pixels.dtype != np.uint8:
        raise ValueError(f"{pixels.dtype} image: only 8-bit images are blurred")
    ok, encoded = cv2.imencode(".webp", blur_faces(pixels, boxes), [int(cv2.IMWRITE_WEBP_QUALITY), int(quality)])
    if not ok:
        raise ValueError("OpenCV cannot encode the blurred image as WebP")
    return encoded.tobytes()


def inject_boxes(json_bytes: bytes, boxes) -> bytes:
    """The json member with "face_bboxes" added (DataComp re-serialises it with json.dumps defaults)."""
    obj = json.loads(json_bytes)
    obj["face_bboxes"] = [list(b) for b in boxes]
    return json.dumps(obj).encode()


# ---------------------------------------------------------------- where the boxes come from

@dataclass
class FaceBoxes:
    """Per subset uid: its metadata row's face_bboxes (a list of boxes, maybe empty), or None when no
    metadata row has the uid."""
    boxes: list
    files: list[str]
    rows: int = 0
    duplicate_rows: int = 0
    bad_uids: int = 0
    bad_boxes: int = 0
    bad_box_sample: list = field(default_factory=list)

    def column(self, subset_index: np.ndarray) -> pa.Array:
        return pa.array([self.boxes[i] for i in subset_index.tolist()], BOXES_TYPE)


def metadata_files(sources: list[str]) -> list[str]:
    """Parquet files from paths, globs, folders, or DataComp's --blur-metadata-map JSON
    ({name: {"parquet": path, "shards": [...]}}: every parquet it names)."""
    from reinforge.formats.sources import expand_shards
    files: list[str] = []
    for source in sources:
        fs, path = filesystem(source)
        if source.endswith(".json"):
            entries = json.loads(read_text(source))
            files.extend(e["parquet"] for e in entries.values() if isinstance(e, dict) and e.get("parquet"))
        elif fs.isdir(path):
            files.extend(expand_shards(f"{source.rstrip('/')}/*.parquet"))
        else:
            files.extend(expand_shards(source))
    return list(dict.fromkeys(files))


def valid_boxes(boxes) -> bool:
    return all(len(b) == 4 and all(v is not None and math.isfinite(v) for v in b) for b in boxes)


def load_face_boxes(sources: list[str], subset_uids: np.ndarray, batch_rows: int = 1 << 16) -> FaceBoxes:
    """Stream the metadata's (uid, face_bboxes), keeping the rows of subset uids (memory ~ the subset).
    A uid's first row (files in the order given, rows in file order) wins. A row whose boxes are not
    lists of 4 finite numbers is counted and treated as having no metadata."""
    import pyarrow.compute as pc  # here, not at the top: it costs every reshard run ~0.1 s to import
    files = metadata_files(sources)
    out = FaceBoxes([None] * len(subset_uids), files)
    taken = np.zeros(len(subset_uids), bool)
    for url in files:
        fs, path = filesystem(url)
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            missing = {"uid", "face_bboxes"} - set(parquet.schema_arrow.names)
            if missing:
                raise BlurError(f"blur metadata {url}: no column {', '.join(sorted(missing))}")
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=["uid", "face_bboxes"]):
                out.rows += batch.num_rows
                uids = batch.column("uid")
                if pa.types.is_string(uids.type) or pa.types.is_large_string(uids.type):
                    uids = pc.utf8_lpad(uids, 32, "0")  # DataComp pads short uids with zeros
                hi, lo, status = parse_hex_uids(uids)
                out.bad_uids += int((status != UID_OK).sum())
                pos = np.where(status == UID_OK, locate(hi, lo, subset_uids), -1)
                rows = np.flatnonzero(pos >= 0)
                if not len(rows):
                    continue
                boxes = batch.column("face_bboxes").take(pa.array(rows)).to_pylist()
                for row, p, b in zip(rows.tolist(), pos[rows].tolist(), boxes):
                    if taken[p]:
                        out.duplicate_rows += 1
                        continue
                    taken[p] = True
                    b = [] if b is None else b
                    if valid_boxes(b):
                        out.boxes[p] = [list(map(float, box)) for box in b]
                    else:
                        out.bad_boxes += 1
                        if len(out.bad_box_sample) < SAMPLE:
                            out.bad_box_sample.append({"file": url, "row_in_batch": row, "face_bboxes": str(b)[:200]})
    return out


def boxes_report(found: FaceBoxes, subset_index: np.ndarray, uid_names) -> dict:
    """What the blur pass will do, for reshard.json (per output sample and per uid)."""
    per_uid = [found.boxes[i] for i in subset_index.tolist()]
    without = [i for i, b in zip(subset_index.tolist(), per_uid) if b is None]
    return {"metadata_files": len(found.files), "metadata_rows": found.rows,
            "duplicate_metadata_rows": found.duplicate_rows, "malformed_metadata_uids": found.bad_uids,
            "malformed_boxes": found.bad_boxes, "malformed_box_sample": found.bad_box_sample,
            "uids_without_metadata": len(set(without)),
            "without_metadata_sample": [uid_names(i) for i in sorted(set(without))[:SAMPLE]],
            "samples_with_faces": sum(1 for b in per_uid if b),
            "uids_with_faces": sum(1 for i in set(subset_index.tolist()) if found.boxes[i]),
            "policy": "samples with a non-empty face_bboxes list are blurred / annotated; samples without "
                      "a metadata row are written unchanged (DataComp logs them and does the same)"}


def image_member(members: dict) -> Optional[str]:
    return next((m for m in IMAGE_MEMBERS if m in members), None)
