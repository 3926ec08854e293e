"""Who may do what on `tunelab serve`: the API key before the body is read, the admin key for /admin (off
without one; the API key does not open it), and adapter registration only under the `--adapter-root`
directories, with one answer for a path that is missing and one that is not allowed.

One server over the tiny random model (tests/serve/conftest.py's ``tiny_server``) serves the module."""

from __future__ import annotations

import os

import httpx

from helpers.serve import TINY_ADMIN_KEY, TINY_KEY


def call(server, method: str, path: str, body=None, *, key: str | None = None, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, server.url + path, json=body, headers=headers, timeout=60, **kw)


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def register(server, name: str, path, key: str = TINY_ADMIN_KEY) -> httpx.Response:
    return call(server, "POST", "/admin/adapters", {"name": name, "path": str(path)}, key=key)


def test_the_key_is_checked_before_the_body_is_read(tiny_server):
    for path in ("/v1/chat/completions", "/v1/completions", "/admin/adapters"):
        r = httpx.post(tiny_server.url + path, content=b"{not json", timeout=30,
                       headers={"Content-Type": "application/json"})
        assert_error(r, 401, "missing_api_key")
    r = httpx.post(tiny_server.url + "/v1/completions", content=b"{not json", timeout=30,
                   headers={"Content-Type": "application/json", "Authorization": "Bearer wrong"})
    assert_error(r, 401, "invalid_api_key")
    r = httpx.post(tiny_server.url + "/v1/completions", content=b"{not json", timeout=30,
                   headers={"Content-Type": "application/json", "Authorization": f"Bearer {TINY_KEY}"})
    assert_error(r, 400)  # with the key, the body is read and found malformed
    assert httpx.get(tiny_server.url + "/health", timeout=30).status_code == 200  # public


def test_admin_needs_the_admin_key_not_the_api_key(tiny_server):
    other = tiny_server.root / "root-lora"
    err = assert_error(register(tiny_server, "x", other, key=TINY_KEY), 401, "invalid_api_key")
    assert TINY_KEY not in err["message"] and TINY_ADMIN_KEY not in err["message"]
    assert_error(register(tiny_server, "x", other, key=None), 401, "missing_api_key")
    assert_error(call(tiny_server, "DELETE", "/admin/adapters/startup", key=TINY_KEY), 401, "invalid_api_key")
    # the admin key is no API key either
    assert_error(call(tiny_server, "GET", "/v1/models", key=TINY_ADMIN_KEY), 401, "invalid_api_key")
    ids = [m["id"] for m in call(tiny_server, "GET", "/v1/models", key=TINY_KEY).json()["data"]]
    assert "startup" in ids and "x" not in ids


def test_admin_is_off_without_an_admin_key(tiny_server):
    state = tiny_server.app.state
    state.admin_key = None  # as a server started without TUNELAB_ADMIN_KEY
    try:
        for key in (None, TINY_KEY, TINY_ADMIN_KEY):
            assert_error(register(tiny_server, "x", tiny_server.root / "root-lora", key=key), 403, "admin_disabled")
    finally:
        state.admin_key = TINY_ADMIN_KEY


def test_registration_only_under_the_adapter_roots(tiny_server, tmp_path):
    root, outside = tiny_server.root, tiny_server.outside
    (root / "not-an-adapter").mkdir(exist_ok=True)
    link = root / "link-out"
    if not link.exists():
        os.symlink(outside / "other-lora", link)
    refusals = {}
    for label, path in (("missing in the root", root / "nothing-here"),
                        ("missing elsewhere", tmp_path / "nothing-here"),
                        ("an adapter outside", outside / "other-lora"),
                        ("a directory outside", tmp_path),
                        ("dot-dot out of the root", f"{root}/../{outside.name}/other-lora"),
                        ("a link out of the root", link),
                        ("the file system root", "/")):
        err = assert_error(register(tiny_server, "x", path), 400, "invalid_adapter")
        assert err["param"] == "path"
        refusals[label] = err["message"].replace(str(path), "PATH")
    assert len(set(refusals.values())) == 1, refusals  # one answer: nothing to learn about the file system
    assert "--adapter-root" in refusals["missing elsewhere"]
    # inside the root, a directory that is no adapter may say so
    err = assert_error(register(tiny_server, "x", root / "not-an-adapter"), 400, "invalid_adapter")
    assert "adapter_config.json" in err["message"]
    r = register(tiny_server, "in-root", root / "root-lora")
    assert r.status_code == 201, r.text
    out = httpx.post(tiny_server.url + "/v1/completions", timeout=60, headers={"Authorization": f"Bearer {TINY_KEY}"},
                     json={"model": "in-root", "prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert out.status_code == 200, out.text
    assert call(tiny_server, "DELETE", "/admin/adapters/in-root", key=TINY_ADMIN_KEY).status_code == 200
    # an adapter the server started with stays registrable wherever it is
    assert call(tiny_server, "DELETE", "/admin/adapters/startup", key=TINY_ADMIN_KEY).status_code == 200
    r = register(tiny_server, "startup", outside / "startup")
    assert r.status_code == 201, r.text
