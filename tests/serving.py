"""Running serve.py in tests and benchmarks: a free port, start and wait until ready, stop,
and a small HTTP client (http.client, so nothing beyond the standard library)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    def __init__(self, port: int, proc: subprocess.Popen, log: Path, key: str | None) -> None:
        self.port = port
        self.proc = proc
        self.log = log
        self.key = key

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str | None = None,
        key: str | None = "default",
        headers: dict | None = None,
        timeout: float = 60,
    ) -> tuple[int, dict | str, dict]:
        """(status, JSON body or text, headers); ``key="default"`` sends the service's key."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        head = dict(headers or {})
        if content_type:
            head["Content-Type"] = content_type
        key = self.key if key == "default" else key
        if key:
            head["X-API-Key"] = key
        try:
            conn.request(method, path, body=body, headers=head)
            resp = conn.getresponse()
            raw = resp.read()
            text = raw.decode("utf-8", "replace")
            try:
                data = json.loads(text)
            except ValueError:
                data = text
            return resp.status, data, dict(resp.getheaders())
        finally:
            conn.close()

    def predict(self, files: list[tuple[str, bytes]], **kw) -> tuple[int, dict | str]:
        body, ctype = multipart(files)
        status, data, _ = self.request("POST", "/predict", body, ctype, **kw)
        return status, data


def multipart(files: list[tuple[str, bytes]], field: str = "file") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
            f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
            + data
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _ready(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/health")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


@contextmanager
def running_service(
    ckpt: Path, run_dir: Path, *settings: str, key: str | None = None, env: dict | None = None
):
    """serve.py on a free port until the block ends; its output goes to ``run_dir/serve.out``."""
    port = free_port()
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "serve.out"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("PROJECT_ROOT", None)
    args = [f"ckpt={ckpt}", f"port={port}", f"hydra.run.dir={run_dir}", *settings]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "serve.py"), *args],
            cwd=run_dir,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its workers form one group, stopped together below
        )
    try:
        deadline = time.monotonic() + 120
        while not _ready(port):
            if proc.poll() is not None:
                raise RuntimeError(f"serve.py exited ({proc.returncode}):\n{log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"serve.py not ready after 120 s:\n{log.read_text()}")
            time.sleep(0.3)
        yield Service(port, proc, log, key)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGINT (LitServe's graceful shutdown), then SIGKILL to what is left of its group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
