"""`tunelab serve` and an adapter of another base: refused at start-up with one line (exit 2), and at registration
with an OpenAI-shaped 400, instead of a server that answers 500 cut off mid-message."""

from __future__ import annotations

import pytest

from helpers.cli import assert_clean_error, cli_env, run_cli


def test_an_adapter_that_does_not_fit_the_base_stops_the_start_with_one_line(tiny_adapter, tiny_model_dir,
                                                                             other_bases):
    p = run_cli("serve", "--model", other_bases["shape"], "--adapter", f"sent={tiny_adapter}", "--threads", "1",
                env=cli_env(), timeout=240)
    line = assert_clean_error(p, f"--adapter sent: adapter {tiny_adapter} does not fit the base model: size mismatch",
                              last_line_only=True)
    assert str(tiny_model_dir) in line


def test_registering_an_adapter_of_another_base_is_a_400(tiny_adapter, tiny_model_dir, other_bases):
    from tunelab.models.local import LocalModel
    from tunelab.serve.app import build_app
    from tunelab.serve.config import ServeConfig
    from tunelab.serve.errors import APIError

    cfg = ServeConfig(dtype="float32", adapter_roots=[str(tiny_adapter.parent)])  # registrable: only under a root
    other = build_app(cfg, LocalModel(str(other_bases["weights"]), dtype="float32"))
    with pytest.raises(APIError) as e:
        other.state.serving.register_adapter("sent", str(tiny_adapter))
    assert (e.value.status, e.value.code, e.value.param) == (400, "invalid_adapter", "path")
    assert "was trained on another base model" in e.value.message and str(tiny_model_dir) in e.value.message
    assert other.state.serving.registry.get("sent") is None
    own = build_app(cfg, LocalModel(str(tiny_model_dir), dtype="float32"))
    assert own.state.serving.register_adapter("sent", str(tiny_adapter)).id == "sent"
