"""``ladic demo``: a local web page for captioning, step-by-step denoising and infilling.

Design choice: a small Starlette app (served by uvicorn) plus one plain HTML+JS page
(``assets/demo/index.html``), not Gradio. Reasons:

* Light: starlette, uvicorn and python-multipart are a few hundred kB of pure Python
  with no transitive heavy dependencies; Gradio pulls in pandas/pydantic/fastapi/
  huggingface tooling, a large front-end bundle and (by default) reaches the network
  for analytics, fonts and version checks.
* Offline by construction: the page has no CDN scripts, web fonts or external images,
  and its Content-Security-Policy forbids loading any (``default-src 'self'``).
* The JSON API is the product: the page only calls ``/api/...`` endpoints, so tests
  (and scripts) exercise exactly what the page uses.
* Full control over bad input: upload size limits enforced while the body streams in,
  decode errors as one-line ``ImageLoadError`` messages with 400/413, parameter checks.

Endpoints (all errors are JSON ``{"error": "<one line>"}``):

``GET /``                 the page
``GET /healthz``          ``{"status": "ok", ...}``
``GET /api/config``       defaults and limits (the page fills its controls from it)
``GET /api/examples``     ``{"examples": [{"name", "url", "width", "height"}]}``
``GET /api/examples/{name}.jpg``  thumbnail of a sample photo (scikit-image)
``POST /api/caption``     form (multipart or urlencoded): ``file`` (upload) or ``example``
                          (name), ``steps``, ``guidance``, ``seed``, ``back_and_refine``,
                          ``mbr``, ``length``, ``samples`` ->
                          ``{"caption", "trajectory", "trajectory_steps", "candidates",
                          "samples", "num_evaluations", "params", "image", "elapsed_s"}``
``POST /api/infill``      the same plus ``template`` ("two ___ standing on a ___ field")

The denoising trajectory comes from ``LaDiC.generate(..., return_trajectory=True)`` in
one call; the page reveals it step after step (a live view of the denoising). Streaming
each step as it is computed would need a per-step hook in ``generate``.

``GET /local/``            the same captioner inside the browser (ONNX Runtime Web; ``assets/web``), with
                          ``/local/ort/*`` (onnxruntime-web) and ``/local/model/*`` (the ONNX export)
``GET /api/estimate``     the same fields as a query -> ``{"seconds", "limit_s", "allowed"}``
``GET /api/queue/{id}``   where the request sent with ``request_id=id`` stands in line

Every request is bounded: what one denoiser evaluation costs on this machine is measured at
start-up (``measure_cost``), a request whose estimate exceeds ``max_request_seconds`` is
refused before it runs, and one that overruns (twice the limit) is stopped. Model calls run
in the threadpool (never on the event loop), one at a time, first come first served; the
others wait in a bounded line (``/api/queue`` gives their position, the page shows it), and
``/healthz`` stays responsive meanwhile. A request whose client disconnects is cancelled at
its next denoising step, waiting or running; on SIGTERM every request is cancelled and the
server exits within about a second.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import logging
import math
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ladic.image_io import MAX_PIXELS_DEFAULT, ImageLoadError, load_image

__all__ = [
    "DEFAULT_MAX_REQUEST_SECONDS",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "EXAMPLES",
    "RequestCost",
    "RunningServer",
    "create_app",
    "measure_cost",
    "serve",
    "start_in_thread",
]

log = logging.getLogger("ladic.demo")

DEFAULT_MAX_UPLOAD_BYTES = 10 * 2**20
"""Largest accepted image upload (bytes)."""

FORM_OVERHEAD_BYTES = 64 * 2**10
"""Room for the other form fields and multipart boundaries on top of the image."""

MAX_STEPS = 1000
MAX_MBR = 16
MAX_SAMPLES = 8
MAX_GUIDANCE = 50.0
MAX_SEED = 2**63 - 1
MAX_TEMPLATE_CHARS = 500
DEFAULT_MAX_REQUEST_SECONDS = 5.0
"""A request estimated to take longer on this machine is refused; one that runs twice as long is stopped."""
DEFAULT_MAX_WAITING = 32
"""Requests that may wait in line behind the running one; more are refused with 503."""
_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _motorcycle_left(data: Any) -> Any:
    return data.stereo_motorcycle()[0]


EXAMPLES: dict[str, Callable[[Any], Any]] = {
    "astronaut": lambda d: d.astronaut(),
    "coffee": lambda d: d.coffee(),
    "chelsea": lambda d: d.chelsea(),
    "rocket": lambda d: d.rocket(),
    "motorcycle_left": _motorcycle_left,
}
"""Sample photos shipped with scikit-image (no network): name -> loader(skimage.data)."""

_THUMB_SIDE = 256
_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self' 'unsafe-inline'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)


# The in-browser page compiles WebAssembly (ONNX Runtime Web): 'wasm-unsafe-eval', nothing else more.
_LOCAL_CSP = _CSP.replace("script-src 'self' 'unsafe-inline'", "script-src 'self' 'wasm-unsafe-eval'")
_LOCAL_FILES = {"app.mjs", "preprocess.mjs"}
_MEDIA = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm", ".json": "application/json",
          ".onnx": "application/octet-stream", ".bin": "application/octet-stream", ".html": "text/html"}
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class DemoInputError(Exception):
    """A request the demo refuses; ``message`` is one line shown to the user."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.message = " ".join(str(message).split())
        self.status_code = status_code


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


# ---------------------------------------------------------------------------- upload limit
class _BodyTooLarge(HTTPException):
    def __init__(self, detail: str) -> None:
        super().__init__(status_code=413, detail=detail)


class UploadLimitMiddleware:
    """Refuse request bodies over ``max_body_bytes`` with 413, without buffering them.

    A declared ``Content-Length`` over the limit is refused before the app runs; a body
    that turns out larger while streaming (chunked, or a lying header) is refused as
    soon as the limit is crossed. The rest of the body is read and discarded (up to
    ``drain_bytes``) so that the client sees the 413 rather than a reset connection.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_upload_bytes: int, drain_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes
        self.drain_bytes = drain_bytes

    async def _drain(self, receive: Receive) -> None:
        drained = 0
        while drained <= self.drain_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            drained += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = None
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
        limit = _megabytes(self.max_upload_bytes)
        if declared is not None and declared > self.max_body_bytes:
            await self._drain(receive)
            response = JSONResponse(
                {"error": f"upload too large ({_megabytes(declared)} > {limit} limit)"}, status_code=413,
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    if message.get("more_body", False):
                        await self._drain(receive)
                    raise _BodyTooLarge(f"upload too large (over the {limit} limit)")
            return message

        await self.app(scope, limited_receive, send)


# ---------------------------------------------------------------------------- parameters
_TRUE = frozenset({"1", "true", "on", "yes"})
_FALSE = frozenset({"0", "false", "off", "no"})


def _field(form: Mapping[str, Any], name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise DemoInputError(f"{name} must be a plain form field, not a file")
    value = value.strip()
    return value or None


def _int_field(form: Mapping[str, Any], name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = _field(form, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise DemoInputError(f"{name} must be a whole number, got {raw[:40]!r}") from None
    if not lo <= value <= hi:
        raise DemoInputError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _float_field(form: Mapping[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    raw = _field(form, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise DemoInputError(f"{name} must be a number, got {raw[:40]!r}") from None
    if not math.isfinite(value) or not lo <= value <= hi:
        raise DemoInputError(f"{name} must be between {lo:g} and {hi:g}, got {raw[:40]}")
    return value


def _bool_field(form: Mapping[str, Any], name: str, default: bool) -> bool:
    raw = _field(form, name)
    if raw is None:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise DemoInputError(f"{name} must be true or false, got {raw[:40]!r}")


@dataclass
class SamplingParams:
    steps: int
    guidance: float
    seed: int
    back_and_refine: bool
    mbr: int
    length: int | None
    samples: int


# ---------------------------------------------------------------------------- cost and line
@dataclass(frozen=True)
class RequestCost:
    """What a request costs on this machine (seconds), measured by ``measure_cost``.

    ``samples`` captions of ``evaluations`` denoiser evaluations each, over ``rows`` latents per evaluation (the MBR
    candidates, twice that with classifier-free guidance), take about
    ``encode_s + samples * evaluations * (per_evaluation_s + per_row_s * rows)``.
    """

    encode_s: float
    per_evaluation_s: float
    per_row_s: float

    def seconds(self, samples: int, evaluations: int, rows: int) -> float:
        return self.encode_s + samples * evaluations * (self.per_evaluation_s + self.per_row_s * rows)


def measure_cost(model: Any, repeats: int = 3) -> RequestCost:
    """Time the image encoder and 4-step captions of 1 and 8 rows on a grey photo (best of ``repeats``)."""
    import torch

    image = Image.new("RGB", (320, 240), (128, 128, 128))

    def best(fn: Callable[[], Any]) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    encoded: list[torch.Tensor] = []  # the timed calls' output, captioned below
    with torch.no_grad():
        encode_s = best(lambda: encoded.append(model.image_encoder.encode([image])))
    feats = encoded[0]
    steps = 4

    def per_evaluation(rows: int) -> float:
        return best(lambda: model.generate(feats, num_inference_steps=steps, guidance_scale=0.0, back_and_refine=False,
                                           mbr_candidates=rows, return_trajectory=True)) / steps

    per_evaluation(1)  # warm-up
    one, eight = per_evaluation(1), per_evaluation(8)
    per_row = max(0.0, (eight - one) / 7)
    return RequestCost(encode_s=encode_s, per_evaluation_s=max(0.0, one - per_row), per_row_s=per_row)


class _Job:
    """One request in line; ``cancel`` makes it leave the line, or stop at its next denoising step."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.reason: str | None = None
        self._cancelled = threading.Event()

    def cancel(self, reason: str) -> None:
        if not self._cancelled.is_set():
            self.reason = reason
            self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class _Cancelled(Exception):
    pass


class JobQueue:
    """First come, first served: the first job runs the model, at most ``max_waiting`` others wait behind it."""

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self.cancelled = 0
        self._jobs: list[_Job] = []
        self._cond = threading.Condition()

    def join(self, request_id: str) -> _Job:
        with self._cond:
            if any(job.request_id == request_id for job in self._jobs):
                raise DemoInputError(f"request_id {request_id!r} is already in line")
            if len(self._jobs) > self.max_waiting:
                raise DemoInputError(f"the demo is busy ({len(self._jobs) - 1} requests waiting): try again shortly", 503)
            job = _Job(request_id)
            self._jobs.append(job)
            return job

    def position(self, request_id: str) -> int | None:
        """0: running, n: n requests ahead; None: not in line."""
        with self._cond:
            return next((i for i, job in enumerate(self._jobs) if job.request_id == request_id), None)

    def status(self) -> tuple[bool, int]:
        """(a job is running, how many wait)."""
        with self._cond:
            return bool(self._jobs), max(0, len(self._jobs) - 1)

    def run(self, job: _Job, work: Callable[[], Any]) -> Any:
        """Wait for ``job``'s turn (in a worker thread), run ``work``, leave the line. Raises ``_Cancelled``."""
        try:
            with self._cond:
                while self._jobs[0] is not job and not job.cancelled:
                    self._cond.wait(0.1)
            if job.cancelled:
                raise _Cancelled
            return work()
        except _Cancelled:
            with self._cond:
                self.cancelled += 1
            raise
        finally:
            with self._cond:
                self._jobs.remove(job)
                self._cond.notify_all()

    def cancel_all(self, reason: str) -> int:
        with self._cond:
            for job in self._jobs:
                job.cancel(reason)
            return len(self._jobs)


# ---------------------------------------------------------------------------- the app
class _Demo:
    def __init__(self, model: Any, *, max_upload_bytes: int, max_pixels: int, model_name: str,
                 max_request_seconds: float, max_waiting: int, cost: RequestCost, onnx_dir: Path | None,
                 ort_dir: Path | None) -> None:
        self.model = model
        self.onnx_dir, self.ort_dir = onnx_dir, ort_dir
        self.max_upload_bytes = max_upload_bytes
        self.max_pixels = max_pixels
        self.model_name = model_name
        self.max_request_seconds = max_request_seconds
        self.cost = cost
        self.queue = JobQueue(max_waiting)
        self._examples: dict[str, Image.Image] = {}
        self._thumbs: dict[str, bytes] = {}
        self._examples_lock = threading.Lock()
        cfg = model.config
        self.max_steps = min(MAX_STEPS, int(model.diffusion.num_timesteps))
        self.max_length_tokens = int(cfg.max_length) - 2
        self.defaults = {
            "steps": int(cfg.num_inference_steps),
            "guidance": float(cfg.guidance_scale),
            "seed": 0,
            "back_and_refine": bool(cfg.back_and_refine),
            "mbr": min(int(cfg.num_candidates), MAX_MBR),
            "length": None,
            "samples": 1,
        }
        self.page = resources.files("ladic").joinpath("assets/demo/index.html").read_text(encoding="utf-8")

    # ------------------------------------------------------------ helpers
    def example_image(self, name: str) -> Image.Image:
        with self._examples_lock:
            if name not in self._examples:
                import skimage.data

                array = EXAMPLES[name](skimage.data)
                self._examples[name] = load_image(array, name=f"example {name}")
            return self._examples[name]

    def thumbnail(self, name: str) -> bytes:
        with self._examples_lock:
            cached = self._thumbs.get(name)
        if cached is not None:
            return cached
        img = self.example_image(name).copy()
        img.thumbnail((_THUMB_SIDE, _THUMB_SIDE))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        with self._examples_lock:
            self._thumbs[name] = buf.getvalue()
        return buf.getvalue()

    def schedule(self, steps: int, back_and_refine: bool) -> tuple[list[int], int]:
        """The sampler's timesteps, and how many of them run before Back&Refine restarts from t = T (0: no restart)."""
        schedule = [int(t) for t in self.model.diffusion.inference_timesteps(steps)]
        if not back_and_refine:
            return schedule, 0
        cut = self.model.config.refine_time * self.model.diffusion.num_timesteps
        return schedule, next((i + 1 for i, t in enumerate(schedule) if t <= cut), 0)

    def evaluations(self, steps: int, back_and_refine: bool) -> int:
        """Denoiser evaluations of one caption: the schedule, plus its first part again with Back&Refine."""
        schedule, first = self.schedule(steps, back_and_refine)
        return first + len(schedule)

    def estimate(self, p: SamplingParams) -> float:
        rows = p.mbr * (2 if p.guidance > 0 else 1)
        return self.cost.seconds(p.samples, self.evaluations(p.steps, p.back_and_refine), rows)

    def check_cost(self, p: SamplingParams) -> None:
        seconds = self.estimate(p)
        if seconds > self.max_request_seconds:
            raise DemoInputError(
                f"this request would take about {seconds:.1f} s on this machine, over the {self.max_request_seconds:g} s "
                f"limit: lower steps, MBR candidates or captions"
            )

    def parse_params(self, form: Mapping[str, Any]) -> SamplingParams:
        d = self.defaults
        p = SamplingParams(
            steps=_int_field(form, "steps", d["steps"], 1, self.max_steps),
            guidance=_float_field(form, "guidance", d["guidance"], 0.0, MAX_GUIDANCE),
            seed=_int_field(form, "seed", d["seed"], 0, MAX_SEED),
            back_and_refine=_bool_field(form, "back_and_refine", d["back_and_refine"]),
            mbr=_int_field(form, "mbr", d["mbr"], 1, MAX_MBR),
            length=_int_field(form, "length", None, 1, self.max_length_tokens),
            samples=_int_field(form, "samples", d["samples"], 1, MAX_SAMPLES),
        )
        if p.seed + p.samples - 1 > MAX_SEED:
            raise DemoInputError(f"seed + samples - 1 must be at most {MAX_SEED}")
        return p

    async def image_from_form(self, form: FormData) -> tuple[Image.Image, str]:
        upload = form.get("file")
        example = form.get("example")
        if isinstance(upload, str) and not upload.strip():
            upload = None
        if isinstance(example, str) and not example.strip():
            example = None
        if upload is not None and example is not None:
            raise DemoInputError("give either an uploaded file or an example name, not both")
        if upload is not None:
            if not isinstance(upload, UploadFile):
                raise DemoInputError("file must be an uploaded file (multipart/form-data)")
            name = upload.filename or "upload"
            data = await upload.read(self.max_upload_bytes + 1)
            if len(data) > self.max_upload_bytes:
                raise DemoInputError(
                    f"{name}: upload too large (over the {_megabytes(self.max_upload_bytes)} limit)", 413
                )
            try:
                img = await run_in_threadpool(
                    load_image, data, max_pixels=self.max_pixels, max_bytes=self.max_upload_bytes, name=name
                )
            except ImageLoadError as e:
                raise DemoInputError(str(e), 413 if "too large" in e.reason else 400) from e
            return img, name
        if example is not None:
            if not isinstance(example, str) or example.strip() not in EXAMPLES:
                shown = example.strip()[:40] if isinstance(example, str) else "<file>"
                raise DemoInputError(f"unknown example {shown!r} (choose from {', '.join(EXAMPLES)})")
            name = example.strip()
            return await run_in_threadpool(self.example_image, name), f"example {name}"
        raise DemoInputError("no image: upload a file (field 'file') or pick an example (field 'example')")

    def _phases(self, steps: int, back_and_refine: bool, n: int) -> list[dict[str, Any]]:
        """Label each trajectory entry with its timestep and phase (first pass / after Back&Refine)."""
        schedule, first = self.schedule(steps, back_and_refine)
        if first and n == first + len(schedule):
            return [{"t": t, "phase": "denoise"} for t in schedule[:first]] + [
                {"t": t, "phase": "refine"} for t in schedule
            ]
        if n == len(schedule):
            return [{"t": t, "phase": "denoise"} for t in schedule]
        return [{"t": None, "phase": "denoise"} for _ in range(n)]

    def run_model(self, job: _Job, image: Image.Image, p: SamplingParams, template: str | None) -> dict[str, Any]:
        """Runs in a worker thread once ``job`` is first in line; stops at the next step once it is cancelled or
        has run twice the time limit."""
        import torch

        from ladic.captioner import CaptioningCancelled
        from ladic.photo_seed import pixel_key

        start = time.perf_counter()
        deadline = start + 2 * self.max_request_seconds

        def should_stop() -> bool:
            if time.perf_counter() > deadline:
                job.cancel(f"it ran over twice the {self.max_request_seconds:g} s limit on this machine and was stopped: "
                           f"lower steps, MBR candidates or captions")
            return job.cancelled

        outs = []
        try:
            with torch.no_grad():
                feats = self.model.image_encoder.encode([image])  # once for every seed
            key = [pixel_key(image)]  # the noise of `ladic caption` for this photo and seed
            for i in range(p.samples):
                outs.append(
                    self.model.generate(
                        feats, keys=key, num_inference_steps=p.steps, guidance_scale=p.guidance,
                        back_and_refine=p.back_and_refine, mbr_candidates=p.mbr, length=p.length,
                        template=template, seed=p.seed + i, return_trajectory=(i == 0), should_stop=should_stop,
                    )
                )
        except CaptioningCancelled:
            raise _Cancelled from None
        except (ImageLoadError, ValueError) as e:
            raise DemoInputError(str(e)) from e
        elapsed = time.perf_counter() - start
        main = outs[0]
        trajectory = list(main.trajectories[0]) if main.trajectories else []
        return {
            "caption": main.captions[0],
            "trajectory": trajectory,
            "trajectory_steps": self._phases(p.steps, p.back_and_refine, len(trajectory)),
            "candidates": list(main.candidates[0]) if main.candidates else [main.captions[0]],
            "samples": [{"seed": p.seed + i, "caption": o.captions[0]} for i, o in enumerate(outs)],
            "num_evaluations": main.num_evaluations,
            "params": asdict(p),
            "elapsed_s": round(elapsed, 4),
        }

    # ------------------------------------------------------------ the in-browser page
    def _file(self, folder: Path | None, name: str, what: str) -> Response:
        if folder is None or not _SAFE_NAME.fullmatch(name) or not (folder / name).is_file():
            raise DemoInputError(f"{what}/{name[:60]}: not available", 404)
        from starlette.responses import FileResponse

        return FileResponse(folder / name, media_type=_MEDIA.get(Path(name).suffix, "application/octet-stream"),
                            headers={"Content-Security-Policy": _LOCAL_CSP, "Cache-Control": "no-cache"})

    async def local_page(self, request: Request) -> Response:
        page = resources.files("ladic").joinpath("assets/web/index.html").read_text(encoding="utf-8")
        return HTMLResponse(page, headers={"Content-Security-Policy": _LOCAL_CSP, "Cache-Control": "no-store"})

    async def local_file(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in _LOCAL_FILES:
            raise DemoInputError(f"{name[:60]}: not available", 404)
        return self._file(Path(str(resources.files("ladic").joinpath("assets/web"))), name, "local")

    async def ort_file(self, request: Request) -> Response:
        name = request.path_params["name"]
        from ladic.onnx_export import WEB_RUNTIME_FILES

        if name not in WEB_RUNTIME_FILES or self.ort_dir is None:
            raise DemoInputError("onnxruntime-web is not installed (./install.sh installs it with npm)"
                                 if self.ort_dir is None else f"ort/{name[:60]}: not available", 404)
        return self._file(self.ort_dir, name, "ort")

    async def model_file(self, request: Request) -> Response:
        if self.onnx_dir is None:
            raise DemoInputError("this model has no ONNX export (the browser runs one-step models only)", 404)
        return self._file(self.onnx_dir, request.path_params["name"], "model")

    # ------------------------------------------------------------ endpoints
    async def index(self, request: Request) -> Response:
        return HTMLResponse(self.page, headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-store"})

    async def healthz(self, request: Request) -> Response:
        busy, waiting = self.queue.status()
        return JSONResponse({"status": "ok", "model": self.model_name, "busy": busy, "waiting": waiting,
                             "cancelled": self.queue.cancelled})

    async def estimate_endpoint(self, request: Request) -> Response:
        p = self.parse_params(request.query_params)
        seconds = self.estimate(p)
        return JSONResponse({"seconds": round(seconds, 3), "limit_s": self.max_request_seconds,
                             "allowed": seconds <= self.max_request_seconds})

    async def queue_position(self, request: Request) -> Response:
        request_id = request.path_params["request_id"]
        position = self.queue.position(request_id)
        _, waiting = self.queue.status()
        return JSONResponse({"request_id": request_id, "position": position, "running": position == 0,
                             "waiting": waiting})

    async def config(self, request: Request) -> Response:
        return JSONResponse({
            "model": self.model_name,
            "defaults": self.defaults,
            "limits": {
                "max_upload_bytes": self.max_upload_bytes,
                "max_pixels": self.max_pixels,
                "steps": [1, self.max_steps],
                "guidance": [0.0, MAX_GUIDANCE],
                "seed": [0, MAX_SEED],
                "mbr": [1, MAX_MBR],
                "length": [1, self.max_length_tokens],
                "samples": [1, MAX_SAMPLES],
                "template_chars": MAX_TEMPLATE_CHARS,
                "request_seconds": self.max_request_seconds,
                "waiting": self.queue.max_waiting,
            },
            "cost": asdict(self.cost),
            "examples": list(EXAMPLES),
        })

    async def examples(self, request: Request) -> Response:
        out = []
        for name in EXAMPLES:
            try:
                img = await run_in_threadpool(self.example_image, name)
            except Exception as e:  # a broken scikit-image install must not take the page down
                log.warning("example %s unavailable: %s", name, e)
                continue
            out.append({"name": name, "url": f"/api/examples/{name}.jpg", "width": img.width, "height": img.height})
        return JSONResponse({"examples": out})

    async def example_thumb(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in EXAMPLES:
            raise DemoInputError(f"unknown example {name[:40]!r}", 404)
        data = await run_in_threadpool(self.thumbnail, name)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    async def _read_form(
        self, request: Request, need_template: bool
    ) -> tuple[Image.Image, str, SamplingParams, str | None, str]:
        async with request.form(max_files=1, max_fields=32, max_part_size=FORM_OVERHEAD_BYTES) as form:
            params = self.parse_params(form)
            self.check_cost(params)
            request_id = _field(form, "request_id") or uuid.uuid4().hex
            if not _REQUEST_ID.fullmatch(request_id):
                raise DemoInputError("request_id must be 1-64 letters, digits, '-' or '_'")
            template = None
            if need_template:
                raw = form.get("template")
                if not isinstance(raw, str) or not raw.strip():
                    raise DemoInputError(
                        "infill template is empty: write a caption with blanks, e.g. 'two ___ standing on a ___ field'"
                    )
                if len(raw) > MAX_TEMPLATE_CHARS:
                    raise DemoInputError(f"infill template is too long ({len(raw)} > {MAX_TEMPLATE_CHARS} characters)")
                template = " ".join(raw.split())
            image, source = await self.image_from_form(form)
        return image, source, params, template, request_id

    async def _watch(self, request: Request, job: _Job) -> None:
        """Cancel ``job`` when its client disconnects."""
        while not job.cancelled:
            if await request.is_disconnected():
                job.cancel("the client disconnected")
                return
            await asyncio.sleep(0.1)

    async def _answer(self, request: Request, need_template: bool) -> Response:
        image, source, params, template, request_id = await self._read_form(request, need_template)
        job = self.queue.join(request_id)
        watcher = asyncio.create_task(self._watch(request, job))
        try:
            result = await run_in_threadpool(
                self.queue.run, job, lambda: self.run_model(job, image, params, template)
            )
        except _Cancelled:
            log.info("request %s cancelled: %s", request_id, job.reason)
            return JSONResponse({"error": f"cancelled: {job.reason}"}, status_code=503)
        finally:
            watcher.cancel()
        if template is not None:
            result["template"] = template
        result["image"] = {"source": source, "width": image.width, "height": image.height}
        result["request_id"] = request_id
        return JSONResponse(result)

    async def caption(self, request: Request) -> Response:
        return await self._answer(request, need_template=False)

    async def infill(self, request: Request) -> Response:
        return await self._answer(request, need_template=True)


async def _demo_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DemoInputError)
    return JSONResponse({"error": exc.message}, status_code=exc.status_code)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 413:
        headers.setdefault("Connection", "close")
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("demo request failed", exc_info=exc)
    return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)


def create_app(
    model: Any,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_PIXELS_DEFAULT,
    model_name: str | None = None,
    max_request_seconds: float = DEFAULT_MAX_REQUEST_SECONDS,
    max_waiting: int = DEFAULT_MAX_WAITING,
    cost: RequestCost | None = None,
    onnx_dir: str | Path | None = None,
    ort_dir: str | Path | None = None,
) -> Starlette:
    """The demo as an ASGI app around a loaded ``LaDiC`` model.

    ``max_upload_bytes`` caps an uploaded image (the request body may add
    ``FORM_OVERHEAD_BYTES`` for the other fields); ``max_pixels`` caps its decoded size.
    A request estimated (from ``cost``, measured now with ``measure_cost`` when not given) to take longer than
    ``max_request_seconds`` is refused; ``max_waiting`` requests may wait behind the running one.
    ``onnx_dir`` (an ``ladic export --onnx`` folder) and ``ort_dir`` (onnxruntime-web's ``dist``; default
    ``ladic.onnx_export.web_runtime_dir()``) serve the in-browser page at ``/local/``.
    """
    from ladic.onnx_export import web_runtime_dir

    if max_upload_bytes < 1 or max_pixels < 1:
        raise ValueError("max_upload_bytes and max_pixels must be positive")
    if not max_request_seconds > 0 or max_waiting < 0:
        raise ValueError("max_request_seconds must be positive and max_waiting >= 0")
    demo = _Demo(model, max_upload_bytes=max_upload_bytes, max_pixels=max_pixels,
                 model_name=model_name or type(model).__name__, max_request_seconds=max_request_seconds,
                 max_waiting=max_waiting, cost=cost or measure_cost(model),
                 onnx_dir=None if onnx_dir is None else Path(onnx_dir),
                 ort_dir=Path(ort_dir) if ort_dir is not None else web_runtime_dir())
    routes = [
        Route("/", demo.index, methods=["GET"]),
        Route("/healthz", demo.healthz, methods=["GET"]),
        Route("/api/config", demo.config, methods=["GET"]),
        Route("/api/examples", demo.examples, methods=["GET"]),
        Route("/api/examples/{name}.jpg", demo.example_thumb, methods=["GET"]),
        Route("/local/", demo.local_page, methods=["GET"]),
        Route("/local/{name}", demo.local_file, methods=["GET"]),
        Route("/local/ort/{name}", demo.ort_file, methods=["GET"]),
        Route("/local/model/{name}", demo.model_file, methods=["GET"]),
        Route("/api/estimate", demo.estimate_endpoint, methods=["GET"]),
        Route("/api/queue/{request_id}", demo.queue_position, methods=["GET"]),
        Route("/api/caption", demo.caption, methods=["POST"]),
        Route("/api/infill", demo.infill, methods=["POST"]),
    ]
    body_limit = max_upload_bytes + FORM_OVERHEAD_BYTES
    middleware = [
        Middleware(UploadLimitMiddleware, max_body_bytes=body_limit, max_upload_bytes=max_upload_bytes,
                   drain_bytes=4 * body_limit),
    ]
    app = Starlette(
        routes=routes, middleware=middleware,
        exception_handlers={DemoInputError: _demo_error, HTTPException: _http_error, Exception: _server_error},
    )
    app.state.demo = demo
    return app


# ---------------------------------------------------------------------------- serving
def _bind(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RunningServer:
    """A uvicorn server running in a background thread (see ``start_in_thread``)."""

    def __init__(self, server: Any, thread: threading.Thread, host: str, port: int) -> None:
        self.server, self.thread, self.host, self.port = server, thread, host, port
        self.url = _url(host, port).rstrip("/")

    def stop(self, timeout: float = 10.0) -> None:
        _cancel_requests(self.server.config.app, "the demo is shutting down")
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cancel_requests(app: Any, reason: str) -> int:
    demo = getattr(getattr(app, "state", None), "demo", None)
    return demo.queue.cancel_all(reason) if demo is not None else 0


def start_in_thread(app: ASGIApp, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> RunningServer:
    """Serve ``app`` from a daemon thread; ``port=0`` picks a free port (see ``.url``)."""
    import uvicorn

    sock = _bind(host, port)
    actual_port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False, timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="ladic-demo", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"demo server did not start on {host}:{actual_port}")
        time.sleep(0.02)
    return RunningServer(server, thread, host, actual_port)


def serve(
    model_path: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str = "cpu",
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_request_seconds: float = DEFAULT_MAX_REQUEST_SECONDS,
    log_level: str = "warning",
) -> None:
    """Load the model (``None``: the shipped default) and serve the demo until Ctrl+C or SIGTERM (running and
    waiting requests are cancelled; the server exits within about a second).

    Raises ``CheckpointError`` for a bad model folder; exits with a one-line message
    (``SystemExit``) when the address cannot be bound.
    """
    import uvicorn

    from ladic.captioner import LaDiC, default_model_path
    from ladic.checkpoint import shipped_model_path

    model = LaDiC.from_pretrained(model_path, device=device)
    path = Path(model_path) if model_path is not None else default_model_path()
    name = f"{path.name} (shipped)" if path.resolve() == shipped_model_path(path.name) else str(model_path)
    cost = measure_cost(model)
    from ladic.onnx_export import ExportError, onnx_folder

    try:  # the in-browser page (/local/) runs the ONNX export of the same model (exported once, cached)
        onnx_dir = onnx_folder(model_path)
    except ExportError:
        onnx_dir = None
    except Exception as e:  # an export failure must not keep the server demo from starting
        print(f"warning: the in-browser page is unavailable: the ONNX export failed ({type(e).__name__}: "
              f"{' '.join(str(e).split())[:120]})", file=sys.stderr)
        onnx_dir = None
    app = create_app(model, max_upload_bytes=max_upload_bytes, model_name=name,
                     max_request_seconds=max_request_seconds, cost=cost, onnx_dir=onnx_dir)
    try:
        sock = _bind(host, port)
    except OSError as e:
        raise SystemExit(f"error: cannot listen on {host}:{port} ({e.strerror or e})") from None
    actual_port = sock.getsockname()[1]
    if not _is_loopback(host):
        print(f"warning: listening on {host}, not a loopback address: other machines can use this demo",
              file=sys.stderr)
    print(f"LaDiC demo on {_url(host, actual_port)}  (model: {name}; a request is limited to about "
          f"{max_request_seconds:g} s; one denoiser evaluation of one caption takes "
          f"{1000 * (cost.per_evaluation_s + cost.per_row_s):.0f} ms here; Ctrl+C to stop)", flush=True)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if _cancel_requests(app, "the demo is shutting down"):
                print("stopping: cancelled the requests in progress", file=sys.stderr, flush=True)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level=log_level, lifespan="off", timeout_graceful_shutdown=1)
    Server(config).run(sockets=[sock])


if __name__ == "__main__":  # pragma: no cover
    serve(*(sys.argv[1:2] or [None]))
