"""mtk serve: keys, budgets under concurrency, rate limits, bad input never a 500, and an attack over HTTP."""

import base64
import io
import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real uvicorn server on loopback in a background thread."""

    def __init__(self, app):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(200):
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def served(mnist_victim, tmp_path_factory):
    from toolkit.artifacts import load_deployable
    from toolkit.serve.app import create_app
    from toolkit.serve.keys import KeyStore

    keys = KeyStore(tmp_path_factory.mktemp("keys") / "keys.sqlite")
    with Server(create_app(load_deployable(mnist_victim), keys, max_rows=64, max_body_bytes=2_000_000)) as server:
        yield server, keys


def _images(n, seed=0):
    return np.random.default_rng(seed).random((n, 1, 32, 32), dtype=np.float32)


def _post(server, key, body, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + "/v1/predict", headers=headers, timeout=30, **kw,
                      **({"json": body} if body is not None else {}))


def test_predict_card_health_and_openapi(served, mnist_victim):
    import torch

    from toolkit.artifacts import load_deployable

    server, keys = served
    _, key = keys.add(budget=1000)
    x = _images(5)
    r = _post(server, key, {"inputs": x.tolist()})
    assert r.status_code == 200, r.text
    local = load_deployable(mnist_victim).predict_proba(x)
    assert torch.allclose(torch.tensor(r.json()["probabilities"]), local, atol=1e-5)
    assert r.json()["queries_left"] == 995
    png = []
    for img in (x[:2] * 255).round().astype(np.uint8):
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(img[0], mode="L").save(buf, format="PNG")
        png.append(base64.b64encode(buf.getvalue()).decode())
    r = _post(server, key, {"images": png})
    assert r.status_code == 200 and len(r.json()["probabilities"]) == 2
    card = httpx.get(server.url + "/v1/card").json()
    assert card["dataset"]["input_shape"] == [1, 32, 32] and "method" not in card and "spec" not in card
    assert "/v1/predict" in httpx.get(server.url + "/openapi.json").json()["paths"]


def test_keys_auth_revocation_rate_and_audit(served):
    server, keys = served
    assert _post(server, None, {"inputs": _images(1).tolist()}).status_code == 401
    assert _post(server, "mtk_not-a-key", {"inputs": _images(1).tolist()}).status_code == 401
    key_id, key = keys.add(budget=10)
    assert _post(server, key, {"inputs": _images(8).tolist()}).status_code == 200
    over = _post(server, key, {"inputs": _images(3).tolist()})
    assert over.status_code == 403 and "budget" in over.json()["error"]
    assert _post(server, key, {"inputs": _images(2).tolist()}).status_code == 200  # exactly the rest fits
    revoked_id, revoked = keys.add(budget=100)
    keys.revoke(revoked_id)
    assert _post(server, revoked, {"inputs": _images(1).tolist()}).status_code == 403
    slow_id, slow = keys.add(budget=10_000, rate=1.0)
    codes = [_post(server, slow, {"inputs": _images(64).tolist()}).status_code for _ in range(12)]
    assert 429 in codes and codes[0] == 200  # a 64-image burst fits once, then the bucket refills at 1 query/s
    usage = keys.usage(key_id)
    assert sum(u["queries"] for u in usage) == 10 and sum(u["requests"] for u in usage) == 2


def test_budget_is_never_overspent_under_many_parallel_clients(served):
    server, keys = served
    key_id, key = keys.add(budget=300)
    payload = {"inputs": _images(7).tolist()}

    def client(_):
        with httpx.Client(timeout=60) as http:
            answered = 0
            for _ in range(4):
                r = http.post(server.url + "/v1/predict", json=payload, headers={"X-API-Key": key})
                assert r.status_code in (200, 403), r.text
                answered += 7 if r.status_code == 200 else 0
            return answered

    with ThreadPoolExecutor(32) as pool:
        answered = sum(pool.map(client, range(32)))  # 896 queries asked of a 300-query budget
    assert answered == 294  # 42 whole requests of 7 fit; no more were answered
    assert next(k for k in keys.list() if k["id"] == key_id)["used"] == 294


def test_fuzzed_malformed_requests_get_4xx_and_never_break_the_server(served):
    server, keys = served
    _, key = keys.add(budget=10**9)
    rng = random.Random(0)
    good = _images(1)[0].tolist()

    def junk():
        kinds = [
            lambda: {"inputs": rng.choice([None, 1, "x", [], {}, [[]], [1, 2, 3]])},
            lambda: {"inputs": [np.random.default_rng(rng.randrange(99)).random((rng.choice([1, 3]), rng.randrange(1, 40),
                                                                                rng.randrange(1, 40))).tolist()]},
            lambda: {"inputs": [good, [[0.5]]]},  # ragged
            lambda: {"inputs": [[[[rng.choice([2.0, -1.0, 1e300])] * 32] * 32]]},  # out of range
            lambda: {"inputs": [[[["a"] * 32] * 32]]},
            lambda: {"inputs": [[[[True] * 32] * 32]]},
            lambda: {"images": [rng.choice(["", "!!!", base64.b64encode(b"not a png").decode(), 5])]},
            lambda: {"inputs": [good], "images": ["x"]},
            lambda: {"extra": 1},
            lambda: [good],
            lambda: {"inputs": [good] * 65},  # more rows than allowed
        ]
        return rng.choice(kinds)()

    statuses = []
    for i in range(300):
        if i % 10 == 0:  # raw bytes: broken JSON, NaN literals, deep nesting, oversized payloads
            raw = rng.choice([b"{", b"\xff\xfe", b'{"inputs": [[[[NaN]]]]}', b"[" * 5000, b"{}" * 3,
                              b'{"inputs": [' + b"0.5," * 600_000 + b"0.5]}"])
            r = httpx.post(server.url + "/v1/predict", content=raw, timeout=30,
                           headers={"Authorization": f"Bearer {key}", "content-type": "application/json"})
        else:
            r = _post(server, key, junk())
        statuses.append(r.status_code)
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])
        assert "error" in r.json() and "\n" not in r.json()["error"]
    assert {400, 413} <= set(statuses)
    assert _post(server, key, {"inputs": [good]}).status_code == 200  # still serving


def test_knockoff_attack_over_http_spends_the_keys_budget(served, tmp_path, data_root):
    from toolkit.attacks.extract import extract

    server, keys = served
    key_id, key = keys.add(budget=2000)
    result = extract({"kind": "threat", "name": "remote", "attack": "knockoff", "victim": server.url, "budget": 1000,
                      "clone": {"architecture": "lenet5"},
                      "knockoff": {"rounds": 2, "epochs": 8, "query_batch": 100, "surrogate": {"splits": ["val"]}}},
                     out=tmp_path / "remote", data_root=data_root, api_key=key)
    assert result["queries_used"] == 1000 and result["fidelity"] is None
    assert next(k for k in keys.list() if k["id"] == key_id)["used"] == 1000  # the server counted the same queries
    assert result["clone_test_acc"] > 0.3


def test_hard_label_deployment_and_cli_keys(mnist_victim, tmp_path):
    from click.testing import CliRunner

    from cli.main import main
    from toolkit.artifacts import load_deployable
    from toolkit.serve.app import create_app
    from toolkit.serve.keys import KeyStore

    db = tmp_path / "keys.sqlite"
    added = CliRunner().invoke(main, ["keys", "add", "--budget", "50", "--name", "alice", "--db", str(db)])
    assert added.exit_code == 0
    secret = added.stdout.strip().splitlines()[0]
    listed = json.loads(CliRunner().invoke(main, ["keys", "list", "--db", str(db), "--json"]).output)
    assert listed[0]["name"] == "alice" and secret not in json.dumps(listed)
    with Server(create_app(load_deployable(mnist_victim), KeyStore(db), output="hard")) as server:
        r = _post(server, secret, {"inputs": _images(3).tolist()})
        assert r.status_code == 200 and "probabilities" not in r.json() and len(r.json()["labels"]) == 3
    usage = json.loads(CliRunner().invoke(main, ["keys", "usage", "--db", str(db), "--json"]).output)
    assert usage[0]["queries"] == 3 and usage[0]["requests"] == 1
    revoked = CliRunner().invoke(main, ["keys", "revoke", listed[0]["id"], "--db", str(db)])
    assert revoked.exit_code == 0 and KeyStore(db).list()[0]["revoked"] == 1
    assert CliRunner().invoke(main, ["keys", "revoke", "nope", "--db", str(db)]).exit_code == 2


def test_key_database_is_private_and_keys_match_exactly(served, tmp_path):
    import os
    import stat

    from toolkit.serve.keys import KeyStore

    store = KeyStore(tmp_path / "k" / "keys.sqlite")
    store.add(budget=5)
    for path in (tmp_path / "k").iterdir():  # the database and sqlite's -wal / -shm beside it
        assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0, (path, oct(os.stat(path).st_mode))
    server, keys = served
    _, key = keys.add(budget=10)
    body = {"inputs": _images(1).tolist()}
    assert _post(server, key, body).status_code == 200
    for near in (key + "x", key[:-1], " " + key, key.upper()):
        assert _post(server, near, body).status_code == 401, near
    headers = {"Authorization": f"Bearer  {key}"}  # an extra space inside the header is part of the token
    assert httpx.post(server.url + "/v1/predict", headers=headers, json=body, timeout=30).status_code == 401


def test_a_client_leaving_mid_body_is_one_log_line_not_a_traceback(served, caplog):
    import logging

    server, keys = served
    _, key = keys.add(budget=100)
    with caplog.at_level(logging.WARNING):
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall((f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                       "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"inputs\": [").encode())
            time.sleep(0.3)
        for _ in range(50):
            if any("disconnected" in r.getMessage() for r in caplog.records):
                break
            time.sleep(0.1)
    messages = [r.getMessage() for r in caplog.records]
    assert any("disconnected before sending its whole request body" in m for m in messages), messages
    assert not any("Exception in ASGI application" in m for m in messages)
    assert all(r.exc_info is None for r in caplog.records)
    assert keys.remaining(keys.authenticate(key)["id"]) == 100  # nothing was spent
