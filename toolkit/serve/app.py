"""``mtk serve``: a saved deployable (MISLEADER, a baseline, an undefended target) behind an HTTP API, as a provider
would expose it: API keys with budgets and rate limits, dynamic batching, and strict input checks.

Endpoints: ``POST /v1/predict`` (``{"inputs": [[C x H x W] ...]}`` pixels in [0, 1], or ``{"images": [base64 PNG]}``),
``GET /v1/card`` (the public model card), ``GET /health``; OpenAPI docs at ``/docs``. Keys go in
``Authorization: Bearer KEY`` (or ``X-API-Key``). Every bad request is a 4xx with ``{"error": "one-line reason"}``.
"""

import base64
import binascii
import contextlib
import io
import json
import logging
import math

import numpy as np

from toolkit.serve.batching import DynamicBatcher

_log = logging.getLogger("mtk.serve")
from toolkit.serve.keys import RateLimiter

DEFAULTS = {"output": "soft", "max_rows": 1024, "max_body_bytes": 16 * 1024 * 1024, "max_batch": 256,
            "max_wait_ms": 5.0, "rate_burst": 256}


class BadRequest(Exception):
    def __init__(self, status, reason):
        super().__init__(reason)
        self.status, self.reason = status, reason


def public_card(card, output, max_rows=None):
    """What clients may know: the model's name, its data (input shape, classes, dataset) and the answer format; not
    the defense method or the training spec."""
    return {"name": card.get("name"), "output": output, "max_rows": max_rows, "dataset": card.get("dataset", {})}


def parse_inputs(body, input_shape, max_rows):
    """float32 N x C x H x W pixels from a decoded JSON body, or BadRequest naming what is wrong."""
    if not isinstance(body, dict):
        raise BadRequest(400, "body must be a JSON object with 'inputs' or 'images'")
    unknown = sorted(set(body) - {"inputs", "images"})
    if unknown:
        raise BadRequest(400, f"unknown field(s): {', '.join(map(str, unknown))}")
    if ("inputs" in body) == ("images" in body):
        raise BadRequest(400, "give exactly one of 'inputs' (pixel arrays) or 'images' (base64 PNG)")
    items = body.get("inputs", body.get("images"))
    if not isinstance(items, list) or not items:
        raise BadRequest(400, "'inputs' / 'images' must be a non-empty list")
    if len(items) > max_rows:
        raise BadRequest(413, f"{len(items)} images in one request; the limit is {max_rows}")
    x = _from_arrays(items, input_shape) if "inputs" in body else _from_png(items, input_shape)
    if not np.isfinite(x).all():
        raise BadRequest(400, "inputs hold NaN or infinite values")
    if x.min() < 0 or x.max() > 1:
        raise BadRequest(400, f"pixels must lie in [0, 1], got [{float(x.min()):.3g}, {float(x.max()):.3g}]")
    return x


def _from_arrays(items, input_shape):
    try:
        x = np.asarray(items)
    except (ValueError, TypeError):
        raise BadRequest(400, "'inputs' is ragged: every image must have the same shape") from None
    if x.dtype.kind not in "iuf":
        raise BadRequest(400, f"'inputs' must hold numbers, got {x.dtype.kind!r} values")
    if x.shape[1:] != tuple(input_shape):
        raise BadRequest(400, f"'inputs' must have shape (N, {', '.join(map(str, input_shape))}), got {x.shape}")
    with np.errstate(over="ignore"):  # beyond float32: inf, refused just below as not finite
        return x.astype(np.float32)


def _from_png(items, input_shape):
    from PIL import Image

    channels, height, width = input_shape
    out = np.empty((len(items), *input_shape), dtype=np.float32)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise BadRequest(400, f"images[{i}]: must be a base64 string")
        try:
            raw = base64.b64decode(item, validate=True)
            with Image.open(io.BytesIO(raw)) as image:
                if image.format != "PNG":
                    raise BadRequest(400, f"images[{i}]: not a PNG image")
                if image.size != (width, height):
                    raise BadRequest(400, f"images[{i}]: size {image.size[0]}x{image.size[1]}, expected "
                                          f"{width}x{height}")
                pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
        except BadRequest:
            raise
        except (binascii.Error, ValueError):
            raise BadRequest(400, f"images[{i}]: not valid base64") from None
        except Exception:  # noqa: BLE001  (PIL raises many kinds on corrupt data)
            raise BadRequest(400, f"images[{i}]: not a readable PNG image") from None
        out[i] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    return out


def create_app(victim, keys=None, **options):
    """The ASGI app for a loaded deployable; ``keys`` a KeyStore (None: open access, for local experiments)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    cfg = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    if cfg["output"] not in ("soft", "hard"):
        raise ValueError(f"output must be 'soft' or 'hard', got {cfg['output']!r}")
    input_shape = tuple(int(d) for d in victim.input_shape)

    def predict(x):
        return victim.predict_proba(x).cpu().numpy()

    batcher = DynamicBatcher(predict, cfg["max_batch"], cfg["max_wait_ms"])
    limiter = RateLimiter(max(cfg["rate_burst"], cfg["max_rows"]))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title=f"mtk: {victim.card.get('name')}", lifespan=lifespan,
                  description="A classifier served by mtk (model-extraction toolkit).")
    app.state.batcher, app.state.config = batcher, cfg

    def error(status, reason):
        return JSONResponse({"error": reason}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return error(400, "malformed request")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/card")
    async def card():
        return public_card(victim.card, cfg["output"], cfg["max_rows"])

    @app.post("/v1/predict")
    async def predict_endpoint(request: Request):
        try:
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > cfg["max_body_bytes"]):
                raise BadRequest(413, f"payload larger than {cfg['max_body_bytes']} bytes")
            key = None
            if keys is not None:
                secret = request.headers.get("x-api-key") or _bearer(request.headers.get("authorization"))
                key = keys.authenticate(secret)
                if key is None:
                    raise BadRequest(401, "missing or invalid API key")
                if key["revoked"]:
                    raise BadRequest(403, "this API key was revoked")
            body = bytearray()
            try:
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > cfg["max_body_bytes"]:
                        raise BadRequest(413, f"payload larger than {cfg['max_body_bytes']} bytes")
            except ClientDisconnect:  # the client left mid-body: nothing to answer, nothing spent
                _log.warning("client %s disconnected before sending its whole request body",
                             request.client.host if request.client else "?")
                return error(400, "client disconnected before the request body was complete")
            try:
                decoded = json.loads(body, parse_constant=lambda c: math.nan)
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise BadRequest(400, "body is not valid JSON") from None
            x = parse_inputs(decoded, input_shape, cfg["max_rows"])
            n = len(x)
            if key is not None:
                if not limiter.allow(key["id"], key["rate"], n):
                    raise BadRequest(429, f"rate limit of {key['rate']:g} queries/s exceeded; retry later")
                if not keys.reserve(key["id"], n):
                    raise BadRequest(403, f"query budget exhausted ({keys.remaining(key['id'])} of {key['budget']} "
                                          f"left, {n} asked)")
        except BadRequest as exc:
            return error(exc.status, exc.reason)
        try:
            probs = await batcher.submit(x)
        except Exception:  # noqa: BLE001  (the model failed: refund, answer 503, keep serving)
            if key is not None:
                keys.refund(key["id"], n)
            return error(503, "the model could not answer; nothing was charged")
        out = {"queries": n}
        if key is not None:
            out["queries_left"] = keys.remaining(key["id"])
        if cfg["output"] == "hard":
            out["labels"] = probs.argmax(1).tolist()
        else:
            out["probabilities"] = probs.tolist()
        return out

    return app


def _bearer(header):
    """The token of an ``Authorization: Bearer`` header, exactly as sent (HTTP itself drops the spaces around a
    header's value; nothing inside is trimmed, so a key with an extra space does not authenticate)."""
    if header and header[:7].lower() == "bearer ":
        return header[7:]
    return None
