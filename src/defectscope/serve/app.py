"""The station's HTTP API and review page (FastAPI). Routes are thin: the `Station` does
the work, so the API, the page and the folder watcher share one way to score.

State-changing routes (feedback, threshold, model switch) need the station's token when
it is bound to anything but the loopback interface.
"""

from __future__ import annotations

import asyncio
import hmac
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, File, Header, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from defectscope import __version__
from defectscope.answers import answer
from defectscope.errors import ConfigError, DefectscopeError
from defectscope.explain import stored_finding
from defectscope.serve.station import MAX_UPLOAD_BYTES, Station, UploadError
from defectscope.serve.store import Result

WEB = Path(__file__).parent / "web"
MAX_FILES = 64


class Feedback(BaseModel):
    """An inspector's correction of one result."""

    id: str = Field(description="Result id from /v1/predict or /v1/results.")
    label: Literal["normal", "defect"] = Field(description="normal: a good part (false alarm); defect: confirmed.")


class ThresholdRequest(BaseModel):
    """A new threshold: a value, or F1-optimal on the images reviewed so far."""

    value: float | None = Field(default=None, description="Score at or above which a part is defective.")
    f1_from_reviews: bool = Field(default=False, description="Choose the F1-optimal threshold on reviewed images.")


class ModelSwitch(BaseModel):
    """Serve an earlier (or later) model version recorded by this station."""

    version: str


def result_json(r: Result) -> dict[str, Any]:
    """A result with the URLs of its image and heatmap overlay."""
    return {
        **{k: v for k, v in r.to_dict().items() if k not in ("image_file", "heatmap_file")},
        "image_url": f"/v1/results/{r.id}/image",
        "heatmap_url": f"/v1/results/{r.id}/heatmap",
    }


def create_app(station: Station, *, token: str | None = None, require_token: bool = False) -> FastAPI:
    """The FastAPI app for ``station``; ``require_token``: state changes need ``token``."""
    if require_token and not token:
        raise ConfigError("A station bound beyond 127.0.0.1 needs a token: pass --token or set DEFECTSCOPE_TOKEN.")
    app = FastAPI(
        title="defectscope station",
        version=__version__,
        description="Scores images of parts, keeps every result, and learns from inspectors' corrections.",
    )
    app.mount("/static", StaticFiles(directory=WEB), name="static")

    def authorised(x_token: Annotated[str | None, Header(description="Station token (needed off loopback).")] = None) -> None:
        if require_token and not (x_token and hmac.compare_digest(x_token, token or "")):
            raise HTTPException(401, "This station needs its token (header X-Token) for changes.")

    def stored(result_id: str) -> Result:
        result = station.store.get(result_id)
        if result is None:
            raise HTTPException(404, f"No result with id {result_id!r}.")
        return result

    @app.exception_handler(UploadError)
    async def upload_error(_: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return (WEB / "index.html").read_text(encoding="utf-8")

    @app.get("/healthz", summary="Liveness: the model version being served")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model_version": station.current.version}

    @app.get("/v1/model", summary="The served model: method, options, threshold, hashes, versions")
    async def model() -> dict[str, Any]:
        return {**station.current.describe(), "versions": station.versions()}

    @app.post("/v1/predict", summary="Score one or more images (multipart field 'files', or the raw image as the body)")
    async def predict(request: Request, files: Annotated[list[UploadFile] | None, File(description="Image files.")] = None) -> dict[str, Any]:
        length = int(request.headers.get("content-length") or 0)
        if length > MAX_FILES * MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"The request is {length / 2**20:.0f} MB; send at most {MAX_FILES} images of {MAX_UPLOAD_BYTES // 2**20} MB.")
        if files:
            if len(files) > MAX_FILES:
                raise HTTPException(413, f"At most {MAX_FILES} images per request.")
            uploads = [(await f.read(), f.filename or "upload") for f in files]
        else:
            uploads = [(await request.body(), request.headers.get("x-filename", "upload"))]
        jobs = station.store_uploads(uploads)
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
        offset: Annotated[int, Query(ge=0)] = 0,
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

    @app.get("/v1/results/{result_id}/image", summary="The scored image as it was received", response_class=FileResponse)
    async def image(result_id: str) -> FileResponse:
        return FileResponse(station.store.root / stored(result_id).image_file)

    @app.get("/v1/results/{result_id}/heatmap", summary="The heatmap overlay (PNG)", response_class=FileResponse)
    async def heatmap(result_id: str) -> FileResponse:
        return FileResponse(station.store.root / stored(result_id).heatmap_file, media_type="image/png")

    @app.get("/v1/scores", summary="Scores over time with the threshold (for the drift chart and the slider)")
    async def scores(limit: Annotated[int, Query(ge=1, le=20000)] = 2000) -> dict[str, Any]:
        rows = station.store.scores(limit)
        return {"threshold": station.current.threshold, "points": [{"t": t, "score": s, "review": r} for t, s, r in rows]}

    @app.post("/v1/feedback", summary="An inspector's correction; 'normal' teaches the model this good part", dependencies=[Depends(authorised)])
    async def feedback(body: Feedback) -> dict[str, Any]:
        try:
            result, change = await asyncio.to_thread(station.feedback, body.id, body.label)
        except KeyError:
            raise HTTPException(404, f"No result with id {body.id!r}.") from None
        except DefectscopeError as exc:
            raise HTTPException(409, str(exc)) from exc
        return {"result": result_json(result), "model_update": change, "model_version": station.current.version}

    @app.post("/v1/threshold", summary="Set the threshold (a new model version)", dependencies=[Depends(authorised)])
    async def threshold(body: ThresholdRequest) -> dict[str, Any]:
        try:
            new = await asyncio.to_thread(station.set_threshold, body.value, f1=body.f1_from_reviews)
        except ConfigError as exc:  # a threshold that is not a finite positive number, or no reviews to set one from
            raise HTTPException(422, str(exc)) from exc
        except DefectscopeError as exc:
            raise HTTPException(409, str(exc)) from exc
        return new.describe()

    @app.post("/v1/model", summary="Serve another recorded model version", dependencies=[Depends(authorised)])
    async def switch(body: ModelSwitch) -> dict[str, Any]:
        try:
            return (await asyncio.to_thread(station.use_version, body.version)).describe()
        except KeyError:
            raise HTTPException(404, f"No model version {body.version!r} at this station.") from None

    return app
