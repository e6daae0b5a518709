"""The station's HTTP API and review page (FastAPI). Routes are thin: the `Station` does
the work, so the API, the page and the folder watcher share one way to score.

Around the routes, outermost first: the Host check (`TrustedHostMiddleware`), the
per-client rate limit, access (tokens, the session cookie, same-origin changes; see
`access.py`) and the body-size limit applied while the body arrives (`limits.py`).
Decoding and scoring run in worker threads, never on the event loop, so one large image
does not stall `/healthz`.
"""

from __future__ import annotations

import asyncio
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from limits import parse
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from defectscope import __version__
from defectscope.decision.answers import answer
from defectscope.decision.explain import stored_finding
from defectscope.errors import ConfigError, DefectscopeError
from defectscope.serve.access import COOKIE, Access, Role, needed_role, same_origin, token_in_url
from defectscope.serve.limits import MB, BodyLimit, RateLimit, reply
from defectscope.serve.station import MAX_UPLOAD_BYTES, Station, UploadError, without_paths
from defectscope.serve.store import Result
from defectscope.serve.watch import FolderWatcher

WEB = Path(__file__).parent / "web"
MAX_FILES = 64


@dataclass(frozen=True)
class Limits:
    """What one client may send: bytes per request and requests per time."""

    max_request_mb: float = 128.0  # a multipart request of several images (spooled to disk while parsed)
    rate: str = "200/second"  # per client address, every route but /healthz
    login_rate: str = "10/minute"  # per client address, for guessing tokens at /login

    def __post_init__(self) -> None:
        if not self.max_request_mb > 0:
            raise ConfigError(f"--max-request-mb must be above 0, got {self.max_request_mb}.")
        for rate in (self.rate, self.login_rate):
            try:
                parse(rate)
            except ValueError:
                raise ConfigError(f"Rate {rate!r} is not a rate; write it like 200/second or 600/minute.") from None


class Feedback(BaseModel):
    """An inspector's correction of one result."""

    id: str = Field(description="Result id from /v1/predict or /v1/results.", max_length=64)
    label: Literal["normal", "defect"] = Field(description="normal: a good part (false alarm); defect: confirmed.")


class ThresholdRequest(BaseModel):
    """A new threshold: a value, or F1-optimal on the images reviewed so far."""

    value: float | None = Field(default=None, description="Score at or above which a part is defective.")
    f1_from_reviews: bool = Field(default=False, description="F1-optimal on reviewed images, re-scored by the current model.")


class Outline(BaseModel):
    """Where the defect is in a confirmed defect's image, in its pixels: the mask it trains with."""

    boxes: list[tuple[float, float, float, float]] = Field(default_factory=list, max_length=256, description="[x0, y0, x1, y1] each.")
    polygons: list[list[tuple[float, float]]] = Field(default_factory=list, max_length=64, description="[[x, y], ...] each.")


class ModelSwitch(BaseModel):
    """Serve an earlier (or later) model version recorded by this station."""

    version: str = Field(max_length=64)


class Pin(BaseModel):
    """Keep a model version from retention (or release it)."""

    version: str = Field(max_length=64)
    pinned: bool = True


class AccessGuard:
    """Refuses a request without the role its route needs (401/403), a change from another
    origin (403) and a token in the URL (400); the page redirects to /login instead."""

    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app, self.access = app, access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        if token_in_url(conn):
            await reply(send, 400, "Never put a token in a URL (it ends up in logs and browser history): send it in the "
                                   "Authorization or X-Token header, or log in at /login.")
            return
        method, path = scope["method"], scope["path"]
        role, need = self.access.role(conn), needed_role(method, path)
        if role < need:
            if role is Role.NONE and method == "GET" and path == "/":
                await RedirectResponse("/login", status_code=303)(scope, receive, send)
            elif role is Role.NONE:
                await reply(send, 401, "This station needs a token: header 'Authorization: Bearer <token>' or X-Token, or log in at /login.")
            else:
                await reply(send, 403, "The read-only token cannot change anything; use the station's change token.")
            return
        if method not in ("GET", "HEAD") and not same_origin(conn):
            await reply(send, 403, "A change from a page of another site is refused (Origin does not match Host).")
            return
        scope.setdefault("state", {})["role"] = role
        await self.app(scope, receive, send)


def result_json(r: Result) -> dict[str, Any]:
    """A result with the URLs of its image and heatmap overlay."""
    return {
        **{k: v for k, v in r.to_dict().items() if k not in ("image_file", "heatmap_file")},
        "image_url": f"/v1/results/{r.id}/image",
        "heatmap_url": f"/v1/results/{r.id}/heatmap",
    }


LOGIN_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>defectscope station: log in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font:16px system-ui,sans-serif;max-width:24rem;margin:4rem auto;padding:0 1rem}}
input,button{{font:inherit;padding:.4rem;width:100%;box-sizing:border-box;margin:.3rem 0}}.error{{color:#b00020}}</style></head>
<body><h1>defectscope station</h1><p>Enter the station's token (the change token, or the read-only one to look).</p>
<form method="post" action="/login"><input type="password" name="token" autocomplete="current-password" autofocus
aria-label="token"><button type="submit">Log in</button></form><p class="error">{message}</p></body></html>"""


def create_app(
    station: Station, *, access: Access | None = None, limits: Limits | None = None, watcher: FolderWatcher | None = None
) -> FastAPI:
    """The FastAPI app for ``station``. ``access``: tokens and allowed host names (loopback
    without tokens by default); ``limits``: request size and rate; ``watcher``: reported by /healthz."""
    access, limits = access or Access(), limits or Limits()
    app = FastAPI(
        title="defectscope station",
        version=__version__,
        description="Scores images of parts, keeps every result, and learns from inspectors' corrections.",
    )
    app.mount("/static", StaticFiles(directory=WEB), name="static")
    app.add_middleware(BodyLimit, max_raw=MAX_UPLOAD_BYTES, max_multipart=int(limits.max_request_mb * MB))
    app.add_middleware(AccessGuard, access=access)
    app.add_middleware(RateLimit, rate=limits.rate, strict_rate=limits.login_rate, strict=("/login",), exempt=("/healthz",))
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(access.allowed_hosts))

    def stored(result_id: str) -> Result:
        result = station.store.get(result_id)
        if result is None:
            raise HTTPException(404, f"No result with id {result_id!r}.")
        return result

    def kept_file(r: Result, name: str) -> Path:
        path = station.store.root / name
        if r.purged is not None or not path.is_file():
            raise HTTPException(410, f"Result {r.id}'s image was deleted by the store's retention rule; its record is kept.")
        return path

    @app.exception_handler(UploadError)
    async def upload_error(_: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    async def login_page() -> str:
        return LOGIN_PAGE.format(message="")

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        try:
            form = await request.form(max_files=0, max_fields=4)
        except MultiPartException as exc:
            raise HTTPException(400, str(exc)) from exc
        value = form.get("token")
        role = access.role_of_token(value if isinstance(value, str) else None) if access.required else Role.CHANGE
        if role is Role.NONE:
            return HTMLResponse(LOGIN_PAGE.format(message=html.escape("That token is not this station's.")), status_code=401)
        out = RedirectResponse("/", status_code=303)
        if access.required:
            out.set_cookie(COOKIE, access.session_cookie(role), httponly=True, samesite="strict",
                           secure=request.url.scheme == "https", path="/")
        return out

    @app.post("/logout", include_in_schema=False)
    async def logout() -> Response:
        out = RedirectResponse("/login", status_code=303)
        out.delete_cookie(COOKIE, path="/")
        return out

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return (WEB / "index.html").read_text(encoding="utf-8")

    @app.get("/healthz", summary="Liveness: the model version, the folder watcher's state; 503 when unhealthy")
    async def healthz(request: Request) -> JSONResponse:
        healthy = watcher is None or watcher.healthy
        body: dict[str, Any] = {"status": "ok" if healthy else "unhealthy", "model_version": station.current.version}
        if watcher is not None:  # the failing file and error only to a caller with a token: they name server paths
            detail = watcher.health.to_dict()
            body["watcher"] = detail if request.state.role >= Role.READ else {"state": detail["state"]}
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/v1/model", summary="The served model: method, options, threshold, hashes, versions (no server paths)")
    async def model() -> dict[str, Any]:
        return {**station.current.describe(), "versions": station.versions()}

    @app.post(
        "/v1/predict",
        summary="Score one or more images (multipart field 'files', or the raw image as the body)",
        openapi_extra={"requestBody": {"content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
        }}},
    )
    async def predict(request: Request) -> dict[str, Any]:
        uploads = await read_uploads(request)
        jobs = await asyncio.to_thread(station.store_uploads, uploads)  # decoding is CPU work: off the event loop
        futures = [asyncio.wrap_future(station.batcher.submit(job)) for job in jobs]
        try:
            results = await asyncio.gather(*futures)
        except UploadError:
            raise
        except DefectscopeError as exc:
            raise HTTPException(400, str(exc)) from exc
        return {"results": [result_json(r) for r in results]}

    @app.get("/v1/results", summary="Results, newest first, paged; filter by verdict and review state")
    async def results(
        verdict: Annotated[Literal["defect", "normal", "invalid", "unknown"] | None, Query()] = None,
        review: Annotated[Literal["normal", "defect", "unreviewed"] | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
    ) -> dict[str, Any]:
        items = station.store.query(verdict=verdict, review=review, limit=limit, offset=offset)
        return {"total": station.store.count(verdict=verdict, review=review), "items": [result_json(r) for r in items]}

    @app.get("/v1/results/{result_id}", summary="One result")
    async def one(result_id: str) -> dict[str, Any]:
        return result_json(stored(result_id))

    @app.get("/v1/results/{result_id}/answer", summary="An answer in words about one result, from its recorded finding")
    async def answer_about(
        result_id: str, q: Annotated[str, Query(max_length=500, description="The question.")] = "Is there an anomaly in this image?"
    ) -> dict[str, Any]:
        r = stored(result_id)
        return answer(stored_finding(r.score, r.threshold, r.regions, invalid=r.reason if r.verdict == "invalid" else None), q).to_dict()

    @app.get("/v1/results/{result_id}/image", summary="The scored image as it was received (410 once retention deleted it)", response_class=FileResponse)
    async def image(result_id: str) -> FileResponse:
        r = stored(result_id)
        return FileResponse(kept_file(r, r.image_file))

    @app.get("/v1/results/{result_id}/heatmap", summary="The heatmap overlay, PNG (410 once retention deleted it)", response_class=FileResponse)
    async def heatmap(result_id: str) -> FileResponse:
        r = stored(result_id)
        return FileResponse(kept_file(r, r.heatmap_file), media_type="image/png")

    @app.get("/v1/scores", summary="Scores over time with the threshold (for the drift chart and the slider)")
    async def scores(limit: Annotated[int, Query(ge=1, le=20000)] = 2000) -> dict[str, Any]:
        rows = station.store.scores(limit)
        return {"threshold": station.current.threshold, "points": [{"t": t, "score": s, "review": r} for t, s, r in rows]}

    @app.post("/v1/feedback", summary="An inspector's correction; 'normal' teaches the model this good part")
    async def feedback(body: Feedback) -> dict[str, Any]:
        try:
            result, change = await asyncio.to_thread(station.feedback, body.id, body.label)
        except KeyError:
            raise HTTPException(404, f"No result with id {body.id!r}.") from None
        except DefectscopeError as exc:
            raise HTTPException(409, str(exc)) from exc
        return {"result": result_json(result), "model_update": change, "model_version": station.current.version}

    @app.post("/v1/results/{result_id}/outline", summary="Outline a confirmed defect (boxes, polygons in image pixels) for retraining")
    async def outline(result_id: str, body: Outline) -> dict[str, Any]:
        try:
            return await asyncio.to_thread(station.outline, result_id, body.model_dump())
        except KeyError:
            raise HTTPException(404, f"No result with id {result_id!r}.") from None
        except DefectscopeError as exc:
            raise HTTPException(409, str(exc)) from exc

    @app.post("/v1/retrain", status_code=202, summary="Retrain from the reviews in the background (a new model version)")
    async def start_retrain() -> dict[str, Any]:
        try:
            return station.start_retrain()
        except DefectscopeError as exc:
            raise HTTPException(409, str(exc)) from exc

    @app.get("/v1/retrain", summary="How the retraining goes: idle, running (stage, steps), done (version) or failed (why)")
    async def retrain_state() -> dict[str, Any]:
        return without_paths(station.retraining)

    @app.post("/v1/threshold", summary="Set the threshold (a new model version)")
    async def threshold(body: ThresholdRequest) -> dict[str, Any]:
        try:
            new = await asyncio.to_thread(station.set_threshold, body.value, f1=body.f1_from_reviews)
        except ConfigError as exc:  # a threshold that is not a finite positive number, or no reviews to set one from
            raise HTTPException(422, str(exc)) from exc
        except DefectscopeError as exc:
            raise HTTPException(409, str(exc)) from exc
        return new.describe()

    @app.post("/v1/model", summary="Serve another recorded model version")
    async def switch(body: ModelSwitch) -> dict[str, Any]:
        try:
            return (await asyncio.to_thread(station.use_version, body.version)).describe()
        except KeyError:
            raise HTTPException(404, f"No model version {body.version!r} at this station.") from None
        except DefectscopeError as exc:
            raise HTTPException(409, str(exc)) from exc

    @app.post("/v1/model/pin", summary="Keep a model version from retention (pinned: false releases it)")
    async def pin(body: Pin) -> dict[str, Any]:
        try:
            return await asyncio.to_thread(station.pin, body.version, body.pinned)
        except KeyError:
            raise HTTPException(404, f"No model version {body.version!r} at this station.") from None

    return app


async def read_uploads(request: Request) -> list[tuple[bytes, str]]:
    """The images of a predict request: the multipart field 'files', or the raw body (one
    image). The body-size limit has already been applied while it arrived."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return [(await request.body(), request.headers.get("x-filename", "upload"))]
    try:
        form = await request.form(max_files=MAX_FILES, max_fields=MAX_FILES)
    except MultiPartException as exc:
        raise HTTPException(400, f"Malformed multipart upload: {exc}") from exc
    try:
        files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        if not files:
            fields = ", ".join(sorted(set(form.keys()))[:10]) or "none"
            raise HTTPException(422, f"Send the images in the multipart field 'files' (this request has: {fields}).")
        for f in files:
            if f.size is not None and f.size > MAX_UPLOAD_BYTES:
                raise UploadError(f"{f.filename}: {f.size / MB:.1f} MB is over the {MAX_UPLOAD_BYTES // MB} MB upload limit.", 413)
        return [(await f.read(), f.filename or "upload") for f in files]
    finally:
        await form.close()
