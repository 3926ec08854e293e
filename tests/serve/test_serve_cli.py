"""`tunelab serve` as a user runs it: a subprocess on a free port, the key from the environment."""

from __future__ import annotations

import os
import subprocess
import time

import httpx
import pytest

from helpers import ROOT
from helpers.cli import assert_clean_error, run_cli, tunelab_cmd
from helpers.processes import free_port

KEY = "cli-secret-key-9876"
ADMIN_KEY = "cli-admin-key-4321"


@pytest.mark.model
def test_serve_command_requires_the_key_and_never_prints_it():
    port = free_port()
    env = {**os.environ, "TUNELAB_API_KEY": KEY, "TUNELAB_ADMIN_KEY": ADMIN_KEY}
    proc = subprocess.Popen(tunelab_cmd("serve", "--port", port, "--max-batch", "4", "--threads", "1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]
        # the admin endpoint is open to the admin key's holder only (and checks what it is given)
        r = httpx.post(url + "/admin/adapters", json={"name": "x", "path": "/nonexistent"}, timeout=30,
                       headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 401
        r = httpx.post(url + "/admin/adapters", json={"name": "x", "path": "/nonexistent"}, timeout=30,
                       headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "path"
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    assert KEY not in out and ADMIN_KEY not in out
    assert "API key required" in out and f"127.0.0.1:{port}" in out
    assert "POST /v1/chat/completions" in out  # the access log is on, and it shows no headers


def test_serve_bad_adapter_flag_is_one_clear_line(tmp_path):
    for args, needle in ((["--adapter", "nameonly"], "NAME=PATH"),
                         (["--adapter", f"x={tmp_path}"], "no adapter_config.json")):
        assert_clean_error(run_cli("serve", *args, timeout=120), needle)
