"""``serve(cfg)``: check the settings and the checkpoint, then run the service until stopped.

The checkpoint is read once here, on the CPU, for the model card and so that a bad ``ckpt=``
fails with one line before any process starts; each inference worker then loads it itself.
"""

from __future__ import annotations

import logging
import os

import torch
from omegaconf import DictConfig

from detector.api import Detector
from detector.errors import ConfigError
from detector.launch_env import cpu_cores
from detector.serve.app import DetectorAPI, ModelSettings, build_server
from detector.serve.card import model_card
from detector.serve.uploads import Limits
from detector.tasks.inputs import require_ckpt

log = logging.getLogger(__name__)

# The addresses LitServe binds (it refuses any other); "localhost" is taken as 127.0.0.1.
HOSTS = ("127.0.0.1", "0.0.0.0", "::")
DEVICES = ("auto", "cpu", "cuda")
KEY_ENV = "DETECTOR_API_KEY"


def _positive(cfg: DictConfig, key: str, kind: type = int, zero: bool = False) -> float:
    value = cfg.get(key)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or (value < 0 if zero else value <= 0) or (kind is int and value != int(value)):
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"{key}={value} must be {what} {'>= 0' if zero else '> 0'}")
    return kind(value)


def check_settings(cfg: DictConfig) -> tuple[str, str]:
    """(host, accelerator), every setting checked before anything loads."""
    require_ckpt(cfg.get("ckpt"))
    host = "127.0.0.1" if str(cfg.host) == "localhost" else str(cfg.host)
    if host not in HOSTS:
        raise ConfigError(
            f"host={cfg.host}: use 127.0.0.1 (this machine only), 0.0.0.0 or :: (every "
            "interface); LitServe binds no other address"
        )
    port = cfg.get("port")
    if not isinstance(port, int) or not 1024 <= port <= 65535:
        raise ConfigError(f"port={port} must be an integer from 1024 to 65535")
    for key in ("workers", "api_servers", "max_batch_size", "max_files", "min_size"):
        _positive(cfg, key)
    for key in ("max_upload_mb", "upload_timeout", "request_timeout", "max_connections"):
        _positive(cfg, key, float)
    _positive(cfg, "batch_timeout", float, zero=True)
    _positive(cfg, "max_pixels", int, zero=True)
    if cfg.batch_timeout >= cfg.request_timeout:
        raise ConfigError(
            f"batch_timeout={cfg.batch_timeout} must be below request_timeout={cfg.request_timeout}"
        )
    if cfg.get("threads") is not None:
        _positive(cfg, "threads")
    device = str(cfg.device)
    if device not in DEVICES:
        raise ConfigError(f"device={device} must be one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda: CUDA is not available here; use device=cpu")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return host, device


def _threads(cfg: DictConfig) -> int:
    if cfg.get("threads") is not None:
        return int(cfg.threads)
    return max(1, cpu_cores() // int(cfg.workers))


def limits_from(cfg: DictConfig) -> Limits:
    return Limits(
        max_bytes=int(float(cfg.max_upload_mb) * 2**20),
        max_files=int(cfg.max_files),
        max_pixels=int(cfg.max_pixels),
        min_size=int(cfg.min_size),
        upload_timeout=float(cfg.upload_timeout),
    )


def service_card(cfg: DictConfig, limits: Limits, device: str, api_key: str | None) -> dict:
    """The limits and batching a caller runs into, shown in the model card."""
    return {
        "max_upload_mb": float(cfg.max_upload_mb),
        "max_files": limits.max_files,
        "max_pixels": limits.max_pixels,
        "min_size": limits.min_size,
        "max_batch_size": int(cfg.max_batch_size),
        "batch_timeout": float(cfg.batch_timeout),
        "workers": int(cfg.workers),
        "device": device,
        "api_key_required": api_key is not None,
    }


def serve(cfg: DictConfig) -> dict:
    """Blocks until the service is stopped (Ctrl+C, SIGTERM)."""
    host, accelerator = check_settings(cfg)
    api_key = cfg.get("api_key") or os.environ.get(KEY_ENV) or None
    limits = limits_from(cfg)
    contract = {"max_tiles": cfg.get("max_tiles"), "aggregate": cfg.get("aggregate")}
    detector = Detector.from_checkpoint(cfg.ckpt, "cpu", cfg.get("threshold"), **contract)
    card = model_card(detector, cfg.ckpt, service_card(cfg, limits, accelerator, api_key))
    model = ModelSettings(
        ckpt=str(cfg.ckpt),
        device=accelerator,
        threshold=detector.threshold,
        max_tiles=detector.preprocessing.max_tiles,
        aggregate=detector.preprocessing.aggregate,
        max_pixels=limits.max_pixels,
        threads=_threads(cfg),
    )
    del detector
    api = DetectorAPI(model, int(cfg.max_batch_size), float(cfg.batch_timeout))
    server = build_server(
        api,
        card,
        limits,
        api_key,
        int(cfg.workers),
        accelerator,
        float(cfg.request_timeout),
        bool(cfg.fast_queue),
    )
    if host != "127.0.0.1" and api_key is None:
        log.warning("host=%s listens on every interface without an api_key", host)
    shown = f"[{host}]" if ":" in host else host
    print(
        f"Serving model {card['model_id']} on http://{shown}:{cfg.port}/ ({cfg.workers} "
        f"worker(s) on {accelerator}): POST /predict, GET /info, GET /health",
        flush=True,
    )
    server.run(
        host=host,
        port=int(cfg.port),
        num_api_servers=int(cfg.api_servers),
        log_level=str(cfg.log_level),
        generate_client_file=False,
        access_log=False,  # the service logs one line per request itself, without image data
        limit_concurrency=int(cfg.max_connections),
        timeout_keep_alive=5,
    )
    return {"model_id": card["model_id"], "host": host, "port": int(cfg.port)}
