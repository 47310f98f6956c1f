"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest

from predictions_service.model import Classifier, ensure_model


@pytest.fixture(scope="session")
def classifier(tmp_path_factory) -> Classifier:
    """The local model, loaded once per session: the ONNX is built once, in the session's tmp."""
    return Classifier(ensure_model(tmp_path_factory.getbasetemp() / "predictions-model"))


@pytest.fixture(scope="session")
def golioth_sdk():
    """Golioth's Firmware SDK Linux programs, built once (cached by SDK contents): see golioth_sdk.py."""
    from golioth_sdk import build_all

    return build_all()
