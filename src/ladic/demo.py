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

Model calls run in the threadpool (never on the event loop) and are serialised by a
lock, so concurrent requests are safe and ``/healthz`` stays responsive meanwhile.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import math
import socket
import sys
import threading
import time
from collections.abc import Callable
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
    "DEFAULT_MAX_UPLOAD_BYTES",
    "EXAMPLES",
    "RunningServer",
    "create_app",
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


def _field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise DemoInputError(f"{name} must be a plain form field, not a file")
    value = value.strip()
    return value or None


def _int_field(form: FormData, name: str, default: int | None, lo: int, hi: int) -> int | None:
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


def _float_field(form: FormData, name: str, default: float, lo: float, hi: float) -> float:
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


def _bool_field(form: FormData, name: str, default: bool) -> bool:
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


# ---------------------------------------------------------------------------- the app
class _Demo:
    def __init__(self, model: Any, *, max_upload_bytes: int, max_pixels: int, model_name: str) -> None:
        self.model = model
        self.max_upload_bytes = max_upload_bytes
        self.max_pixels = max_pixels
        self.model_name = model_name
        self.lock = threading.Lock()  # one model call at a time
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
            "mbr": 1,
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

    def parse_params(self, form: FormData) -> SamplingParams:
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
        schedule = [int(t) for t in self.model.diffusion.inference_timesteps(steps)]
        if back_and_refine:
            cut = self.model.config.refine_time * self.model.diffusion.num_timesteps
            first = next((i + 1 for i, t in enumerate(schedule) if t <= cut), None)
            if first is not None and n == first + len(schedule):
                return [{"t": t, "phase": "denoise"} for t in schedule[:first]] + [
                    {"t": t, "phase": "refine"} for t in schedule
                ]
        if n == len(schedule):
            return [{"t": t, "phase": "denoise"} for t in schedule]
        return [{"t": None, "phase": "denoise"} for _ in range(n)]

    def run_model(self, image: Image.Image, p: SamplingParams, template: str | None) -> dict[str, Any]:
        """Runs in a worker thread; the lock serialises model calls."""
        with self.lock:
            start = time.perf_counter()
            outs = []
            try:
                for i in range(p.samples):
                    outs.append(
                        self.model.generate(
                            [image], num_inference_steps=p.steps, guidance_scale=p.guidance,
                            back_and_refine=p.back_and_refine, mbr_candidates=p.mbr, length=p.length,
                            template=template, seed=p.seed + i, return_trajectory=(i == 0),
                        )
                    )
            except ImageLoadError as e:
                raise DemoInputError(str(e)) from e
            except ValueError as e:
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

    # ------------------------------------------------------------ endpoints
    async def index(self, request: Request) -> Response:
        return HTMLResponse(self.page, headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-store"})

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model_name, "busy": self.lock.locked()})

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
            },
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

    async def _read_form(self, request: Request, need_template: bool) -> tuple[Image.Image, str, SamplingParams, str | None]:
        async with request.form(max_files=1, max_fields=32, max_part_size=FORM_OVERHEAD_BYTES) as form:
            params = self.parse_params(form)
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
        return image, source, params, template

    async def caption(self, request: Request) -> Response:
        image, source, params, _ = await self._read_form(request, need_template=False)
        result = await run_in_threadpool(self.run_model, image, params, None)
        result["image"] = {"source": source, "width": image.width, "height": image.height}
        return JSONResponse(result)

    async def infill(self, request: Request) -> Response:
        image, source, params, template = await self._read_form(request, need_template=True)
        result = await run_in_threadpool(self.run_model, image, params, template)
        result["template"] = template
        result["image"] = {"source": source, "width": image.width, "height": image.height}
        return JSONResponse(result)


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
) -> Starlette:
    """The demo as an ASGI app around a loaded ``LaDiC`` model.

    ``max_upload_bytes`` caps an uploaded image (the request body may add
    ``FORM_OVERHEAD_BYTES`` for the other fields); ``max_pixels`` caps its decoded size.
    """
    if max_upload_bytes < 1 or max_pixels < 1:
        raise ValueError("max_upload_bytes and max_pixels must be positive")
    demo = _Demo(model, max_upload_bytes=max_upload_bytes, max_pixels=max_pixels,
                 model_name=model_name or type(model).__name__)
    routes = [
        Route("/", demo.index, methods=["GET"]),
        Route("/healthz", demo.healthz, methods=["GET"]),
        Route("/api/config", demo.config, methods=["GET"]),
        Route("/api/examples", demo.examples, methods=["GET"]),
        Route("/api/examples/{name}.jpg", demo.example_thumb, methods=["GET"]),
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
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_in_thread(app: ASGIApp, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> RunningServer:
    """Serve ``app`` from a daemon thread; ``port=0`` picks a free port (see ``.url``)."""
    import uvicorn

    sock = _bind(host, port)
    actual_port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
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
    log_level: str = "warning",
) -> None:
    """Load the model (``None``: the shipped default) and serve the demo until Ctrl+C.

    Raises ``CheckpointError`` for a bad model folder; exits with a one-line message
    (``SystemExit``) when the address cannot be bound.
    """
    import uvicorn

    from ladic.captioner import LaDiC, default_model_path
    from ladic.checkpoint import shipped_model_path

    model = LaDiC.from_pretrained(model_path, device=device)
    path = Path(model_path) if model_path is not None else default_model_path()
    name = f"{path.name} (shipped)" if path.resolve() == shipped_model_path(path.name) else str(model_path)
    app = create_app(model, max_upload_bytes=max_upload_bytes, model_name=name)
    try:
        sock = _bind(host, port)
    except OSError as e:
        raise SystemExit(f"error: cannot listen on {host}:{port} ({e.strerror or e})") from None
    actual_port = sock.getsockname()[1]
    if not _is_loopback(host):
        print(f"warning: listening on {host}, not a loopback address: other machines can use this demo",
              file=sys.stderr)
    print(f"LaDiC demo on {_url(host, actual_port)}  (model: {name}; Ctrl+C to stop)", flush=True)
    config = uvicorn.Config(app, log_level=log_level, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":  # pragma: no cover
    serve(*(sys.argv[1:2] or [None]))
