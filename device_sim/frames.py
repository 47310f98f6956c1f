"""Camera frames: a real photo, cropped and panned over time, with a timestamp and sensor noise.

Each frame is a deterministic function of (scene, seed, frame index, timestamp), so tests and
benchmarks can reproduce a fleet exactly. The crop stays large (90 % of the biggest window of
the output's aspect ratio) and pans gently, so an image classifier still sees the subject. Use::

    from device_sim.frames import FrameSource
    source = FrameSource("coffee", seed=7, label="cam-01")
    frame = source.render(index=0, when=datetime.now(UTC))
    frame.payload          # PNG bytes, 320x240; frame.content_format == 23
    FrameSource("rocket", image_format="jpeg").render(1, when).content_format   # 22

``render`` is CPU-bound (a few milliseconds): call it through ``asyncio.to_thread`` on a loop.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from device_sim.scenes import load_scene

ImageFormat = Literal["png", "jpeg"]
CONTENT_FORMATS: dict[str, int] = {"png": 23, "jpeg": 22}  # CoAP Content-Format numbers
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg"}

CROP_FRACTION = 0.9  # of the largest window with the output's aspect ratio
MIN_SIZE, MAX_SIZE = 16, 4096


@dataclass(frozen=True)
class Frame:
    """One encoded camera frame."""

    index: int
    payload: bytes
    content_format: int
    media_type: str
    width: int
    height: int

    @property
    def data(self) -> bytes:
        """The encoded bytes (alias of ``payload``)."""
        return self.payload


class FrameSource:
    """Renders the frames of one camera looking at one scene."""

    def __init__(
        self,
        scene: str,
        *,
        seed: int = 0,
        label: str = "",
        width: int = 320,
        height: int = 240,
        image_format: ImageFormat = "png",
        noise_sigma: float = 2.5,
        jpeg_quality: int = 85,
        png_palette: bool = True,
    ) -> None:
        if not (MIN_SIZE <= width <= MAX_SIZE and MIN_SIZE <= height <= MAX_SIZE):
            raise ValueError(f"frame size {width}x{height} out of range {MIN_SIZE}..{MAX_SIZE} per side")
        if image_format not in CONTENT_FORMATS:
            raise ValueError(f"image format {image_format!r} not supported: use 'png' or 'jpeg'")
        if noise_sigma < 0:
            raise ValueError(f"noise_sigma must be >= 0, got {noise_sigma}")
        self.scene = scene
        self.seed = seed
        self.label = label
        self.width = width
        self.height = height
        self.image_format: ImageFormat = image_format
        self.noise_sigma = noise_sigma
        self.jpeg_quality = jpeg_quality
        # 256-colour palette PNG, as small camera modules store frames: 20-60 KB at 320x240
        # (full RGB PNG of a noisy photo is 120-140 KB); the classifier's answers are the same
        self.png_palette = png_palette
        self._image = load_scene(scene)
        rng = np.random.default_rng([seed, 0x5CE7E])
        # Slow, incommensurate pan periods (in frames) so the path does not repeat quickly.
        self._period_x = float(rng.uniform(40, 90))
        self._period_y = float(rng.uniform(55, 120))
        self._phase_x = float(rng.uniform(0, 2 * math.pi))
        self._phase_y = float(rng.uniform(0, 2 * math.pi))
        self._font = _font(max(9, height // 20))

    def crop_box(self, index: int) -> tuple[float, float, float, float]:
        """The region of the scene (left, top, right, bottom) that frame ``index`` shows."""
        scene_w, scene_h = self._image.size
        aspect = self.width / self.height
        window_w, window_h = (scene_h * aspect, scene_h) if scene_w / scene_h > aspect else (
            scene_w, scene_w / aspect)
        crop_w, crop_h = window_w * CROP_FRACTION, window_h * CROP_FRACTION
        slack_x, slack_y = scene_w - crop_w, scene_h - crop_h
        fx = 0.5 + 0.5 * math.sin(2 * math.pi * index / self._period_x + self._phase_x)
        fy = 0.5 + 0.5 * math.sin(2 * math.pi * index / self._period_y + self._phase_y)
        left, top = slack_x * fx, slack_y * fy
        return (left, top, left + crop_w, top + crop_h)

    def render(self, index: int, when: datetime) -> Frame:
        """Render and encode frame number ``index`` stamped with ``when``."""
        frame = self._image.resize(
            (self.width, self.height), Image.Resampling.BILINEAR, box=self.crop_box(index))
        self._stamp(frame, index, when)
        pixels = np.asarray(frame, dtype=np.float32)
        # Sensor noise plus a slow exposure drift, seeded per frame for reproducibility.
        rng = np.random.default_rng([self.seed, index])
        gain = 1.0 + 0.04 * math.sin(index / 7.0 + self.seed)
        pixels = pixels * gain
        if self.noise_sigma:
            pixels = pixels + rng.normal(0.0, self.noise_sigma, pixels.shape)
        frame = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
        buffer = io.BytesIO()
        if self.image_format == "png" and self.png_palette:
            frame.quantize(256, method=Image.Quantize.FASTOCTREE).save(buffer, "PNG")
        elif self.image_format == "png":
            frame.save(buffer, "PNG")
        else:
            frame.save(buffer, "JPEG", quality=self.jpeg_quality)
        return Frame(
            index=index,
            payload=buffer.getvalue(),
            content_format=CONTENT_FORMATS[self.image_format],
            media_type=MEDIA_TYPES[self.image_format],
            width=self.width,
            height=self.height,
        )

    def _stamp(self, frame: Image.Image, index: int, when: datetime) -> None:
        text = f"{self.label} {when.strftime('%Y-%m-%d %H:%M:%S')} #{index}".strip()
        draw = ImageDraw.Draw(frame)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=self._font)
        margin = 3
        y = self.height - (bottom - top) - 2 * margin
        draw.rectangle((0, y, right - left + 2 * margin, self.height), fill=(0, 0, 0))
        draw.text((margin - left, y + margin - top), text, font=self._font, fill=(255, 255, 255))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()
