"""The ``salesforce/blip`` contract served by the stand-in, answered honestly by an ImageNet classifier.

    problems = validate_input({"image": "data:image/png;base64,...", "task": "image_captioning"})
    result = answer(classifier, image_bytes, task, question=None, caption=None)
    result.output   # "Caption: espresso (96%)"

Inputs, as BLIP on Replicate: ``image`` (http(s) URL or data URL, required), ``task``
(``image_captioning`` default, ``visual_question_answering``, ``image_text_matching``),
``question`` (for VQA), ``caption`` (for ITM). Unknown input keys are ignored (and said so in the
logs). A missing question/caption for its task makes the *prediction* fail, not the request.

What the answers really are (the model is EfficientNet-Lite0, a 1000-class ImageNet classifier):

- captioning: ``Caption: <top label> (<p>%)``; if the top label has < 20 % the text says
  ``Caption: unclear scene (top-3: a 9%, b 4%, c 3%)`` instead of guessing.
- VQA: if the question names ImageNet classes (a class name, or a word that ends class names, as
  "cat" ends "tiger cat"), ``Answer: yes``/``no`` from the summed probability of those classes
  (yes at >= 20 %), with the evidence in brackets; otherwise the top label as for captioning.
- ITM: ``The image and text are matched with a probability of 0.9600.`` where the number is the
  summed classifier probability of the classes the caption names (0 if it names none), with the
  classes in brackets. It is a classifier probability, not BLIP's learned matching score.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .model import MODEL_DESCRIPTION, Classifier, decode_image

OWNER, NAME = "salesforce", "blip"
MODEL = f"{OWNER}/{NAME}"
VERSION = "2e1dddc8621f72155f24cf2e0adbde548458d3cab9f00c0139eea840d0ac4746"
VERSION_CREATED_AT = "2022-09-12T14:19:45.041148Z"
COG_VERSION = "0.3.0"
TASKS = ("image_captioning", "visual_question_answering", "image_text_matching")
INPUT_KEYS = ("image", "task", "question", "caption")
UNCLEAR_BELOW = 0.2
YES_FROM = 0.2


class PredictionFailed(Exception):
    """The model could not answer this input; becomes the prediction's ``error``."""


def openapi_schema() -> dict:
    """The version's ``openapi_schema``, in Cog's layout (Input, Output, Status, paths)."""
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": {
            "/predictions": {
                "post": {
                    "summary": "Predict",
                    "requestBody": {
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/PredictionRequest"}}
                        }
                    },
                    "responses": {
                        "200": {
                            "description": "Successful Response",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/PredictionResponse"}
                                }
                            },
                        }
                    },
                }
            }
        },
        "components": {
            "schemas": {
                "Input": {
                    "type": "object",
                    "title": "Input",
                    "required": ["image"],
                    "properties": {
                        "image": {
                            "type": "string",
                            "format": "uri",
                            "title": "Image",
                            "x-order": 0,
                            "description": "Input image (http(s) URL or data URL)",
                        },
                        "task": {
                            "allOf": [{"$ref": "#/components/schemas/task"}],
                            "default": "image_captioning",
                            "x-order": 1,
                            "description": "Choose a task.",
                        },
                        "question": {
                            "type": "string",
                            "title": "Question",
                            "x-order": 2,
                            "description": "Question about the image, for visual question answering.",
                        },
                        "caption": {
                            "type": "string",
                            "title": "Caption",
                            "x-order": 3,
                            "description": "Type caption for the input image for image text matching task.",
                        },
                    },
                },
                "task": {
                    "enum": list(TASKS),
                    "type": "string",
                    "title": "task",
                    "description": "An enumeration.",
                },
                "Output": {"type": "string", "title": "Output"},
                "Status": {
                    "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
                    "type": "string",
                    "title": "Status",
                    "description": "An enumeration.",
                },
                "PredictionRequest": {
                    "type": "object",
                    "properties": {"input": {"$ref": "#/components/schemas/Input"}, "id": {"type": "string"}},
                },
                "PredictionResponse": {
                    "type": "object",
                    "properties": {
                        "input": {"$ref": "#/components/schemas/Input"},
                        "output": {"$ref": "#/components/schemas/Output"},
                        "status": {"$ref": "#/components/schemas/Status"},
                        "error": {"type": "string"},
                        "logs": {"type": "string"},
                    },
                },
            }
        },
        "x-model-note": f"Served by the IoT Pipelines local stand-in: {MODEL_DESCRIPTION}; texts are built "
        "from its ImageNet labels, not by BLIP.",
    }


def version_json() -> dict:
    """``GET /v1/models/salesforce/blip/versions/{id}`` (and the model's ``latest_version``)."""
    return {"id": VERSION, "created_at": VERSION_CREATED_AT, "cog_version": COG_VERSION,
            "openapi_schema": openapi_schema()}


def model_json(run_count: int) -> dict:
    """``GET /v1/models/salesforce/blip``: Replicate's model object; ``run_count`` is this service's."""
    return {
        "url": f"https://replicate.com/{MODEL}",
        "owner": OWNER,
        "name": NAME,
        "description": "Image captioning, visual question answering and image-text matching "
        f"(local stand-in: {MODEL_DESCRIPTION}; texts built from its ImageNet labels)",
        "visibility": "public",
        "github_url": "https://github.com/salesforce/BLIP",
        "paper_url": "https://arxiv.org/abs/2201.12086",
        "license_url": "https://github.com/salesforce/BLIP/blob/main/LICENSE.txt",
        "run_count": run_count,
        "cover_image_url": None,
        "default_example": None,
        "latest_version": version_json(),
    }


def _type_name(value: object) -> str:
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def validate_input(inp: object) -> list[tuple[str, str, str]]:
    """Schema checks Replicate does before queueing: (field, type, description) per problem."""
    if not isinstance(inp, dict):
        return [("input", "invalid_type", f"Invalid type. Expected: object, given: {_type_name(inp)}")]
    problems: list[tuple[str, str, str]] = []
    image = inp.get("image")
    if "image" not in inp or image is None:
        problems.append(("input", "required", "image is required"))
    elif not isinstance(image, str):
        problems.append(
            ("input.image", "invalid_type", f"Invalid type. Expected: string, given: {_type_name(image)}")
        )
    elif not re.match(r"(?i)^(data:|https?://\S)", image):
        problems.append(
            ("input.image", "format", "Does not match format 'uri' (use an http(s) URL or a data URL)")
        )
    task = inp.get("task", "image_captioning")
    if not isinstance(task, str) or task not in TASKS:
        choices = ", ".join(f'"{t}"' for t in TASKS)
        problems.append(("input.task", "enum", f"task must be one of the following: {choices}"))
    for key in ("question", "caption"):
        if key in inp and inp[key] is not None and not isinstance(inp[key], str):
            problems.append(
                (
                    f"input.{key}",
                    "invalid_type",
                    f"Invalid type. Expected: string, given: {_type_name(inp[key])}",
                )
            )
    return problems


@dataclass
class Answer:
    output: str
    logs: str


def _pct(p: float) -> str:
    return f"{round(p * 100)}%"


def _top_text(labels: list[tuple[str, float]]) -> str:
    return ", ".join(f"{n} {_pct(p)}" for n, p in labels[:3])


def _named_classes(text: str, names: list[str]) -> list[int]:
    """Indices of classes the text names: the whole class name, or the word that ends it."""
    words = set(re.findall(r"[a-z0-9'-]+", text.lower()))
    padded = " " + " ".join(re.findall(r"[a-z0-9'-]+", text.lower())) + " "
    found = []
    for i, name in enumerate(names):
        low = name.lower()
        head = low.split()[-1]
        if f" {low} " in padded or (len(head) > 2 and head in words) or (head + "s") in words:
            found.append(i)
    return found


# The words every answer of a task starts with: known before the model has looked at the image.
OPENINGS = {
    "image_captioning": "Caption:",
    "visual_question_answering": "Answer:",
    "image_text_matching": "The image and text are matched with a probability of",
}
TOKEN = re.compile(r"\s*\S+")


def tokens(text: str) -> list[str]:
    """Word pieces, each with the whitespace before it: ``"".join(tokens(t)) == t``."""
    return TOKEN.findall(text)


Emit = Callable[[str, str], None]


def answer(
    classifier: Classifier, image: bytes, task: str, question: str | None, caption: str | None,
    emit: Emit | None = None,
) -> Answer:
    """Run the model on the image and phrase the answer for the task. Raises PredictionFailed.

    ``emit(kind, text)`` (optional, called from this thread) gets the answer as it forms, for
    ``urls.stream``: ``("output", piece)`` for each word as soon as it is known (the task's opening
    words first, before the image is decoded; the label and its evidence after the model ran) and
    ``("logs", line)`` for each log line when it is written. The pieces join to ``output`` exactly.
    """
    if task == "visual_question_answering" and not (question or "").strip():
        raise PredictionFailed("question is required for the visual_question_answering task")
    if task == "image_text_matching" and not (caption or "").strip():
        raise PredictionFailed("caption is required for the image_text_matching task")
    opening = OPENINGS[task]
    if emit is not None:
        for piece in tokens(opening):
            emit("output", piece)
        emit("logs", f"model: {MODEL_DESCRIPTION}")
    try:
        img = decode_image(image)
    except ValueError as exc:
        raise PredictionFailed(f"image: {exc}") from exc
    if emit is not None:
        emit("logs", f"image: {img.size[0]}x{img.size[1]}")
    result = _phrase(classifier, img, task, question, caption)
    if emit is not None:
        lines = result.logs.splitlines()
        for line in lines[2:]:  # the model and image lines went out above
            emit("logs", line)
        for piece in tokens(result.output[len(opening):]):
            emit("output", piece)
    return result


def _phrase(classifier: Classifier, img, task: str, question: str | None, caption: str | None) -> Answer:
    probs = classifier.probabilities(img)
    order = np.argsort(probs)[::-1]
    top = [(classifier.names[i], float(probs[i])) for i in order[:5]]
    logs = [
        f"model: {MODEL_DESCRIPTION}",
        f"image: {img.size[0]}x{img.size[1]}",
        "top-5: " + ", ".join(f"{n} {p:.3f}" for n, p in top),
    ]
    best_name, best_p = top[0]
    label_text = (
        f"{best_name} ({_pct(best_p)})"
        if best_p >= UNCLEAR_BELOW
        else f"unclear scene (top-3: {_top_text(top)})"
    )
    if task == "image_captioning":
        return Answer(f"Caption: {label_text}", "\n".join(logs) + "\n")
    text = question if task == "visual_question_answering" else caption
    named = _named_classes(text or "", classifier.names)
    total = float(sum(probs[i] for i in named))
    strongest = sorted(((classifier.names[i], float(probs[i])) for i in named), key=lambda x: -x[1])[:3]
    logs.append("classes named in the text: " + (", ".join(f"{n} {p:.3f}" for n, p in strongest) or "none"))
    if task == "visual_question_answering":
        if not named:
            return Answer(f"Answer: {label_text}", "\n".join(logs) + "\n")
        verdict = "yes" if total >= YES_FROM else "no"
        return Answer(
            f"Answer: {verdict} ({_top_text(strongest)}; top label {best_name} {_pct(best_p)})",
            "\n".join(logs) + "\n",
        )
    evidence = (
        _top_text(strongest) if named else f"the caption names no ImageNet class; top label {best_name}"
    )
    return Answer(
        f"The image and text are matched with a probability of {total:.4f} ({evidence}).",
        "\n".join(logs) + "\n",
    )
