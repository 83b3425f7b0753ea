"""The demo page in a real browser: Debian's Chromium driven by Playwright (never `playwright install`).

Skipped only where the playwright package or Chromium is missing (``./install.sh --test`` installs both).
"""

from __future__ import annotations

import io
import os

import pytest
from PIL import Image

CHROMIUM = os.environ.get("LADIC_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is not installed (pip install -c constraints.txt playwright)"
)
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"Chromium not installed at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

from ladic.demo import create_app, start_in_thread  # noqa: E402

STEPS = 6


@pytest.fixture(scope="module")
def server(tiny_model):
    with start_in_thread(create_app(tiny_model, model_name="tiny test model")) as srv:
        yield srv


@pytest.fixture(scope="module")
def playwright():
    with sync_api.sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def page(playwright):
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    try:
        pg = browser.new_page(viewport={"width": 1280, "height": 1000})
        pg.set_default_timeout(30_000)
        yield pg
    finally:
        browser.close()


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    import skimage.data

    path = tmp_path_factory.mktemp("photos") / "astronaut.jpg"
    Image.fromarray(skimage.data.astronaut()).save(path, format="JPEG", quality=90)
    return path


def test_upload_caption_trajectory_infill_and_screenshot(server, page, photo, tmp_path):
    failed_requests = []
    page.on("requestfailed", lambda req: failed_requests.append(req.url))
    page.goto(server.url + "/")
    page.wait_for_selector("#examples button[data-example='astronaut']")
    assert page.locator("#examples button").count() == 5
    assert page.input_value("#steps") != ""  # controls filled from /api/config

    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#caption-btn:not([disabled])")
    page.fill("#steps", str(STEPS))
    page.uncheck("#bnr")
    page.fill("#mbr", "3")
    page.fill("#samples", "2")
    with page.expect_response("**/api/caption") as resp_info:
        page.click("#caption-btn")
    response = resp_info.value
    assert response.status == 200
    body = response.json()
    page.wait_for_selector("#trajectory[data-done='1']")

    assert page.inner_text("#caption").strip() == body["caption"] and body["caption"].strip()
    lines = page.locator("#trajectory li.step")
    assert lines.count() == STEPS == len(body["trajectory"])
    for i in range(STEPS):
        assert body["trajectory"][i] in lines.nth(i).inner_text()
    assert page.locator("#candidates li").count() == 3
    assert page.locator("#samples-list li").count() == 2
    assert page.inner_text("#error").strip() == ""

    page.fill("#template", "two ___ standing on a ___ field")
    with page.expect_response("**/api/infill") as infill_info:
        page.click("#infill-btn")
    assert infill_info.value.status == 200
    page.wait_for_selector("#infill-result:not(:empty)")
    result = page.inner_text("#infill-result")
    assert "standing" in result and "field" in result

    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    assert Image.open(io.BytesIO(data)).size[0] == 1280
    assert not [u for u in failed_requests if not u.startswith(server.url)]  # nothing outside the demo


def test_bad_upload_shows_the_error_line(server, page, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not a photo\n")
    page.goto(server.url + "/")
    page.wait_for_selector("#examples button")
    page.set_input_files("#file", str(bad))
    with page.expect_response("**/api/caption") as resp_info:
        page.click("#caption-btn")
    assert resp_info.value.status == 400
    page.wait_for_selector("#error:not(:empty)")
    assert page.inner_text("#error").strip() == "notes.jpg: not an image (cannot identify image file)"


def _until(predicate, timeout: float = 30.0) -> None:
    """Poll from Python (the page's CSP forbids the eval that wait_for_function needs)."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_page_shows_the_limit_and_estimate(server, page):
    page.goto(server.url + "/")
    page.wait_for_selector("#examples button")
    assert "limited to about 5 s" in page.inner_text("#model-name")
    _until(lambda: page.inner_text("#estimate").startswith("Estimated"))
    page.fill("#steps", "1000")
    page.fill("#mbr", "16")
    page.fill("#samples", "8")
    page.wait_for_selector("#estimate.over")
    assert "lower steps, MBR candidates or captions" in page.inner_text("#estimate")
    page.click("#examples button[data-example='coffee']")
    with page.expect_response("**/api/caption") as resp_info:
        page.click("#caption-btn")
    assert resp_info.value.status == 400
    page.wait_for_selector("#error:not(:empty)")
    assert "over the 5 s limit" in page.inner_text("#error")


def test_stop_button_cancels_the_work_on_the_server(tiny_model, page):
    import httpx

    from ladic.demo import RequestCost

    app = create_app(tiny_model, cost=RequestCost(0.0, 0.0, 0.0), max_request_seconds=3600)
    with start_in_thread(app) as srv:
        page.goto(srv.url + "/")
        page.wait_for_selector("#examples button[data-example='coffee']")
        page.click("#examples button[data-example='coffee']")
        page.fill("#steps", "1000")
        page.fill("#mbr", "16")
        page.fill("#samples", "8")
        page.click("#caption-btn")
        page.wait_for_selector("#stop-btn:not([hidden])")
        _until(lambda: page.inner_text("#status") == "Denoising…")
        page.click("#stop-btn")
        _until(lambda: page.inner_text("#status") == "Stopped.")

        def cancelled() -> bool:
            health = httpx.get(srv.url + "/healthz").json()
            return health["cancelled"] == 1 and not health["busy"]

        _until(cancelled)
        assert page.inner_text("#error").strip() == ""


@pytest.fixture(scope="module")
def onnx_case(tmp_path_factory):
    """A tiny one-step model exported to ONNX with a fixed noise file, a photo, and ONNX Runtime's caption of it."""
    import torch

    from ladic import LaDiC, preset
    from ladic.onnx_export import OnnxCaptioner, export_onnx, web_runtime_dir

    if web_runtime_dir() is None:
        pytest.skip("onnxruntime-web not installed (./install.sh --test installs it with npm)")
    tmp = tmp_path_factory.mktemp("onnx_case")
    torch.manual_seed(0)
    model = LaDiC(preset("tiny", num_inference_steps=1, back_and_refine=False, length_conditioning=True)).eval()
    export_onnx(model, tmp / "onnx")
    noise = torch.randn(1, model.config.max_length, model.text.dim)
    noise.numpy().astype("<f4").tofile(tmp / "onnx" / "noise.bin")
    import skimage.data

    photo = tmp / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).resize((300, 200)).save(photo)
    runtime = OnnxCaptioner(tmp / "onnx")
    tokens = runtime.image_encoder.encode([Image.open(photo).convert("RGB")])
    ids = runtime.captioner.run(["ids"], {"tokens": tokens.numpy(), "noise": noise.numpy()})[0]
    return model, tmp / "onnx", photo, ids, runtime.decode(ids[0].tolist())


def _caption_in_page(page, onnx_case, tmp_path, query: str = "") -> list[str]:
    """Open /local/ on a demo over ``onnx_case``, caption its photo, then a file that is not a photo; returns the
    URLs requested outside the local server."""
    from ladic.demo import RequestCost

    model, onnx_dir, photo, _, expected = onnx_case
    outside = []
    page.on("request", lambda req: outside.append(req.url) if not req.url.startswith(("http://127.0.0.1", "blob:", "data:")) else None)
    with start_in_thread(create_app(model, cost=RequestCost(0.0, 0.0, 0.0), onnx_dir=onnx_dir)) as srv:
        page.goto(srv.url + "/local/?noise=model/noise.bin" + query)
        page.wait_for_selector("body[data-ready='1']", timeout=120_000)
        page.set_input_files("#file", str(photo))
        page.wait_for_selector("body[data-captioned='1']", timeout=120_000)
        assert page.inner_text("#caption").strip() == expected and expected
        assert page.inner_text("#error").strip() == ""
        bad = tmp_path / "notes.jpg"
        bad.write_text("this is not a photo\n")
        page.set_input_files("#file", str(bad))
        page.wait_for_selector("#error:not(:empty)")
        assert page.inner_text("#error").strip() == "notes.jpg: not an image (the browser cannot decode it)"
    return outside


def test_in_browser_captioning_equals_python(tmp_path, page, onnx_case):
    """/local/: the one-step model exported to ONNX runs inside the page (ONNX Runtime Web; WASM in a browser without
    a GPU adapter); for a fixed photo and noise its caption equals ONNX Runtime's in Python; a file that is not a photo
    gets its error line; nothing is fetched from outside the local server."""
    import numpy as np

    assert _caption_in_page(page, onnx_case, tmp_path) == []
    assert page.get_attribute("body", "data-backend") == "wasm"
    assert "WebAssembly" in page.inner_text("#timing") or page.inner_text("#timing") == ""
    model, _, _, ids, _ = onnx_case
    assert np.array_equal(ids[0, :1], [model.text.tokenizer.cls_token_id])


def test_in_browser_captioning_on_webgpu(tmp_path, playwright, onnx_case):
    """The same page in a Chromium with a WebGPU adapter (SwiftShader, Chromium's software GPU): it picks WebGPU,
    and its caption for the fixed photo and noise equals Python's."""
    args = [a for a in CHROMIUM_ARGS if a != "--disable-gpu"] + [
        "--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader", "--enable-unsafe-swiftshader"]
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
    try:
        pg = browser.new_page()
        pg.set_default_timeout(60_000)
        assert _caption_in_page(pg, onnx_case, tmp_path, "&warmup=2") == []  # few warm-up calls: SwiftShader is slow
        backend = pg.get_attribute("body", "data-backend")
        adapter = pg.evaluate("async () => !!(navigator.gpu && await navigator.gpu.requestAdapter())")
    finally:
        browser.close()
    if not adapter:
        pytest.skip("this Chromium offers no WebGPU adapter, even SwiftShader's")
    assert backend == "webgpu"
