"""Scene photos the simulated cameras look at.

The photos live in ``device_sim/data/`` (public-domain / CC0 samples from scikit-image, see
``data/LICENSES.md``). Use::

    from device_sim.scenes import SCENE_NAMES, load_scene
    image = load_scene("coffee")        # PIL.Image in RGB mode, cached
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from PIL import Image

DATA_DIR = Path(__file__).resolve().parent / "data"

# What each photo shows, so a live view or a test can say what a classifier should see.
SCENE_NAMES: tuple[str, ...] = ("coffee", "chelsea", "astronaut", "rocket", "camera")
SCENE_SUBJECTS: dict[str, str] = {
    "coffee": "a cup of espresso",
    "chelsea": "a tabby cat",
    "astronaut": "an astronaut in a flight suit",
    "rocket": "a rocket launch",
    "camera": "a man with a camera on a tripod",
}


class UnknownSceneError(ValueError):
    """The scene name is not one of SCENE_NAMES."""


@lru_cache(maxsize=len(SCENE_NAMES))
def load_scene(name: str) -> Image.Image:
    """Return the named scene photo as an RGB image (cached; treat it as read-only)."""
    if name not in SCENE_NAMES:
        raise UnknownSceneError(f"unknown scene {name!r}: choose one of {', '.join(SCENE_NAMES)}")
    with Image.open(DATA_DIR / f"{name}.jpg") as image:
        return image.convert("RGB")
