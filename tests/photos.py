"""Real photos for the model's tests: the copies shipped in device_sim/data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(__file__).resolve().parent.parent / "device_sim" / "data"


def photo(name: str) -> np.ndarray:
    """A real photo: the copy shipped in device_sim/data, else scikit-image's original."""
    path = DATA / f"{name}.jpg"
    if path.is_file():
        return np.asarray(Image.open(path).convert("RGB"))
    raise FileNotFoundError(f"{path}: the test photos ship in device_sim/data (a broken checkout?)")
