"""Inference speed: eager PyTorch vs ONNX Runtime (and bf16, int8), the engine, and the API, in one run.

    python benchmarks/inference.py [--checkpoint PATH ...] [--repeats 20] [--threads 2] [--out docs/performance.md]

For every shipped model (models/<name>/model.pt, or each --checkpoint): the FLOPs of one forward pass;
per-slice latency (median, p95) and throughput at batch 1 and 8 for each runtime setting, timed
round-robin so every setting sees the same machine load; the Dice cost of bf16 and int8 (against the
fp32 masks, and against the ground truth on test slices of the reference data when it is there); the
engine end to end (preprocess, network, mask, lesions); and POST /v1/segment through a real uvicorn
server, one client and then 16 concurrent ones while /health is polled. Writes the Markdown report.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static
from torch.utils.flop_counter import FlopCounterMode

from brainmets.checkpoints import load_checkpoint, model_from_checkpoint
from brainmets.export import export_onnx
from brainmets.inference import ONNX_SHA_KEY, Network, Predictor, encode_png, file_sha256, onnx_session
from brainmets.metrics import dice
from brainmets.models import autocast, count_parameters
from brainmets.preprocessing import enhance, normalize, resize_mask
from brainmets.registry import SHIPPED, best_name, models_dir

REPO = Path(__file__).resolve().parents[1]
PEAK_GFLOPS = 183.0  # fp32, 2 cores x 32 FLOP/cycle (AVX-512 FMA, double-pumped on Zen 4) x ~2.86 GHz
BATCHES = (1, 8)
TARGETS = {"engine_ms": 20.0, "api_p50_ms": 30.0, "speedup": 2.0}


# ---- inputs ----------------------------------------------------------------------------------------

def reference_slices(ckpt: dict, data: Path | None, size: int, n: int = 24):
    """(eval images uint8 (N, H, W, 3), eval masks, calibration images): lesion-bearing slices of the
    model's test patients and slices of its validation patients, or random images without the data."""
    if data is None or not data.is_dir() or "split" not in ckpt:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        return images, None, images[: n // 2]
    from brainmets.data import open_dataset

    dataset = open_dataset(data)

    def pick(patients: list[str], count: int, lesions: bool):
        pairs = [s for s in dataset.slices if s.patient in set(patients)]
        if lesions:
            pairs = [s for s in pairs if dataset.read_mask(s).any()]
        pairs = pairs[:: max(1, len(pairs) // count)][:count]
        return [dataset.read_image(s) for s in pairs], [dataset.read_mask(s) for s in pairs]

    images, masks = pick(ckpt["split"]["test"], n, lesions=True)
    calibration, _ = pick(ckpt["split"]["val"], n // 2, lesions=False)
    if not images or not calibration:  # a model trained on other data
        return reference_slices(ckpt, None, size, n)
    return np.stack(images), np.stack(masks), np.stack(calibration)


def batch_of(images: np.ndarray, batch: int, cfg) -> np.ndarray:
    """Preprocessed float32 (batch, 3, S, S), cycling through the images."""
    return np.stack([normalize(enhance(images[i % len(images)], cfg.preprocess)) for i in range(batch)])


# ---- runtimes --------------------------------------------------------------------------------------

def ort_session(path: Path, threads: int, level: ort.GraphOptimizationLevel, spinning: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class Calibration(CalibrationDataReader):
    def __init__(self, batches: list[np.ndarray]):
        self.batches = iter(batches)

    def get_next(self):
        return next(({"image": b} for b in self.batches), None)


def quantize_int8(onnx_path: Path, calibration: list[np.ndarray], out: Path) -> Path:
    """Static QDQ int8: per-channel weights, activation ranges calibrated on real slices (VNNI kernels).
    The graph is first optimised and shape-inferred, as ORT's quantiser recommends (symbolic inference
    cannot follow the free spatial sizes, so only ONNX's own runs)."""
    logging.getLogger().setLevel(logging.ERROR)  # the quantiser logs advice on the root logger
    prepared = out.with_name(f"{out.stem}-prepared.onnx")
    with contextlib.chdir(out.parent):  # the quantiser leaves temporary files in the working folder
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out), Calibration(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    return out


def runtimes(model: torch.nn.Module, onnx_path: Path, int8_path: Path | None, threads: int) -> dict:
    """label -> forward(float32 batch) -> logits; the first is the baseline the others are compared to."""
    torch.set_num_threads(threads)

    def eager(bf16: bool):
        @torch.inference_mode()
        def forward(x):
            with autocast(bf16):
                return model(torch.from_numpy(x)).float().numpy()
        return forward

    def session(s: ort.InferenceSession):
        return lambda x: s.run(None, {"image": x})[0]

    basic, all_opt = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    out = {
        "PyTorch eager fp32": eager(False),
        "PyTorch eager bf16 autocast": eager(True),
        "ORT basic graph optimisations": session(ort_session(onnx_path, threads, basic, spinning=False)),
        "ORT all optimisations, spinning threads": session(ort_session(onnx_path, threads, all_opt, spinning=True)),
        "ORT all optimisations, 1 thread": session(onnx_session(onnx_path, 1)),
        "ORT all optimisations (engine)": session(onnx_session(onnx_path, threads)),
    }
    if int8_path:
        out["ORT int8 (static QDQ)"] = session(onnx_session(int8_path, threads))
    return out


def time_round_robin(fns: dict, inputs: dict[int, np.ndarray], repeats: int) -> dict:
    """{(label, batch): [seconds]}: each repeat times every setting once, so slow spells hit all alike."""
    for fn in fns.values():  # warm-up: allocations, kernel selection
        for x in inputs.values():
            fn(x)
    times = {(label, b): [] for label in fns for b in inputs}
    for _ in range(repeats):
        for label, fn in fns.items():
            for b, x in inputs.items():
                t0 = time.perf_counter()
                fn(x)
                times[label, b].append(time.perf_counter() - t0)
    return times


def mask_dice(fns: dict, images: np.ndarray, truth: np.ndarray | None, cfg) -> dict:
    """Pooled Dice of each setting's masks against the fp32 masks and, when known, the ground truth."""
    x = batch_of(images, len(images), cfg)
    masks = {label: np.concatenate([fn(x[i:i + 8]) for i in range(0, len(x), 8)])[:, 0] >= 0 for label, fn in fns.items()}
    reference = masks["PyTorch eager fp32"]
    size = cfg.preprocess.image_size
    gt = None if truth is None else np.stack([resize_mask(m, size) for m in truth]).astype(bool)
    return {label: (dice(m, reference), None if gt is None else dice(m, gt)) for label, m in masks.items()}


def forward_flops(model: torch.nn.Module, size: int) -> int:
    """Multiply-adds x 2 of the convolutions and matrix products (what the cores' FMA units execute)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.rand(1, 3, size, size))
    return counter.get_total_flops()


# ---- engine and API --------------------------------------------------------------------------------

def percentiles(seconds: list[float]) -> tuple[float, float, float]:
    ms = np.array(seconds) * 1000
    return float(np.median(ms)), float(np.percentile(ms, 95)), float(np.percentile(ms, 99))


def engine_latency(checkpoint: Path, image: np.ndarray, threads: int, repeats: int) -> dict:
    predictor = Predictor([Network.load(checkpoint, "onnxruntime", threads)], "bench")
    out = {}
    for tta in (False, True):
        predictor.predict(image, tta=tta)
        out[tta] = [predictor.predict(image, tta=tta).seconds for _ in range(repeats)]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def api_server(models: Path, threads: int):
    port = free_port()
    env = {**os.environ, "BRAINMETS_MODELS": str(models), "BRAINMETS_THREADS": str(threads)}
    process = subprocess.Popen([sys.executable, "-m", "brainmets", "serve", "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            if process.poll() is not None:
                raise RuntimeError("the API server exited during start-up")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def api_latency(url: str, name: str, png: bytes, repeats: int, clients: int = 16) -> dict:
    files = {"file": ("slice.png", png, "image/png")}
    params = {"model": name}
    with httpx.Client(timeout=60) as client:
        for _ in range(3):
            client.post(f"{url}/v1/segment", files=files, params=params).raise_for_status()
        sequential = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            client.post(f"{url}/v1/segment", files=files, params=params).raise_for_status()
            sequential.append(time.perf_counter() - t0)

    def one(_):
        with httpx.Client(timeout=60) as c:
            t0 = time.perf_counter()
            status = c.post(f"{url}/v1/segment", files=files, params=params).status_code
            return status, time.perf_counter() - t0

    health, done = [], threading.Event()

    def poll():
        with httpx.Client(timeout=10) as c:
            while not done.is_set():
                t0 = time.perf_counter()
                c.get(f"{url}/health")
                health.append(time.perf_counter() - t0)
                time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients * max(4, repeats // 4))))
    wall = time.perf_counter() - t0
    done.set()
    poller.join()
    return {"sequential": sequential, "concurrent": [s for _, s in results], "errors": sum(c != 200 for c, _ in results),
            "requests": len(results), "throughput": len(results) / wall, "health": health, "clients": clients}


# ---- report ----------------------------------------------------------------------------------------

def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores; Python {platform.python_version()}, torch {torch.__version__}, "
            f"onnxruntime {ort.__version__}")


def fmt(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def model_section(r: dict, threads: int) -> list[str]:
    lines = [f"## {r['name']}", "",
             f"`{r['checkpoint']}`: {r['params'] / 1e6:.2f} M parameters, {r['gflops']:.2f} GFLOP per "
             f"{r['size']}² slice (multiply-adds x 2 of the convolutions). {threads} threads.", "",
             "| setting | batch | median ms/slice | p95 ms/slice | slices/s | vs eager fp32 | % of fp32 peak "
             "| Dice vs fp32 masks | Dice vs ground truth |",
             "|---|---|---|---|---|---|---|---|---|"]
    for b in BATCHES:
        base = statistics.median(r["times"]["PyTorch eager fp32", b])
        for label in r["dice"]:
            t = statistics.median(r["times"][label, b]) / b
            p95 = float(np.percentile(r["times"][label, b], 95)) / b
            peak = r["gflops"] / t / PEAK_GFLOPS * 100
            d_ref, d_gt = r["dice"][label]
            lines.append(f"| {label} | {b} | {t * 1000:.1f} | {p95 * 1000:.1f} | {1 / t:.1f} | {base / b / t:.2f}x | "
                         f"{peak:.0f}% | {fmt(d_ref, 4)} | {fmt(d_gt, 4)} |")
    e = r["engine"]
    lines += ["", "Engine end to end (`Predictor.predict` on one uint8 slice: preprocessing with CLAHE, ONNX Runtime, "
              "resize back, threshold, lesions):", "",
              "| | median ms | p95 ms |", "|---|---|---|"]
    for tta, label in ((False, "one slice"), (True, "one slice, flip TTA (3 passes)")):
        med, p95, _ = percentiles(e[tta])
        lines.append(f"| {label} | {med:.1f} | {p95:.1f} |")
    if r.get("api"):
        a = r["api"]
        s, c, h = percentiles(a["sequential"]), percentiles(a["concurrent"]), percentiles(a["health"])
        lines += ["", f"API end to end (`POST /v1/segment`, a {r['size']}² PNG, JSON answer with both PNGs, real "
                  f"uvicorn server on loopback, keep-alive client):", "",
                  "| | requests | p50 ms | p95 ms | p99 ms | throughput | errors |", "|---|---|---|---|---|---|---|",
                  f"| 1 client | {len(a['sequential'])} | {s[0]:.1f} | {s[1]:.1f} | {s[2]:.1f} | "
                  f"{1000 / s[0]:.1f} req/s | 0 |",
                  f"| {a['clients']} concurrent clients | {a['requests']} | {c[0]:.1f} | {c[1]:.1f} | {c[2]:.1f} | "
                  f"{a['throughput']:.1f} req/s | {a['errors']} |",
                  "", f"`GET /health` during the concurrent run: p50 {h[0]:.1f} ms, p95 {h[1]:.1f} ms, "
                  f"max {max(a['health']) * 1000:.1f} ms over {len(a['health'])} polls."]
    return lines + [""]


def targets_section(r: dict) -> list[str]:
    engine = percentiles(r["engine"][False])[0]
    eager = statistics.median(r["times"]["PyTorch eager fp32", 1]) * 1000
    ours = statistics.median(r["times"]["ORT all optimisations (engine)", 1]) * 1000
    api = percentiles(r["api"]["sequential"])[0] if r.get("api") else None
    health = max(r["api"]["health"]) * 1000 if r.get("api") else None
    check = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    rows = [("one slice in the engine", f"≤ {TARGETS['engine_ms']:g} ms", f"{engine:.1f} ms",
             check(engine <= TARGETS["engine_ms"])),
            ("ONNX Runtime vs eager PyTorch, batch 1", f"≥ {TARGETS['speedup']:g}x", f"{eager / ours:.2f}x",
             check(eager / ours >= TARGETS["speedup"]))]
    if api is not None:
        rows += [("API p50, one client", f"≤ {TARGETS['api_p50_ms']:g} ms", f"{api:.1f} ms", check(api <= TARGETS["api_p50_ms"])),
                 ("16 concurrent clients", "0 errors, /health ≤ 100 ms",
                  f"{r['api']['errors']} errors, /health max {health:.0f} ms",
                  check(r["api"]["errors"] == 0 and health <= 100))]
    floor = r["gflops"] / PEAK_GFLOPS * 1000
    return [f"## Targets ({r['name']}: the best shipped model, or the first --checkpoint)", "", "| target | goal | measured | |", "|---|---|---|---|",
            *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows], "",
            f"Floor: one forward pass of {r['name']} is {r['gflops']:.2f} GFLOP, {floor:.0f} ms at 100% of the "
            f"{PEAK_GFLOPS:g} GFLOP/s fp32 peak; int8 (VNNI) has 4x that peak.", ""]


def write_report(out: Path, results: list[dict], args, load: tuple[float, float]) -> None:
    command = "python benchmarks/inference.py " + " ".join(sys.argv[1:])
    busy = load[0] > len(os.sched_getaffinity(0)) or load[1] > len(os.sched_getaffinity(0))
    lines = ["# Inference performance", "",
             f"Generated by `{command.strip()}` on {datetime.date.today().isoformat()}; rerun it to regenerate "
             f"this page.", "",
             f"Machine: {machine()}. Load average (1 min) {load[0]:.1f} at the start, {load[1]:.1f} at the end"
             + (" — other work shared the cores, so these times are noisy upper bounds." if busy else "."), "",
             f"Latencies are per slice (batch time / batch size), median and 95th percentile of {args.repeats} "
             f"round-robin repeats. % of peak = achieved GFLOP/s over {PEAK_GFLOPS:g} GFLOP/s, the fp32 peak of "
             f"the {args.threads} cores. Dice is pooled over {results[0]['n_eval']} slices "
             + ("(lesion-bearing test slices of the reference data)." if results[0]["real"] else
                "(random images: no reference data found, so the ground-truth column is empty)."), ""]
    lines += targets_section(results[0])
    for r in results:
        lines += model_section(r, args.threads)
    lines += ["## Settings", "",
              "- *PyTorch eager*: the model as trained, `torch.inference_mode()`; *bf16 autocast* runs the "
              "convolutions in bfloat16 (AVX-512 BF16).",
              "- *ORT*: the ONNX export (`brainmets export`) in ONNX Runtime's CPU provider. *basic*: constant "
              "folding and redundant-node removal only; *all*: plus operator fusions (Conv+BatchNorm+ReLU) and "
              "the NCHWc memory layout. *spinning*: idle intra-op threads busy-wait for work (ORT's default); "
              "the engine lets them sleep, leaving the cores to the server's other requests.",
              "- *int8 (static QDQ)*: per-channel int8 weights and uint8 activations with ranges calibrated on "
              "validation slices (`onnxruntime.quantization.quantize_static`). Its % of peak is against the fp32 "
              "peak too; VNNI's int8 peak is 4x higher.",
              "- The engine and the API use *ORT all optimisations (engine)* with "
              f"{args.threads} threads, one inference at a time (`BRAINMETS_WORKERS=1`).", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))


# ---- main ------------------------------------------------------------------------------------------

def benchmark(name: str, checkpoint: Path, args, work: Path) -> dict:
    given = checkpoint
    ckpt = load_checkpoint(checkpoint)
    model, cfg = model_from_checkpoint(ckpt)
    size = cfg.preprocess.image_size
    onnx_path = checkpoint.with_suffix(".onnx")
    if not onnx_path.exists() or ort.InferenceSession(str(onnx_path)).get_modelmeta().custom_metadata_map.get(
            ONNX_SHA_KEY) != file_sha256(checkpoint):
        local = work / name / "model.pt"
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(checkpoint, local)
        onnx_path = export_onnx(local).onnx
        checkpoint = local
    print(f"{name}: {checkpoint}", flush=True)
    images, masks, calibration = reference_slices(ckpt, args.data, size)
    int8 = None
    if not args.no_int8:
        int8 = quantize_int8(onnx_path, [batch_of(calibration[i:], 4, cfg) for i in range(0, len(calibration), 4)],
                             work / f"{name}-int8.onnx")
    fns = runtimes(model, onnx_path, int8, args.threads)
    inputs = {b: batch_of(images, b, cfg) for b in BATCHES}
    times = time_round_robin(fns, inputs, args.repeats)
    result = {"name": name, "checkpoint": given, "params": count_parameters(model), "size": size,
              "gflops": forward_flops(model, size) / 1e9, "times": times, "dice": mask_dice(fns, images, masks, cfg),
              "engine": engine_latency(checkpoint, images[0], args.threads, args.repeats),
              "n_eval": len(images), "real": masks is not None}
    if not args.no_server:
        served = work / "models" / cfg.name
        served.mkdir(parents=True, exist_ok=True)
        for file, source in (("model.pt", checkpoint), ("model.onnx", onnx_path)):
            (served / file).unlink(missing_ok=True)
            (served / file).symlink_to(Path(source).resolve())
        (served / "metrics.json").write_text('{"dice_per_patient_mean": 0}\n')  # only so the server can start
        with api_server(work / "models", args.threads) as url:
            result["api"] = api_latency(url, cfg.name, encode_png(np.ascontiguousarray(images[0][..., ::-1])),
                                        args.repeats * 2)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, action="append",
                    help="a .pt checkpoint to measure (repeatable); default: the shipped models in models/")
    ap.add_argument("--repeats", type=int, default=20, help="timed repeats of every setting")
    ap.add_argument("--threads", type=int, default=2, help="threads of one inference (this machine has 2 cores)")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "lgg",
                    help="reference data for real slices and the Dice columns (random images without it)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "performance.md")
    ap.add_argument("--no-server", action="store_true", help="skip the end-to-end API measurement")
    ap.add_argument("--no-int8", action="store_true", help="skip int8 quantisation")
    args = ap.parse_args()
    if args.checkpoint:
        models = [(load_checkpoint(c)["config"]["model"]["name"], c.resolve()) for c in args.checkpoint]
    else:
        shipped = [n for n in SHIPPED if (models_dir() / n / "model.pt").exists()]
        with contextlib.suppress(FileNotFoundError):
            shipped.sort(key=lambda n: n != best_name())  # the best model first: the targets are its
        models = [(n, models_dir() / n / "model.pt") for n in shipped]
    if not models:
        sys.exit(f"no model to measure: nothing in {models_dir()} and no --checkpoint given")
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        results = [benchmark(name, Path(c), args, Path(tmp)) for name, c in models]
    write_report(args.out, results, args, (load_start, os.getloadavg()[0]))
    print(f"{args.out} written")


if __name__ == "__main__":
    main()
