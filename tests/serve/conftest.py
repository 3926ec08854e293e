"""Fixtures of the `tunelab serve` tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread in this process (the in-process servers and models): on a small shared machine two threads
    that wait on each other are many times slower."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir, tmp_path_factory):
    """A server over the tiny random model (fast) with an API key, an admin key and one adapter root (holding
    the adapter ``root-lora``); the adapter ``startup`` (outside the root) is given at startup. The server
    thread's ``.app``, ``.root`` and ``.outside`` (a folder outside the root with an adapter ``other-lora``)
    are there for the tests."""
    from helpers.serve import TINY_ADMIN_KEY, TINY_KEY, make_tiny_lora
    from tunelab.serve.app import ServerThread, build_app
    from tunelab.serve.config import ServeConfig

    root = tmp_path_factory.mktemp("adapter-root")
    outside = tmp_path_factory.mktemp("outside")
    make_tiny_lora(root / "root-lora", tiny_model_dir, 1)
    make_tiny_lora(outside / "other-lora", tiny_model_dir, 2)
    make_tiny_lora(outside / "startup", tiny_model_dir, 3)
    cfg = ServeConfig(model=str(tiny_model_dir), dtype="float32", api_key=TINY_KEY, admin_key=TINY_ADMIN_KEY,
                      adapter_roots=[str(root)], adapters={"startup": str(outside / "startup")},
                      max_batch=8, max_concurrent=8, max_sequences_per_request=4, max_tokens_limit=64)
    app = build_app(cfg)
    with ServerThread(app) as srv:
        srv.app, srv.root, srv.outside = app, root, outside
        yield srv
