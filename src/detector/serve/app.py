"""The LitServe side of the service: :class:`DetectorAPI` scores in the inference workers,
:func:`build_server` wires it with the page, the model card and :mod:`.middleware`.

Each worker loads the checkpoint once (:meth:`DetectorAPI.setup`) and scores through
:class:`~detector.api.Detector` (``prepare`` -> ``score_prepared`` -> ``decide``), the path
predict.py takes, so the same bytes give the same numbers. LitServe batches *requests*; one
request may hold several images, so the worker scores the images of a whole batch of
requests in chunks of ``max_batch_size`` images.

A failure is returned as a value, never raised: LitServe's batched loop answers an exception in
any request of a batch with that error for *every* request in it, so one bad upload would fail
its neighbours. :mod:`.middleware` turns ``{"error", "status"}`` back into the status code.
"""

from __future__ import annotations

import base64
import io
import logging
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any

import litserve as ls
import torch
from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse

from detector.api import Detector
from detector.data.decode import open_image, reason_from_exception
from detector.serve.middleware import ServiceMiddleware
from detector.serve.uploads import Limits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSettings:
    """What a worker needs to load the model: plain values, pickled into spawned workers."""

    ckpt: str
    device: str
    threshold: float | None
    max_tiles: int | None
    aggregate: str | None
    max_pixels: int
    threads: int


def _label(name: str, index: int, n: int) -> str:
    return f"file {index + 1} of {n} ({name!r})" if n > 1 else repr(name)


class DetectorAPI(ls.LitAPI):
    def __init__(self, model: ModelSettings, max_batch_size: int, batch_timeout: float) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.model = model
        self.chunk = max(1, max_batch_size)

    def setup(self, device: str) -> None:
        """Once per worker: ``device`` is LitServe's choice for it (``cpu``, ``cuda:N``)."""
        m = self.model
        if m.threads > 0:
            torch.set_num_threads(m.threads)
        if not logging.getLogger().handlers:  # a spawned process starts without Hydra's logging
            logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
        self.detector = Detector.from_checkpoint(
            m.ckpt,
            device=device,
            threshold=m.threshold,
            max_tiles=m.max_tiles,
            aggregate=m.aggregate,
        )
        log.info("worker %d: model %s on %s", os.getpid(), self.detector.model_id, device)

    # No annotations on decode_request / encode_response: LitServe reads them to choose the
    # request and response types of the route (none: a JSON body in, JSON out).
    def decode_request(self, request):
        """The images the middleware checked, decoded and prepared; a file that fails to
        decode becomes the request's error (422), naming the file."""
        images = request["images"]
        prepared = []
        for i, item in enumerate(images):
            name = item["name"]
            try:
                data = base64.b64decode(item["data"])
                with open_image(name, self.model.max_pixels, fp=io.BytesIO(data)) as img:
                    prepared.append((name, self.detector.prepare(img)))
            except Exception as e:  # any decoder failure is the upload's, not the worker's
                reason = reason_from_exception(e)
                return {"error": f"{_label(name, i, len(images))}: {reason}", "status": 422}
        return prepared

    def batch(self, inputs: list) -> list:
        return inputs

    def unbatch(self, output: list) -> list:
        return output

    def predict(self, x: list) -> list:
        """One result per request: its predictions, or the error its decoding returned."""
        requests = x if self.max_batch_size > 1 else [x]
        items = [p for r in requests if isinstance(r, list) for p in r]
        decided = []
        for start in range(0, len(items), self.chunk):
            chunk = [p for _, p in items[start : start + self.chunk]]
            probs, ood = self.detector.score_prepared(chunk)
            ood_list = ood.tolist() if ood is not None else [None] * len(chunk)
            decided += [
                self.detector.decide(p1, s, p.n_tiles, p.resized_from)
                for p1, s, p in zip(probs.tolist(), ood_list, chunk, strict=True)
            ]
        results, k = [], 0
        for r in requests:
            if not isinstance(r, list):
                results.append(r)
                continue
            results.append([self._row(name, p, decided[k + j]) for j, (name, p) in enumerate(r)])
            k += len(r)
        return results if self.max_batch_size > 1 else results[0]

    def _row(self, name: str, prepared, pred) -> dict[str, Any]:
        width, height = prepared.size
        return {
            "file": name,
            "label": pred.label,
            "probabilities": pred.probabilities,
            "probability": pred.probability,
            "threshold": pred.threshold,
            "model_id": self.detector.model_id,
            "in_domain": pred.in_domain,
            "ood_score": pred.ood_score,
            "n_tiles": pred.n_tiles,
            "resized_from": pred.resized_from,
            "width": width,
            "height": height,
        }

    def encode_response(self, output):
        if isinstance(output, dict):  # an error from decode_request
            return output
        return {"predictions": output}


def page() -> str:
    return resources.files("detector.serve").joinpath("page.html").read_text(encoding="utf-8")


def build_server(
    api: DetectorAPI,
    card: dict[str, Any],
    limits: Limits,
    api_key: str | None,
    workers: int,
    accelerator: str,
    request_timeout: float,
    fast_queue: bool = False,
) -> ls.LitServer:
    """LitServer with its own ``/`` and ``/info`` replaced by the page and the model card;
    ``/health`` stays LitServe's (200 "ok" once every worker has loaded its model, else 503)."""
    server = ls.LitServer(
        api,
        accelerator=accelerator,
        devices=1 if accelerator == "cuda" else "auto",
        workers_per_device=workers,
        timeout=request_timeout,
        middlewares=[(ServiceMiddleware, {"limits": limits, "api_key": api_key})],
        disable_openapi_url=True,
        fast_queue=fast_queue,
    )
    app = server.app
    app.router.routes = [
        r for r in app.router.routes if getattr(r, "path", None) not in ("/", "/info")
    ]
    html = page()

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})

    async def info(request: Request) -> JSONResponse:
        return JSONResponse(card)

    app.add_api_route("/", index, methods=["GET"], include_in_schema=False)
    app.add_api_route("/info", info, methods=["GET"], include_in_schema=False)
    return server
