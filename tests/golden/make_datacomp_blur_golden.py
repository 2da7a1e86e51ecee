"""Run DataComp's face blur once on small real images and save what it produced (facts, not code).

DataComp's resharder.py blurs with `blur_image` (cv2.imdecode -> img2dataset's BoundingBoxBlurrer ->
cv2.imencode .webp). Its requirements pin img2dataset==1.40.0, albumentations==1.3.0,
opencv-python(-headless)==4.6.0.66, numpy==1.23.4; this script was run in a venv with exactly those
(Python 3.11, plus scikit-image 0.19.3 for the photos, pillow 9.3.0 for the JPEGs):

    python -m venv /tmp/dcblur && /tmp/dcblur/bin/pip install numpy==1.23.4 opencv-python-headless==4.6.0.66 \\
        albumentations==1.3.0 scikit-image==0.19.3 scipy==1.9.3 qudida==0.0.4 pillow==9.3.0
    git -C img2dataset show 1.40.0:img2dataset/blurrer.py > /tmp/blurrer_1_40.py
    /tmp/dcblur/bin/python tests/golden/make_datacomp_blur_golden.py --datacomp PATH/datacomp \\
        --blurrer /tmp/blurrer_1_40.py --out tests/golden/datacomp_blur.npz

CI cannot fetch these checkouts: the committed datacomp_blur.npz is the evidence the tests use. Nothing
of DataComp's or img2dataset's code is copied here: both are loaded from the given checkouts and run.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import io
import json

import numpy as np


def load_blur_image(datacomp: str):
    """resharder.blur_image, compiled from DataComp's own source (resharder.py imports far more than it needs)."""
    import cv2
    source = open(f"{datacomp}/resharder.py").read()
    tree = ast.parse(source)
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "blur_image")

    class Defaults:  # its default argument reads parser.get_default("reencode_webp_quality")
        @staticmethod
        def get_default(name):
            return {"reencode_webp_quality": 100}[name]

    namespace = {"cv2": cv2, "np": np, "parser": Defaults, "BoundingBoxBlurrer": object}
    exec(compile(ast.Module([node], []), f"{datacomp}/resharder.py", "exec"), namespace)
    return namespace["blur_image"]


def load_blurrer(path: str):
    spec = importlib.util.spec_from_file_location("img2dataset_blurrer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.BoundingBoxBlurrer()


def images():
    """(name, jpeg bytes, boxes): photos shipped in scikit-image and one generated image."""
    import skimage.data
    from PIL import Image

    def jpeg(array, quality=90):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="JPEG", quality=quality)
        return buf.getvalue()

    astronaut = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((160, 160)))
    coffee = np.asarray(Image.fromarray(skimage.data.coffee()).resize((150, 100)))
    camera = np.asarray(Image.fromarray(skimage.data.camera()).resize((120, 90)))  # grayscale: a 2-D array
    yy, xx = np.mgrid[0:72, 0:96]
    generated = np.stack([(xx * 255 // 95), (yy * 255 // 71), ((xx + yy) % 32) * 8], -1).astype(np.uint8)
    return [
        ("astronaut_face", jpeg(astronaut), [[0.38, 0.08, 0.62, 0.42]]),
        ("coffee_two_boxes_one_at_the_edge", jpeg(coffee), [[0.05, 0.1, 0.3, 0.45], [0.8, 0.7, 1.0, 1.0]]),
        ("camera_gray", jpeg(camera), [[0.3, 0.2, 0.55, 0.6]]),
        ("generated_overlapping_and_degenerate", jpeg(generated, 95),
         [[0.1, 0.1, 0.5, 0.6], [0.3, 0.4, 0.7, 0.9], [0.9, 0.9, 0.9, 0.9]]),
        ("generated_no_boxes", jpeg(generated, 95), []),
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--datacomp", required=True)
    ap.add_argument("--blurrer", required=True, help="img2dataset 1.40.0's img2dataset/blurrer.py")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import albumentations
    import cv2
    blur_image = load_blur_image(args.datacomp)
    blurrer = load_blurrer(args.blurrer)
    arrays, meta = {}, []
    for i, (name, data, boxes) in enumerate(images()):
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        blurred = blurrer(decoded, boxes)  # the pixels blur_image encodes
        webp = blur_image(blurrer, data, boxes)
        arrays[f"jpeg_{i}"] = np.frombuffer(data, np.uint8)
        arrays[f"decoded_{i}"] = decoded
        arrays[f"blurred_{i}"] = blurred
        arrays[f"webp_{i}"] = np.frombuffer(webp, np.uint8)
        meta.append({"name": name, "boxes": boxes})
    arrays["meta"] = np.frombuffer(json.dumps({
        "images": meta, "versions": {"opencv": cv2.__version__, "albumentations": albumentations.__version__,
                                     "numpy": np.__version__, "img2dataset_blurrer": "1.40.0"}}).encode(), np.uint8)
    np.savez_compressed(args.out, **arrays)
    print(f"{len(meta)} images -> {args.out}")


if __name__ == "__main__":
    main()
