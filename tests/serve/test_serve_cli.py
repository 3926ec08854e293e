"""`tunelab serve` as a user runs it: a subprocess on a free port, the key from the environment."""

from __future__ import annotations

import os
import socket
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
        r = httpx.post(url + "/v1/chat/completions?token=in-the-query", json=body, timeout=60,
                       headers={"Authorization": f"Bearer {KEY}"})
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
    access = [ln for ln in out.splitlines() if "POST /v1/chat/completions" in ln]
    assert access  # the access log is on: method, path and status only (no client address, query or headers)
    assert all("127.0.0.1" not in ln and "in-the-query" not in ln and "?" not in ln for ln in access), access
    assert any(ln.rstrip().endswith('"POST /v1/chat/completions" 200') for ln in access), access


def test_serve_on_a_port_in_use_says_so_in_one_line_before_loading():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = run_cli("serve", "--port", port, timeout=120)
    assert_clean_error(p, f"port {port}", "in use", "--port")
    assert "tunelab serve:" not in p.stderr + p.stdout  # refused before the model loads and the URL is announced


def test_serve_on_another_interface_needs_a_key_or_allow_no_key():
    env = {k: v for k, v in os.environ.items() if k != "TUNELAB_API_KEY"}
    p = subprocess.run(tunelab_cmd("serve", "--host", "0.0.0.0"), capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=120)
    assert_clean_error(p, "0.0.0.0", "TUNELAB_API_KEY", "--allow-no-key")


def test_serve_bad_adapter_flag_is_one_clear_line(tmp_path):
    for args, needle in ((["--adapter", "nameonly"], "NAME=PATH"),
                         (["--adapter", f"x={tmp_path}"], "no adapter_config.json")):
        assert_clean_error(run_cli("serve", *args, timeout=120), needle)
