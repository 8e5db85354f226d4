"""The service under load (issue #18): a bounded client on 127.0.0.1 sends REQUESTS single-image
uploads from CONCURRENCY keep-alive connections, once with dynamic batching and once with batch
size 1; then predict.py scores the same images as files. Reports errors, p50/p95/p99 latency,
images/s and the service's memory (RSS of all its processes after the first 100 requests and
at the end).

    python bench/serve.py [CKPT] [--requests 2000] [--baseline-requests 300] [--concurrency 32]
                [--batch 16] [--batch-timeout 0.005] [--workers 1] [--images FOLDER] [--no-predict]

Without CKPT it trains a throw-away checkpoint of the default model (ResNet50-SE, 32 px, one
epoch on 48 generated images: its speed, not its accuracy, is what counts here).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.client import HTTPConnection
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import TINY, compose_config, make_image_folder  # noqa: E402
from tests.serving import multipart, running_service  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def group_rss_mb(pgid: int) -> float:
    """Resident memory of every process in the service's process group (its workers too)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:
                continue
            for line in (stat.parent / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a process that ended while we looked
    return total / 1024


def load(
    port: int, pgid: int, payloads: list, n: int, concurrency: int, headers: dict | None = None
) -> dict:
    """``n`` requests from ``concurrency`` threads, each on one keep-alive connection."""
    lock = threading.Lock()
    state = {"next": 0, "done": 0, "rss_100": None}
    latencies: list[float] = []
    errors: list[str] = []

    def worker() -> None:
        conn = HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                i = state["next"]
                state["next"] += 1
            if i >= n:
                break
            body, ctype = payloads[i % len(payloads)]
            start = time.perf_counter()
            try:
                conn.request("POST", "/predict", body, {"Content-Type": ctype, **(headers or {})})
                resp = conn.getresponse()
                data = resp.read()
                if resp.status != 200 or b'"predictions"' not in data:
                    errors.append(f"{resp.status} {data[:200]!r}")
            except OSError as e:
                errors.append(repr(e))
                conn.close()
                conn = HTTPConnection("127.0.0.1", port, timeout=120)
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
                state["done"] += 1
                first = state["done"] == min(100, n)
            if first:
                state["rss_100"] = group_rss_mb(pgid)
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    rss_end = group_rss_mb(pgid)
    return {
        "requests": n,
        "errors": len(errors),
        "first_errors": errors[:3],
        "p50_ms": q[49] * 1000,
        "p95_ms": q[94] * 1000,
        "p99_ms": q[98] * 1000,
        "images_per_s": n / wall,
        "rss_after_100_mb": state["rss_100"],
        "rss_end_mb": rss_end,
        "rss_growth": rss_end / state["rss_100"] - 1 if state["rss_100"] else None,
    }


def make_checkpoint(work: Path) -> Path:
    from detector.tasks.train import train  # deferred: only without a CKPT argument

    data = make_image_folder(work / "images")
    overrides = [o for o in TINY if not o.startswith("model.backbone")]
    cfg = compose_config(
        "train", work / "run", [*overrides, "data=imagefolder", f"data.root={data}"]
    )
    return Path(train(cfg)["best_model_path"])


def predict_rate(ckpt: Path, files: list[Path], work: Path) -> dict:
    """predict.py on the same images as files: wall time for all, and for one (its start-up)."""
    many = work / "predict_many"
    many.mkdir()
    for i, f in enumerate(files):
        shutil.copy(f, many / f"{i:05d}{f.suffix}")
    one = work / "predict_one"
    one.mkdir()
    shutil.copy(files[0], one / files[0].name)
    times = {}
    for name, folder in (("one", one), ("all", many)):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, str(ROOT / "predict.py"), f"ckpt={ckpt}", f"input={folder}",
             f"output={work / name}.csv", "device=cpu", "progress=false"],
            check=True, capture_output=True, cwd=work,
        )  # fmt: skip
        times[name] = time.perf_counter() - start
    n = len(files)
    return {
        "images": n,
        "wall_s": times["all"],
        "startup_s": times["one"],
        "images_per_s": n / times["all"],
        "images_per_s_after_startup": (n - 1) / max(times["all"] - times["one"], 1e-9),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", nargs="?")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--baseline-requests", type=int, default=300, help="for batch size 1")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batch-timeout", type=float, default=0.005)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=Path, help="a folder of images (default: generated)")
    parser.add_argument("--no-predict", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    ckpt = Path(args.ckpt) if args.ckpt else make_checkpoint(work)
    folder = args.images or make_image_folder(work / "load", n_train=0, n_test=32)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".png"))[:256]
    payloads = [multipart([(f.name, f.read_bytes())]) for f in files]
    common = [f"workers={args.workers}", f"device={args.device}", "log_level=warning"]
    modes = {
        f"dynamic batching (max_batch_size={args.batch}, batch_timeout={args.batch_timeout})": [
            f"max_batch_size={args.batch}",
            f"batch_timeout={args.batch_timeout}",
        ],
        "batch size 1": ["max_batch_size=1", "batch_timeout=0"],
    }
    counts = [args.requests, args.baseline_requests]
    report = {"ckpt": str(ckpt), "concurrency": args.concurrency, "modes": {}}
    for (name, settings), n in zip(modes.items(), counts, strict=True):
        with running_service(ckpt, work / f"run{len(report['modes'])}", *common, *settings) as s:
            load(s.port, s.proc.pid, payloads, 50, min(8, args.concurrency))  # warm-up
            report["modes"][name] = load(s.port, s.proc.pid, payloads, n, args.concurrency)
        print(name, json.dumps(report["modes"][name]), flush=True)
    if not args.no_predict:
        chosen = [files[i % len(files)] for i in range(args.requests)]
        report["predict.py"] = predict_rate(ckpt, chosen, work)
        print("predict.py", json.dumps(report["predict.py"]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    shutil.rmtree(work, ignore_errors=True)


def table(report: dict) -> str:
    rows = ["| run | errors | p50 ms | p95 ms | p99 ms | images/s | RSS after 100 -> end (MB) |",
            "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, r in report["modes"].items():
        rows.append(
            f"| {name} | {r['errors']} / {r['requests']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} "
            f"| {r['p99_ms']:.1f} | {r['images_per_s']:.1f} | {r['rss_after_100_mb']:.0f} -> "
            f"{r['rss_end_mb']:.0f} ({100 * r['rss_growth']:+.1f}%) |"
        )
    p = report.get("predict.py")
    if p:
        rows.append(
            f"| predict.py, {p['images']} files | - | - | - | - | {p['images_per_s']:.1f} "
            f"({p['images_per_s_after_startup']:.1f} after its {p['startup_s']:.1f} s start-up) "
            "| - |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
