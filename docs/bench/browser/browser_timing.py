"""Issue 30: the shipped default captioning inside Chromium (onnxruntime-web, WASM, one thread), from a static folder.

python docs/bench/browser/browser_timing.py OUT.json
Exports the default model with `ladic export ... --onnx --web` (fp32 and --int8), serves each folder with Python's
http.server, opens it in Debian's Chromium (Playwright), waits for the model (cached by the browser after the first
load), captions the first 10 Flickr8k val photos one by one and records the page's own time per photo
(decode + preprocess + encode + caption, as the page reports it) and the megabytes (10^6 bytes) of the four files the page
fetches (settings, vocabulary, the two graphs). No GPU flag: the page runs on WebAssembly.
"""
import json
import re
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from playwright.sync_api import sync_playwright

from ladic.captioner import default_model_path
from ladic.data.captions import load_flickr8k

photos = [r.image_path for r in load_flickr8k("val")[:10]]
rows = []
warm = sys.argv[2].split(",") if len(sys.argv) > 2 else ["15"]  # warm-up calls at load (the page's ?warmup=)
for (variant, flags), calls in [(v, c) for v in (("fp32", []), ("int8", ["--int8"])) for c in warm]:
    out = Path(f"/tmp/ladic-web-{variant}")
    subprocess.run(["ladic", "export", str(default_model_path()), str(out), "--onnx", "--web", *flags], check=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(out)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                    args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        t0 = time.perf_counter()
        page.goto(f"http://127.0.0.1:{server.server_port}/index.html?warmup={calls}")
        page.wait_for_selector("body[data-ready='1']", timeout=300_000)
        load_s = time.perf_counter() - t0
        times, stages = [], []
        for i, photo in enumerate(photos, 1):
            page.set_input_files("#file", photo)
            page.wait_for_selector(f"body[data-captioned='{i}']", timeout=120_000)
            line = page.inner_text("#timing")
            times.append(float(line.split()[0]))
            stages.append([int(x) for x in re.findall(r"(?:photo|encoder|captioner) (\d+)", line)])
        caption = page.inner_text("#caption")
        browser.close()
    server.shutdown()
    fetched = ("onnx_config.json", "vocab.json", "image_encoder.onnx", "captioner.onnx")  # what the page downloads
    size = sum((out / "model" / f).stat().st_size for f in fetched)
    rows.append({"variant": variant, "warm_up_calls": int(calls), "model_mb": round(size / 1e6, 2),
                 "wasm_mb": round((out / "ort" / "ort-wasm-simd-threaded.wasm").stat().st_size / 2**20, 1),
                 "load_s": round(load_s, 1), "ms_per_photo": times, "median_ms": sorted(times)[len(times) // 2],
                 "photo_encoder_captioner_ms": stages,
                 "last_caption": caption})
    print(json.dumps(rows[-1]), flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
