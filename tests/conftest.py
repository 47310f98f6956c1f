"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest

from predictions_service.model import Classifier, ensure_model


@pytest.fixture(scope="session")
def classifier(tmp_path_factory) -> Classifier:
    """The local model, loaded once per session: the ONNX is built once, in the session's tmp."""
    return Classifier(ensure_model(tmp_path_factory.getbasetemp() / "predictions-model"))
