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
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reinforge.formats.sources import InputError
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


def parse_boxes(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A face_bboxes column -> per row its number of boxes (int32; -1: malformed, i.e. not lists of 4 finite
    numbers, which counts as no metadata row) and the well-formed rows' boxes as float64, 4 per box. A null
    row has no boxes. Lists of lists of numbers are checked by Arrow's kernels, anything else row by row."""
    import pyarrow.compute as pc  # here, not at the top: it costs every reshard run ~0.1 s to import
    listy = lambda t: pa.types.is_list(t) or pa.types.is_large_list(t)  # noqa: E731
    kind = column.type
    if not (listy(kind) and listy(kind.value_type) and (pa.types.is_integer(kind.value_type.value_type)
                                                        or pa.types.is_floating(kind.value_type.value_type))):
        return _parse_rows(column.to_pylist())
    per_row = pc.list_value_length(column).fill_null(0).to_numpy().astype(np.int64)
    boxes = pc.list_flatten(column)  # null rows hold none
    sides = pc.list_value_length(boxes)
    null_box = sides.is_null().to_numpy(zero_copy_only=False)
    sides = sides.fill_null(0).to_numpy().astype(np.int64)
    values = pc.list_flatten(boxes).cast(pa.float64(), safe=False).to_numpy(zero_copy_only=False)  # null: NaN
    bad_values = np.r_[0, np.cumsum(~np.isfinite(values))]
    ends = np.cumsum(sides)
    box_ok = (sides == 4) & ~null_box & (bad_values[ends] == bad_values[ends - sides])
    bad_boxes = np.r_[0, np.cumsum(~box_ok)]
    row_ends = np.cumsum(per_row)
    row_ok = bad_boxes[row_ends] == bad_boxes[row_ends - per_row]
    keep = np.repeat(np.repeat(row_ok, per_row), sides)  # the values of well-formed rows (4 per box)
    return np.where(row_ok, per_row, -1).astype(np.int32), values[keep]


def _parse_rows(rows: list) -> tuple[np.ndarray, np.ndarray]:
    counts, values = np.zeros(len(rows), np.int32), []
    for i, b in enumerate(rows):
        b = [] if b is None else b
        if valid_boxes(b):
            counts[i] = len(b)
            values.extend(float(v) for box in b for v in box)
        else:
            counts[i] = -1
    return counts, np.array(values, np.float64)


def bad_box_examples(files: list[str], places: list[tuple[int, int]], batch_rows: int) -> list[dict]:
    """reshard.json's examples of malformed boxes: (file number, row in file) -> the file, the row's place in
    the batch of `batch_rows` rows a reader streaming the file from its start holds it in, its boxes."""
    out = []
    for number, row in places:
        fs, path = filesystem(files[number])
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            first = 0
            for group in range(parquet.num_row_groups):  # the row group holding the row
                rows = parquet.metadata.row_group(group).num_rows
                if row < first + rows:
                    break
                first += rows
            at = row - first
            for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[group], columns=["face_bboxes"]):
                if at < batch.num_rows:
                    boxes = batch.column("face_bboxes")[at].as_py()
                    break
                at -= batch.num_rows
        out.append({"file": files[number], "row_in_batch": row % batch_rows, "face_bboxes": str(boxes)[:200]})
    return out


def boxes_report(files: int, rows: int, duplicate_rows: int, bad_uids: int, bad_boxes: int, bad_box_sample: list,
                 without: int, without_sample: list[str], samples_with_faces: int, uids_with_faces: int) -> dict:
    """What the blur pass will do, for reshard.json: of the metadata, and per output sample and per uid
    (of the subset uids found in the pool)."""
    return {"metadata_files": files, "metadata_rows": rows,
            "duplicate_metadata_rows": duplicate_rows, "malformed_metadata_uids": bad_uids,
            "malformed_boxes": bad_boxes, "malformed_box_sample": bad_box_sample,
            "uids_without_metadata": without, "without_metadata_sample": without_sample[:SAMPLE],
            "samples_with_faces": samples_with_faces, "uids_with_faces": uids_with_faces,
            "policy": "samples with a non-empty face_bboxes list are blurred / annotated; samples without "
                      "a metadata row are written unchanged (DataComp logs them and does the same)"}


def image_member(members: dict) -> Optional[str]:
    return next((m for m in IMAGE_MEMBERS if m in members), None)
