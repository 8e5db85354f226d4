"""serve.py: the same numbers as predict.py, every bad input refused with its status and one
line (and the next good request still right), the API key, the model card, the request log.

One service (a subprocess on a free port, small limits so the bad inputs stay small) serves the
whole module.
"""

from __future__ import annotations

import base64
import csv
import io
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detector.files import file_hash
from detector.serve.card import training_folders
from detector.tasks.predict import predict
from detector.tasks.serve import check_settings
from tests.conftest import compose_config, run_script
from tests.serving import multipart, running_service

KEY = "s3cret-key"
SETTINGS = [
    "max_upload_mb=1",
    "max_files=8",
    "upload_timeout=2",
    "max_batch_size=4",
    "workers=2",  # two model processes, each loading the checkpoint: both must answer alike
    "batch_timeout=0.01",
    "device=cpu",
]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def extra_images(folder: Path) -> dict[str, Path]:
    """Files predict.py reads and the service must take too: 16-bit PNG, CMYK JPEG, animated
    GIF, a non-square photo-sized JPEG (resized_from), a palette PNG with transparency."""
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    grey16 = (rng.integers(0, 65535, (40, 48))).astype(np.uint16)
    out["grey16.png"] = Image.fromarray(grey16)
    out["cmyk.jpg"] = Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).convert(
        "CMYK"
    )
    out["wide.jpg"] = Image.fromarray(rng.integers(0, 255, (90, 200, 3), dtype=np.uint8))
    paths = {}
    for name, img in out.items():
        paths[name] = folder / name
        img.save(paths[name])
    frames = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    paths["anim.gif"] = folder / "anim.gif"
    frames[0].save(paths["anim.gif"], save_all=True, append_images=frames[1:], duration=50)
    return paths


@pytest.fixture(scope="module")
def images(trained_run, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("serve_images")
    paths = extra_images(folder)
    for label in ("FAKE", "REAL"):
        for p in sorted((trained_run["data"] / "test" / label).glob("*.jpg"))[:3]:
            paths[f"{label}_{p.name}"] = folder / f"{label}_{p.name}"
            paths[f"{label}_{p.name}"].write_bytes(p.read_bytes())
    return paths


@pytest.fixture(scope="module")
def expected(trained_run, images, tmp_path_factory) -> dict[str, dict]:
    """predict.py's rows for the same files, by file name."""
    out = tmp_path_factory.mktemp("serve_predict")
    folder = next(iter(images.values())).parent
    cfg = compose_config(
        "predict",
        out,
        [f"ckpt={trained_run['ckpt']}", f"input={folder}", "num_workers=0", "device=cpu"],
    )
    cfg.progress = False
    predict(cfg)
    with open(out / "predictions.csv", newline="") as f:
        return {Path(r["path"]).name: r for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def service(trained_run, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("serve_run")
    env = {"DETECTOR_API_KEY": KEY}  # the key from the environment, as a deployment sets it
    with running_service(trained_run["ckpt"], run_dir, *SETTINGS, key=KEY, env=env) as s:
        yield s


def _same(row: dict, want: dict) -> None:
    assert abs(row["probability"] - float(want["prob_REAL"])) <= 1e-5
    assert abs(row["probabilities"]["FAKE"] - float(want["prob_FAKE"])) <= 1e-5
    assert row["label"] == want["label"]
    assert abs(row["ood_score"] - float(want["ood_score"])) <= 1e-4
    assert str(row["in_domain"]) == want["in_domain"]
    assert row["n_tiles"] == int(want["n_tiles"])
    assert (row["resized_from"] or "") == want["resized_from"]
    assert row["threshold"] == float(want["threshold"])
    assert row["model_id"] == want["model_id"]


def test_same_numbers_as_predict(service, images, expected):
    assert expected["wide.jpg"]["resized_from"] == "200x90"  # the file exercises that field
    for name, path in images.items():  # one image per request, multipart
        status, data = service.predict([(name, path.read_bytes())])
        assert status == 200, data
        (row,) = data["predictions"]
        assert row["file"] == name
        _same(row, expected[name])
    # the raw body, and every image in one request (scored in chunks of max_batch_size=4)
    status, data, _ = service.request(
        "POST", "/predict", images["cmyk.jpg"].read_bytes(), "image/jpeg"
    )
    assert status == 200, data
    _same(data["predictions"][0], expected["cmyk.jpg"])
    batch = [(n, p.read_bytes()) for n, p in list(images.items())[:8]]
    status, data = service.predict(batch)
    assert status == 200, data
    assert [r["file"] for r in data["predictions"]] == [n for n, _ in batch]
    for row in data["predictions"]:
        _same(row, expected[row["file"]])


def _bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    """A PNG whose header claims width x height and holds almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _jpeg(size: int = 64) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _multipart_case(files, field="file"):
    body, ctype = multipart(files, field)
    return body, ctype


BAD = {
    "empty body": (b"", "image/jpeg", 400, "empty body"),
    "empty multipart": (*_multipart_case([]), 400, "no 'file' field"),
    "not an image": (bytes(range(256)) * 4, "application/octet-stream", 422, "not an image"),
    "truncated": (_jpeg()[: len(_jpeg()) // 2], "image/jpeg", 422, "truncated"),
    "html as jpg": (
        *_multipart_case([("page.jpg", b"<!DOCTYPE html><html><body>404</body></html>")]),
        422,
        "'page.jpg': an HTML page, not an image",
    ),
    "1x1": (_png(Image.new("RGB", (1, 1))), "image/png", 422, "1x1 pixels is smaller than"),
    "bomb": (_bomb_png(), "image/png", 413, "refused without decoding"),
    "wrong content type": (_jpeg(), "text/plain", 415, "Content-Type text/plain is not accepted"),
    "no boundary": (b"--x\r\n\r\n", "multipart/form-data", 400, "Missing boundary"),
    "malformed multipart": (
        b"--abc\r\nContent-Disposition: form-data; name=file\r\n\r\nxx",
        "multipart/form-data; boundary=zzz",
        400,
        "malformed multipart body",
    ),
    "1000 file fields": (
        *_multipart_case([(f"{i}.png", b"x") for i in range(1000)]),
        413,
        "more than max_files=8 'file' fields",
    ),
    "other field": (*_multipart_case([("a.jpg", _jpeg())], "image"), 400, "'image' is not"),
    "no API key": (_jpeg(), "image/jpeg", 401, "missing or wrong API key"),
    # a path or URL is text to the service, never something it opens or fetches
    "a path": (b"/etc/hostname", "application/octet-stream", 422, "a text file, not an image"),
    "a URL": (b"http://127.0.0.1/x.jpg", "image/jpeg", 422, "a text file, not an image"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_refused_then_good_answered(service, images, expected, case):
    body, ctype, status, message = BAD[case]
    key = None if case == "no API key" else "default"
    got, data, _ = service.request("POST", "/predict", body, ctype, key=key)
    assert got == status, data
    assert message in data["error"], data
    assert "\n" not in data["error"]
    ok, data = service.predict([("FAKE_0000.jpg", images["FAKE_0000.jpg"].read_bytes())])
    assert ok == 200, data
    _same(data["predictions"][0], expected["FAKE_0000.jpg"])


def _raw(port: int, head: bytes, body: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head + body)
    return sock


def _response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) == 0:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]), data.split(b"\r\n\r\n", 1)[1]


def _post_head(length: int) -> bytes:
    return (
        f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nX-API-Key: {KEY}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def test_upload_over_the_cap_refused_before_it_is_read(service):
    """2 MB announced, 1 kB sent: the 413 comes back while the client has sent almost nothing."""
    sock = _raw(service.port, _post_head(2 * 2**20), b"\xff" * 1024)
    status, body = _response(sock)
    sock.close()
    assert status == 413
    assert b"upload of 2.0 MB is over max_upload_mb=1" in body


def test_chunked_upload_over_the_cap_stops_at_the_cap(service):
    sock = _raw(
        service.port,
        _post_head(0).replace(b"Content-Length: 0", b"Transfer-Encoding: chunked"),
        b"",
    )
    chunk = b"%x\r\n" % 2**16 + b"\xff" * 2**16 + b"\r\n"
    sent = 0
    try:
        while sent < 4 * 2**20:  # 4 MB offered, the cap is 1 MB
            sock.sendall(chunk)
            sent += 2**16
    except OSError:  # the service answered and closed: it stopped reading
        pass
    status, body = _response(sock)
    sock.close()
    assert status == 413
    assert b"upload is over max_upload_mb=1" in body


def test_file_name_is_only_a_name(service, images, expected):
    """A client's file name that looks like a server path is echoed, not opened."""
    data = images["REAL_0001.jpg"].read_bytes()
    status, got = service.predict([("../../etc/passwd", data)])
    assert status == 200
    assert got["predictions"][0]["file"] == "../../etc/passwd"
    _same(got["predictions"][0], expected["REAL_0001.jpg"])


def test_slow_client_times_out_and_others_are_served(service, images, expected):
    sock = _raw(service.port, _post_head(5000), b"\xff\xd8" + b"\x00" * 98)  # then stalls
    started = time.monotonic()
    done = {}

    def wait_stalled():
        done["reply"] = _response(sock)
        done["after"] = time.monotonic() - started

    waiter = threading.Thread(target=wait_stalled)
    waiter.start()
    ok, data = service.predict([("REAL_0000.jpg", images["REAL_0000.jpg"].read_bytes())])
    answered_after = time.monotonic() - started
    assert ok == 200
    _same(data["predictions"][0], expected["REAL_0000.jpg"])
    waiter.join(timeout=30)
    sock.close()
    status, body = done["reply"]
    assert status == 408
    assert b"upload not received within upload_timeout=2 s (100 bytes arrived)" in body
    assert answered_after < done["after"]  # the stalled upload held no one up
    assert 1.5 < done["after"] < 10


def test_api_key(service, trained_run):
    for path in ("/", "/info"):
        status, data, headers = service.request("GET", path, key=None)
        assert status == 401 and "API key" in data["error"]
        assert service.request("GET", path, key="wrong")[0] == 401
        assert service.request("GET", path)[0] == 200
    assert service.request("GET", "/", key=None)[2]["www-authenticate"].startswith("Basic")
    assert service.request("GET", "/health", key=None)[:2] == (200, "ok")
    bearer = {"Authorization": f"Bearer {KEY}"}
    assert service.request("GET", "/info", key=None, headers=bearer)[0] == 200
    basic = {"Authorization": "Basic " + base64.b64encode(f"me:{KEY}".encode()).decode()}
    status, page, _ = service.request("GET", "/", key=None, headers=basic)
    assert status == 200 and "<html" in page


def test_info_is_the_model_card(service, trained_run):
    status, card, _ = service.request("GET", "/info")
    assert status == 200
    ckpt = trained_run["ckpt"]
    import torch  # deferred: only this test reads the checkpoint itself

    saved = torch.load(ckpt, weights_only=True)
    hp = saved["hyper_parameters"]
    assert card["model_id"] == file_hash(ckpt)
    assert card["classes"] == ["FAKE", "REAL"]
    assert card["image_size"] == 32
    assert card["preprocessing"]["input"] == "resize"
    assert card["preprocessing"]["description"] == "resize to 32x32"
    assert card["threshold"] == hp["threshold"]
    assert card["threshold_fit"]["rule"] == "balanced_accuracy"
    assert card["threshold_fit"]["split"] == "val"
    assert card["out_of_domain"]["threshold"] == pytest.approx(saved["ood"]["threshold"])
    assert card["family_expert"] is None  # this checkpoint has none (tests/test_family_expert.py)
    assert card["training"]["backbone"] == "test_resnet"
    assert card["training"]["date"].startswith(time.strftime("%Y-", time.gmtime()))
    assert card["service"]["max_files"] == 8
    assert card["service"]["api_key_required"] is True


def test_training_folders_from_the_run(tmp_path):
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text(
        "data:\n  root: /srv/data/cifake\n  train_dir: null\n  test_dirs: {sd: /x/sdv14}\n"
    )
    (tmp_path / "run" / "checkpoints").mkdir()
    assert training_folders(tmp_path / "run" / "checkpoints" / "a.ckpt") == ["cifake", "sdv14"]
    assert training_folders(tmp_path / "elsewhere.ckpt") is None


def test_request_log_line(service):
    text = service.log.read_text()
    lines = [ln for ln in text.splitlines() if "POST /predict 200" in ln]
    assert lines, text[-2000:]
    assert any(" 1 image(s) " in ln and ("REAL" in ln or "FAKE" in ln) for ln in lines)
    assert any("/predict 413" in ln for ln in text.splitlines())
    assert all(len(ln) < 300 for ln in lines)  # no image data in the log
    assert "POST /predict 200" in (service.log.parent / "serve.log").read_text()  # the run's log


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("host=10.1.2.3", "host=10.1.2.3: use 127.0.0.1"),
        ("port=80", "port=80 must be an integer from 1024 to 65535"),
        ("max_batch_size=0", "max_batch_size=0 must be an integer > 0"),
        ("batch_timeout=40", "batch_timeout=40 must be below request_timeout=30"),
        ("device=tpu", "device=tpu must be one of auto, cpu, cuda"),
        ("ckpt=null", "ckpt is not set"),
    ],
)
def test_settings_checked(tmp_path, override, message):
    from detector.errors import ConfigError  # deferred: only the settings tests need it

    cfg = compose_config("serve", tmp_path, ["ckpt=x.ckpt", override])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        check_settings(cfg)


def test_bad_checkpoint_one_line(tmp_path):
    result = run_script("serve.py", f"ckpt={tmp_path / 'missing.ckpt'}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: ckpt={tmp_path / 'missing.ckpt'}: no such file"
    ]


@pytest.mark.slow
def test_small_load_no_errors_memory_flat(service, images):
    """200 requests from 16 connections (the full 2,000 x 32 run is bench/serve.py)."""
    import importlib.util  # deferred: the benchmark's client, loaded from bench/ only here

    path = Path(__file__).resolve().parents[1] / "bench" / "serve.py"
    spec = importlib.util.spec_from_file_location("bench_serve", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    payloads = [
        multipart([(n, p.read_bytes())])
        for n, p in images.items()
        if n.startswith(("FAKE", "REAL"))
    ]
    result = bench.load(
        service.port, service.proc.pid, payloads, 200, 16, headers={"X-API-Key": KEY}
    )
    assert result["errors"] == 0, result["first_errors"]
    assert result["rss_growth"] < 0.10


def test_bad_file_does_not_fail_its_batch(trained_run, images, expected):
    """LitServe fails a whole batch when one request raises: decoding errors are values."""
    from detector.serve.app import DetectorAPI, ModelSettings  # deferred: LitServe, only here

    settings = ModelSettings(str(trained_run["ckpt"]), "cpu", None, None, None, 10**8, 1)
    api = DetectorAPI(settings, max_batch_size=4, batch_timeout=0.01)
    api.setup("cpu")

    def request(name: str, data: bytes) -> dict:
        return {"images": [{"name": name, "data": base64.b64encode(data).decode()}]}

    good = images["REAL_0000.jpg"].read_bytes()
    batch = [
        api.decode_request(request("a.jpg", good)),
        api.decode_request(request("cut.jpg", good[: len(good) // 2])),
        api.decode_request(request("b.jpg", images["cmyk.jpg"].read_bytes())),
    ]
    out = [api.encode_response(y) for y in api.unbatch(api.predict(api.batch(batch)))]
    assert out[1]["status"] == 422 and out[1]["error"].startswith("'cut.jpg': truncated")
    _same(out[0]["predictions"][0], expected["REAL_0000.jpg"])
    _same(out[2]["predictions"][0], expected["cmyk.jpg"])


def test_crop_model_tiles_batched_across_requests(tmp_path):
    """A crop model's tiles from several requests, scored in chunks, equal Detector.predict."""
    from detector.api import Detector  # deferred: an untrained crop model, only here
    from detector.module import DetectorModule
    from detector.serve.app import DetectorAPI, ModelSettings

    module = DetectorModule(image_size=32, input="crop", max_tiles=6, backbone="test_resnet")
    detector = Detector(module.eval(), device="cpu", model_id="crop")
    api = DetectorAPI(ModelSettings("-", "cpu", None, None, None, 10**8, 1), 2, 0.01)
    api.detector = detector  # as setup() would load it
    rng = np.random.default_rng(1)
    sizes = [(96, 96), (40, 70), (128, 64)]
    pngs = [
        _png(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))) for w, h in sizes
    ]

    def request(*datas: bytes) -> dict:
        encoded = [base64.b64encode(d).decode() for d in datas]
        return {"images": [{"name": f"{i}.png", "data": e} for i, e in enumerate(encoded)]}

    batch = [api.decode_request(request(pngs[0])), api.decode_request(request(pngs[1], pngs[2]))]
    rows = [r for y in api.unbatch(api.predict(api.batch(batch))) for r in y]
    want = detector.predict([Image.open(io.BytesIO(d)) for d in pngs])
    assert [r["n_tiles"] for r in rows] == [w.n_tiles for w in want]
    assert min(w.n_tiles for w in want) > 1  # every image was cut into tiles
    for row, w in zip(rows, want, strict=True):
        assert abs(row["probability"] - w.probability) <= 1e-5
        assert row["label"] == w.label
