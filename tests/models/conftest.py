"""Fixtures of the model backend tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def bundled_model():
    """The bundled SmolLM2-135M-Instruct, converted once (cached under $TUNELAB_CACHE or ~/.cache/tunelab)."""
    from tunelab.models import load_model

    return load_model(None)
