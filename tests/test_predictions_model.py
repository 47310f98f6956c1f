"""The offline model: weights read without torch, ONNX built once, real photos classified honestly."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from photos import photo
from PIL import Image

from predictions_service import blip
from predictions_service.model import (
    MODEL_FILE,
    ImageDecodeError,
    decode_image,
    ensure_model,
    load_classifier,
)
from predictions_service.model_build import BLOCK_STRIDES, ModelBuildError, build_onnx, build_onnx_from_state
from predictions_service.model_weights import WeightsError, bundled_weights_path, load_state_dict


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def test_weights_load_without_torch_and_cover_the_whole_network():
    state = load_state_dict(bundled_weights_path())
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_conv_stem.weight"].flags["C_CONTIGUOUS"]  # stored with non-default strides
    assert len([k for k in state if k.endswith("_depthwise_conv.weight")]) == len(BLOCK_STRIDES)
    import sys

    assert "torch" not in sys.modules


def test_build_reports_no_missing_or_unexpected_tensors(tmp_path):
    report = build_onnx(tmp_path / "m.onnx")
    assert (report.tensors, report.missing, report.unexpected) == (296, [], [])
    assert report.path.stat().st_size > 10_000_000


def test_unpickler_refuses_globals_that_are_not_allow_listed(tmp_path):
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {}):
            pickle.dump(header, f, protocol=2)
        # a pickle that would call os.system if it were loaded with pickle.load
        f.write(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(WeightsError, match=r"refusing to load os\.system"):
        load_state_dict(evil)


def test_not_a_torch_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04 not a legacy pickle")
    with pytest.raises(WeightsError, match=r"cannot read|not a legacy"):
        load_state_dict(bad)


def test_weights_that_do_not_fit_the_graph_fail_the_build(tmp_path):
    state = load_state_dict(bundled_weights_path())
    lacking = {k: v for k, v in state.items() if k != "_fc.bias"}
    with pytest.raises(ModelBuildError, match=r"_fc\.bias"):
        build_onnx_from_state(lacking, tmp_path / "x.onnx")
    extra = {**state, "_blocks.16._project_conv.weight": np.zeros((1, 1, 1, 1), np.float32)}
    with pytest.raises(ModelBuildError, match="does not use"):
        build_onnx_from_state(extra, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_model_file_is_cached(tmp_path_factory, classifier):
    path = classifier.path
    assert path.name == MODEL_FILE
    mtime = path.stat().st_mtime_ns
    assert ensure_model(path.parent) == path and path.stat().st_mtime_ns == mtime


def test_a_corrupt_cached_model_is_rebuilt(tmp_path):
    (tmp_path / MODEL_FILE).write_bytes(b"half a model")
    clf = load_classifier(tmp_path)
    assert clf.classify(Image.new("RGB", (64, 64), "white"), k=1)
    assert (tmp_path / MODEL_FILE).stat().st_size > 10_000_000


def test_coffee_is_espresso(classifier):
    top = classifier.classify(decode_image(png(photo("coffee"))), k=3)
    assert top[0].name in ("espresso", "cup")
    assert top[0].probability > 0.8


def test_chelsea_is_a_cat(classifier):
    top = classifier.classify(decode_image(png(photo("chelsea"))), k=3)
    assert top[0].name in ("tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat")


def test_cameraman_is_a_tripod(classifier):
    grey = np.asarray(Image.fromarray(photo("camera")).convert("L"))
    top = classifier.classify(decode_image(png(grey)), k=1)  # greyscale input
    assert top[0].name == "tripod" and top[0].probability > 0.5


def test_caption_for_coffee(classifier):
    result = blip.answer(classifier, png(photo("coffee")), "image_captioning", None, None)
    assert result.output.startswith("Caption: espresso (") and result.output.endswith("%)")
    assert "top-5: espresso" in result.logs


@pytest.mark.parametrize("value", [0, 128, 255])
def test_uniform_frame_says_unsure(classifier, value):
    frame = np.full((240, 320, 3), value, np.uint8)
    result = blip.answer(classifier, png(frame), "image_captioning", None, None)
    assert result.output.startswith("Caption: unclear scene (top-3: ")


def test_vqa_answers_from_labels(classifier):
    image = png(photo("chelsea"))
    vqa = "visual_question_answering"
    assert blip.answer(classifier, image, vqa, "Is there a cat?", None).output.startswith("Answer: yes (")
    no = blip.answer(classifier, image, vqa, "Is this a tripod?", None)
    assert no.output.startswith("Answer: no (tripod 0%")
    what = blip.answer(classifier, png(photo("camera")), "visual_question_answering", "What is shown?", None)
    assert what.output.startswith("Answer: tripod (")


def test_itm_probability_follows_the_caption(classifier):
    image = png(photo("coffee"))
    good = blip.answer(classifier, image, "image_text_matching", None, "a cup of espresso")
    bad = blip.answer(classifier, image, "image_text_matching", None, "a tabby sleeping")
    none = blip.answer(classifier, image, "image_text_matching", None, "something nice")

    def prob(text: str) -> float:
        return float(text.split("probability of ")[1].split()[0])

    assert prob(good.output) > 0.8 and prob(bad.output) < 0.05 and prob(none.output) == 0.0
    assert "names no ImageNet class" in none.output


@pytest.mark.parametrize(
    ("task", "field"), [("visual_question_answering", "question"), ("image_text_matching", "caption")]
)
def test_task_without_its_text_fails(classifier, task, field):
    with pytest.raises(blip.PredictionFailed, match=f"{field} is required"):
        blip.answer(classifier, png(photo("coffee")), task, None, None)


@pytest.mark.parametrize("data", [b"", b"hello, not an image", b"\x89PNG\r\n\x1a\n truncated"])
def test_undecodable_bytes_fail_clearly(classifier, data):
    with pytest.raises(blip.PredictionFailed, match="image: "):
        blip.answer(classifier, data, "image_captioning", None, None)
    with pytest.raises(ImageDecodeError):
        decode_image(data)


def test_input_validation_problems():
    assert blip.validate_input({"image": "data:image/png;base64,AA=="}) == []
    assert blip.validate_input({}) == [("input", "required", "image is required")]
    assert blip.validate_input("x")[0][0] == "input"
    assert blip.validate_input({"image": 3})[0][:2] == ("input.image", "invalid_type")
    assert blip.validate_input({"image": "ftp://x"})[0][:2] == ("input.image", "format")
    assert blip.validate_input({"image": "http://h/x", "task": "draw"})[0][:2] == ("input.task", "enum")
    problem = blip.validate_input({"image": "http://h/x", "question": 5})[0]
    assert problem[:2] == ("input.question", "invalid_type")
