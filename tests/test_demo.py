"""The web demo's JSON API (ladic.demo): captioning, trajectory, examples, infilling, bad input, concurrency."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from image_fixtures import jpeg_bytes, png_with_header_size

pytest.importorskip("starlette")
pytest.importorskip("httpx")

import httpx  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from ladic.demo import EXAMPLES, RequestCost, create_app, start_in_thread  # noqa: E402

FREE = RequestCost(0.0, 0.0, 0.0)  # skips measuring (a spy model's calls are counted)

TEMPLATE = "two ___ standing on a ___ field"






@pytest.fixture(scope="module")
def astronaut_jpeg() -> bytes:
    import skimage.data

    return jpeg_bytes(Image.fromarray(skimage.data.astronaut()), quality=90)


@pytest.fixture(scope="module")
def client(tiny_model):
    with TestClient(create_app(tiny_model, model_name="tiny", cost=FREE)) as c:
        yield c


def _upload(data: bytes, name: str = "astronaut.jpg", mime: str = "image/jpeg") -> dict:
    return {"file": (name, data, mime)}


# ----------------------------------------------------------------------------- happy paths
def test_caption_real_photo_with_trajectory(client, astronaut_jpeg):
    r = client.post("/api/caption", files=_upload(astronaut_jpeg),
                    data={"steps": "4", "back_and_refine": "false", "seed": "3"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["caption"], str) and body["caption"].strip()
    assert len(body["trajectory"]) == 4 and all(isinstance(s, str) for s in body["trajectory"])
    assert body["trajectory"][-1] == body["caption"]
    assert [s["t"] for s in body["trajectory_steps"]] == [999, 666, 333, 0]
    assert body["candidates"] == [body["caption"]]
    assert body["samples"] == [{"seed": 3, "caption": body["caption"]}]
    assert body["image"] == {"source": "astronaut.jpg", "width": 512, "height": 512}
    assert body["params"]["steps"] == 4 and body["num_evaluations"] == 4
    # same request, same seed -> same caption
    again = client.post("/api/caption", files=_upload(astronaut_jpeg),
                        data={"steps": "4", "back_and_refine": "false", "seed": "3"}).json()
    assert again["caption"] == body["caption"]


def test_back_and_refine_trajectory_has_both_phases(client, astronaut_jpeg):
    body = client.post("/api/caption", files=_upload(astronaut_jpeg), data={"steps": "5", "back_and_refine": "true"}).json()
    assert len(body["trajectory"]) == body["num_evaluations"] > 5
    phases = [s["phase"] for s in body["trajectory_steps"]]
    assert phases.count("refine") == 5 and phases[0] == "denoise" and phases[-1] == "refine"


def test_mbr_candidates_and_several_seeds(client, astronaut_jpeg):
    body = client.post("/api/caption", files=_upload(astronaut_jpeg),
                       data={"steps": "3", "mbr": "3", "samples": "3", "seed": "10"}).json()
    assert len(body["candidates"]) == 3 and body["caption"] in body["candidates"]
    assert [s["seed"] for s in body["samples"]] == [10, 11, 12]
    assert body["samples"][0]["caption"] == body["caption"]
    assert len({s["caption"] for s in body["samples"]}) > 1


def test_length_control(client, astronaut_jpeg):
    r = client.post("/api/caption", files=_upload(astronaut_jpeg), data={"steps": "3", "length": "4"})
    assert r.status_code == 200, r.text
    assert r.json()["params"]["length"] == 4


def test_examples_endpoint_and_captioning_an_example(client):
    ex = client.get("/api/examples").json()["examples"]
    assert [e["name"] for e in ex] == list(EXAMPLES)
    assert {"astronaut", "coffee", "chelsea", "rocket", "motorcycle_left"} <= {e["name"] for e in ex}
    thumb = client.get(ex[-1]["url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256
    assert client.get("/api/examples/nope.jpg").status_code == 404
    r = client.post("/api/caption", data={"example": "coffee", "steps": "2"})
    assert r.status_code == 200 and r.json()["image"]["source"] == "example coffee"


def test_health_config_and_page(client):
    assert client.get("/healthz").json()["status"] == "ok"
    cfg = client.get("/api/config").json()
    assert cfg["limits"]["max_upload_bytes"] == 10 * 2**20 and cfg["defaults"]["steps"] >= 1
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    html = page.text
    assert 'id="file"' in html and 'id="trajectory"' in html and 'id="template"' in html
    for needle in ("src=\"http", "href=\"http", "src='http", "@import", "url(http", "//cdn", "fonts.googleapis"):
        assert needle not in html, f"page loads something from the network: {needle}"


def test_infill_keeps_given_words(client, astronaut_jpeg):
    r = client.post("/api/infill", files=_upload(astronaut_jpeg), data={"template": TEMPLATE, "steps": "4"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["template"] == TEMPLATE
    words = iter(body["caption"].split())
    given = [w for w in TEMPLATE.split() if w != "___"]
    assert all(w in words for w in given), (given, body["caption"])  # given words kept, in order
    r = client.post("/api/infill", data={"example": "chelsea", "template": "a [MASK] sitting on a ___", "steps": "2"})
    assert r.status_code == 200 and r.json()["caption"].startswith("a ")


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("name", "data", "status", "reason"),
    [
        ("zero.jpg", b"", 400, "empty"),
        ("text.jpg", b"this is not a photo\n", 400, "not an image"),
        ("truncated.jpg", None, 400, "truncated or corrupt"),
        ("corrupt.jpg", b"\xff\xd8\xff\xe0" + b"\x13" * 4000, 400, ""),
        ("bomb.png", png_with_header_size(12000, 12000), 413, "too large"),
    ],
)
def test_bad_uploads_give_one_line_errors(client, astronaut_jpeg, name, data, status, reason):
    if data is None:
        data = astronaut_jpeg[: len(astronaut_jpeg) // 2]
    r = client.post("/api/caption", files=_upload(data, name), data={"steps": "2"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err.startswith(f"{name}: ") and reason in err and "\n" not in err


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("steps", "0", "steps must be between 1 and 1000"),
        ("steps", "1001", "steps must be between 1 and 1000"),
        ("steps", "five", "steps must be a whole number"),
        ("mbr", "-1", "mbr must be between 1"),
        ("mbr", "0", "mbr must be between 1"),
        ("guidance", "inf", "guidance must be between"),
        ("guidance", "-0.5", "guidance must be between"),
        ("seed", "-3", "seed must be between"),
        ("samples", "99", "samples must be between"),
        ("length", "999", "length must be between"),
        ("back_and_refine", "perhaps", "back_and_refine must be true or false"),
        ("example", "unicorn", "unknown example"),
    ],
)
def test_out_of_range_params_are_400(client, field, value, needle):
    data = {"example": "coffee", field: value}
    r = client.post("/api/caption", data=data)
    assert r.status_code == 400 and needle in r.json()["error"], r.text


def test_no_image_or_both_is_400(client, astronaut_jpeg):
    r = client.post("/api/caption", data={"steps": "2"})
    assert r.status_code == 400 and "no image" in r.json()["error"]
    r = client.post("/api/caption", files=_upload(astronaut_jpeg), data={"example": "coffee"})
    assert r.status_code == 400 and "not both" in r.json()["error"]


@pytest.mark.parametrize("template", [None, "", "   ", "\t\n"])
def test_empty_infill_template_is_400(client, template):
    data = {"example": "coffee"} if template is None else {"example": "coffee", "template": template}
    r = client.post("/api/infill", data=data)
    assert r.status_code == 400 and "infill template is empty" in r.json()["error"]


def test_infill_template_without_blank_is_400(client):
    r = client.post("/api/infill", data={"example": "coffee", "template": "a dog on grass"})
    assert r.status_code == 400 and "blank" in r.json()["error"]


def test_oversize_upload_refused(client, tiny_model, astronaut_jpeg):
    big = b"\xff\xd8" + b"\0" * (11 * 2**20)
    r = client.post("/api/caption", files=_upload(big, "big.jpg"))
    assert r.status_code == 413 and "upload too large" in r.json()["error"] and "10.0 MB limit" in r.json()["error"]
    # the limit is configurable
    small = TestClient(create_app(tiny_model, max_upload_bytes=len(astronaut_jpeg) // 2, cost=FREE))
    r = small.post("/api/caption", files=_upload(astronaut_jpeg))
    assert r.status_code == 413 and "upload too large" in r.json()["error"]
    assert small.get("/api/config").json()["limits"]["max_upload_bytes"] == len(astronaut_jpeg) // 2


MULTIPART_HEAD = (
    b"--zzz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jpg\"\r\n"
    b"Content-Type: image/jpeg\r\n\r\n\xff\xd8"
)


def _chunked_upload(total_chunks: int):
    """A multipart upload streamed in 64 kB chunks without Content-Length (chunked transfer)."""
    yield MULTIPART_HEAD
    for _ in range(total_chunks):
        yield b"\0" * 65536
    yield b"\r\n--zzz--\r\n"


def test_oversize_streamed_body_refused_without_content_length(tiny_model):
    with TestClient(create_app(tiny_model, max_upload_bytes=100_000, cost=FREE)) as c:
        r = c.post("/api/caption", content=_chunked_upload(64),
                   headers={"content-type": "multipart/form-data; boundary=zzz"})
    assert r.status_code == 413 and r.json()["error"] == "upload too large (over the 0.1 MB limit)"


def test_decode_limit_is_configurable(tiny_model, astronaut_jpeg):
    c = TestClient(create_app(tiny_model, max_pixels=100_000, cost=FREE))
    r = c.post("/api/caption", files=_upload(astronaut_jpeg))
    assert r.status_code == 413 and "image too large (512x512" in r.json()["error"]


# ----------------------------------------------------------------------------- live server
class SpyModel:
    """Delegates to the model; records how many generate() calls overlap."""

    def __init__(self, model, delay: float = 0.0) -> None:
        self._model, self.delay = model, delay
        self.active = self.max_active = self.calls = 0
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._model, name)

    def generate(self, *args, **kwargs):
        with self._lock:
            self.active += 1
            self.calls += 1
            self.max_active = max(self.max_active, self.active)
        try:
            time.sleep(self.delay)
            return self._model.generate(*args, **kwargs)
        finally:
            with self._lock:
                self.active -= 1


def test_twenty_concurrent_requests_against_a_live_server(tiny_model, astronaut_jpeg):
    spy = SpyModel(tiny_model, delay=0.005)
    n = 20
    barrier = threading.Barrier(n)
    with start_in_thread(create_app(spy, cost=FREE)) as server, httpx.Client(base_url=server.url, timeout=120) as http:
        assert server.port > 0 and http.get("/healthz").json()["status"] == "ok"

        def one(i: int):
            barrier.wait(30)
            if i % 2:
                return http.post("/api/caption", data={"example": "rocket", "steps": "2", "seed": str(i)})
            return http.post("/api/caption", files=_upload(astronaut_jpeg), data={"steps": "2", "seed": str(i)})

        with ThreadPoolExecutor(n) as pool:
            responses = list(pool.map(one, range(n)))
        assert [r.status_code for r in responses] == [200] * n, [r.text for r in responses if r.status_code != 200]
        bodies = [r.json() for r in responses]
        assert all(b["caption"] and len(b["trajectory"]) == b["num_evaluations"] for b in bodies)
        assert spy.calls == n and spy.max_active == 1  # model calls were serialised
        # a concurrent answer equals the serial answer for the same input and seed
        serial = http.post("/api/caption", files=_upload(astronaut_jpeg), data={"steps": "2", "seed": "4"}).json()
        assert serial["caption"] == bodies[4]["caption"]


def test_model_runs_off_the_event_loop(tiny_model):
    spy = SpyModel(tiny_model, delay=2.0)
    with start_in_thread(create_app(spy, cost=FREE)) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(http.post, "/api/caption", data={"example": "coffee", "steps": "1"})
            while spy.active == 0 and not slow.done():
                time.sleep(0.01)
            t0 = time.perf_counter()
            health = http.get("/healthz").json()
            took = time.perf_counter() - t0
            assert health["busy"] is True and took < 1.5, took
            assert slow.result().status_code == 200


def test_live_server_refuses_oversize_upload_with_a_message(tiny_model):
    with start_in_thread(create_app(tiny_model, max_upload_bytes=2**20, cost=FREE)) as server:
        r = httpx.post(server.url + "/api/caption", files=_upload(b"\0" * (3 * 2**20), "big.jpg"), timeout=60)
        assert r.status_code == 413 and r.json()["error"] == "upload too large (3.0 MB > 1.0 MB limit)"
        # streamed without Content-Length: refused once the limit is crossed
        r = httpx.post(server.url + "/api/caption", content=_chunked_upload(48), timeout=60,
                       headers={"content-type": "multipart/form-data; boundary=zzz"})
        assert r.status_code == 413 and r.json()["error"] == "upload too large (over the 1.0 MB limit)"
        assert httpx.get(server.url + "/healthz").status_code == 200


# ----------------------------------------------------------------------------- bounded cost, line, cancellation
def test_request_cost_is_bounded_and_estimated(tiny_model):
    cost = RequestCost(encode_s=0.1, per_evaluation_s=0.01, per_row_s=0.0)
    c = TestClient(create_app(tiny_model, cost=cost, max_request_seconds=1.0))
    cfg = c.get("/api/config").json()
    assert cfg["limits"]["request_seconds"] == 1.0 and cfg["cost"]["per_evaluation_s"] == 0.01
    est = c.get("/api/estimate", params={"steps": "50", "back_and_refine": "false"}).json()
    assert est == {"seconds": 0.6, "limit_s": 1.0, "allowed": True}
    est = c.get("/api/estimate", params={"steps": "50", "samples": "2", "back_and_refine": "false"}).json()
    assert est["seconds"] == 1.1 and est["allowed"] is False
    r = c.post("/api/caption", data={"example": "coffee", "steps": "50", "samples": "2", "back_and_refine": "false"})
    assert r.status_code == 400
    assert r.json()["error"] == ("this request would take about 1.1 s on this machine, over the 1 s limit: "
                                 "lower steps, MBR candidates or captions")
    assert c.get("/api/estimate", params={"steps": "0"}).status_code == 400
    r = c.post("/api/caption", data={"example": "coffee", "steps": "5", "back_and_refine": "false"})
    assert r.status_code == 200 and r.json()["num_evaluations"] == 5


def test_measured_cost_predicts_a_request(tiny_model):
    from ladic.demo import measure_cost

    cost = measure_cost(tiny_model, repeats=1)
    assert cost.encode_s > 0 and cost.per_evaluation_s + cost.per_row_s > 0
    c = TestClient(create_app(tiny_model, cost=cost, max_request_seconds=60))
    est = c.get("/api/estimate", params={"steps": "8", "mbr": "4", "back_and_refine": "false"}).json()
    took = c.post("/api/caption", data={"example": "coffee", "steps": "8", "mbr": "4", "back_and_refine": "false"})
    assert took.status_code == 200 and est["seconds"] > 0 and took.json()["num_evaluations"] == 8


def _raw_post(url: str, fields: dict[str, str]):
    """Send a form POST on a raw socket (so the test can hang up mid-request); returns the socket."""
    import socket
    from urllib.parse import urlencode, urlparse

    u = urlparse(url)
    body = urlencode(fields).encode()
    sock = socket.create_connection((u.hostname, u.port), timeout=30)
    sock.sendall(b"POST /api/caption HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


def _answers(url: str) -> bool:
    try:
        return httpx.get(url).status_code == 200
    except httpx.TransportError:
        return False


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


LONG = {"example": "coffee", "steps": "1000", "mbr": "16", "samples": "8", "request_id": "long-one"}  # minutes


def test_long_request_is_cancelled_on_disconnect_and_the_next_is_answered(tiny_model):
    app = create_app(tiny_model, cost=FREE, max_request_seconds=3600)
    with start_in_thread(app) as server, httpx.Client(base_url=server.url, timeout=120) as http:
        sock = _raw_post(server.url, LONG)
        _wait_for(lambda: http.get("/api/queue/long-one").json()["running"])
        with ThreadPoolExecutor(1) as pool:
            second = pool.submit(http.post, "/api/caption",
                                 data={"example": "rocket", "steps": "2", "request_id": "second"})
            _wait_for(lambda: http.get("/api/queue/second").json()["position"] == 1)  # waits behind the long one
            health = http.get("/healthz").json()
            assert health["busy"] is True and health["waiting"] == 1 and health["cancelled"] == 0
            sock.close()  # the long request's client goes away
            r = second.result(timeout=60)
        assert r.status_code == 200 and r.json()["caption"] and r.json()["request_id"] == "second"
        health = http.get("/healthz").json()
        assert health["cancelled"] == 1 and health["busy"] is False
        assert http.get("/api/queue/long-one").json()["position"] is None


def test_full_line_is_refused_and_request_ids_are_checked(tiny_model):
    app = create_app(tiny_model, cost=FREE, max_request_seconds=3600, max_waiting=0)
    with start_in_thread(app) as server, httpx.Client(base_url=server.url, timeout=120) as http:
        sock = _raw_post(server.url, LONG)
        _wait_for(lambda: http.get("/api/queue/long-one").json()["running"])
        r = http.post("/api/caption", data={"example": "rocket", "steps": "2"})
        assert r.status_code == 503 and r.json()["error"] == "the demo is busy (0 requests waiting): try again shortly"
        r = http.post("/api/caption", data={"example": "rocket", "steps": "2", "request_id": "long-one"})
        assert r.status_code == 400 and "already in line" in r.json()["error"]
        r = http.post("/api/caption", data={"example": "rocket", "request_id": "../etc"})
        assert r.status_code == 400 and "request_id must be" in r.json()["error"]
        sock.close()
        _wait_for(lambda: http.get("/healthz").json()["cancelled"] == 1)


def test_sigterm_stops_a_busy_demo(tiny_model, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    tiny_model.save_pretrained(tmp_path / "tiny")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ladic.cli", "demo", "--model", str(tmp_path / "tiny"), "--port", "0",
         "--max-request-seconds", "86400"],  # LONG is estimated near 3,600 s
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("LaDiC demo on http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        url = line.split()[3].rstrip("/")
        _wait_for(lambda: _answers(url + "/healthz"), timeout=180)
        sock = _raw_post(url, LONG)
        _wait_for(lambda: httpx.get(url + "/api/queue/long-one").json()["running"], timeout=180)
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)  # the long request alone would run for minutes
        print(f"exited {time.perf_counter() - t0:.2f} s after SIGTERM")
        sock.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert proc.returncode in (0, -signal.SIGTERM) and "Traceback" not in err, err  # uvicorn re-raises the signal
    assert "stopping: cancelled the requests in progress" in err
