"""Inference speed and agreement of every runtime of the engine, the engine itself and the API, in one run.

    python benchmarks/inference.py [--repeats 20] [--threads 2] [--out docs/performance.md] [--no-agreement]

For each shipped network and the ensemble: per-slice latency at batch 1 and 16 of PyTorch eager fp32, ONNX
Runtime fp32, OpenVINO f32 and OpenVINO bf16, timed round-robin so every setting sees the same machine load,
with the fraction of the CPU's matmul peak; f32 and bf16 side by side with the precision `auto` chose on this
machine and why (served: what `auto` chose, measured in a cache of its own); the masks of each runtime
against PyTorch fp32's on every test slice of the reference data, and the per-patient Dice each gives (the
engine's own post-processing, as `brainmets evaluate`); one patient's stack of 88 slices through `predict_stack`;
the engine end to end on one slice; `brainmets serve` start-up (first /health, cold and warm compiled-model
cache) and `POST /v1/segment` through a real uvicorn server, one client and then 16 concurrent ones while
/health is polled. Writes the Markdown report.

Batches and overlap (issue 29 items 2 and 4; alone with `--batching-only`, which prints its section instead of
writing the report): the batch size each network chose at the precision it runs; `predict_stack` on the 88 slices
and a 51-slice three-series DICOM study (benchmarks/study.py's) through `POST /v1/segment/study?format=dicom-seg`
with `best`, each timed against the engine as it was before (every slice preprocessed first, then batches of 16),
the two interleaved in one run; and `POST /v1/segment` per 256² slice for each network through a real server
against the network alone on the same slice, timed alternately, the difference being the API's own overhead.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import cv2
import httpx
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from brainmets.cache import preprocessed
from brainmets.checkpoints import load_checkpoint, model_from_checkpoint
from brainmets.data import open_dataset
from brainmets.evaluation import engine_probabilities, report
from brainmets.inference import Network, Predictor, resize_probability
from brainmets.metrics import dice
from brainmets.precision import cpu_name
from brainmets.preprocessing import normalize
from brainmets.registry import ENSEMBLE, SHIPPED, best_name, ensemble_post, models_dir

REPO = Path(__file__).resolve().parents[1]
# 2-thread matmul peaks measured on this machine (brief): fp32 and bf16 (avx512_bf16).
PEAK_GFLOPS = {"fp32": 183.0, "bf16": 409.0}
BATCHES = (1, 16)
SETTINGS = {  # label -> (runtime, precision)
    "PyTorch eager fp32": ("torch", "f32"),
    "ONNX Runtime fp32": ("onnxruntime", "f32"),
    "OpenVINO f32": ("openvino", "f32"),
    "OpenVINO bf16": ("openvino", "bf16"),
}
REFERENCE = "PyTorch eager fp32"
TARGETS_MS = {"unetpp": 28.0, "attention-unet": 17.0, ENSEMBLE: 45.0}


def predictors(name: str, threads: int) -> dict[str, Predictor]:
    members = SHIPPED if name == ENSEMBLE else (name,)
    post = ensemble_post() if name == ENSEMBLE else None
    return {label: Predictor([Network.load(models_dir() / m / "model.pt", rt, threads, p) for m in members], name, post)
            for label, (rt, p) in SETTINGS.items()}


def auto_choice(name: str, threads: int) -> tuple[str, list[str]]:
    """The setting `BRAINMETS_PRECISION=auto` serves on this machine, and its reasons (one per network), measured
    in an empty cache as on a first start."""
    members = SHIPPED if name == ENSEMBLE else (name,)
    with tempfile.TemporaryDirectory() as cache, mock.patch.dict(os.environ, {"BRAINMETS_CACHE": cache}):
        networks = [Network.load(models_dir() / m / "model.pt", "openvino", threads, "auto") for m in members]
    precisions = {n.precision for n in networks}
    label = f"OpenVINO {precisions.pop()}" if len(precisions) == 1 else "OpenVINO f32"  # mixed: keep the reference
    return label, [f"{m}: {n.precision_reason}" for m, n in zip(members, networks)]


def forward_gflops(name: str, size: int) -> float:
    members = SHIPPED if name == ENSEMBLE else (name,)
    total = 0
    for m in members:
        model, _ = model_from_checkpoint(load_checkpoint(models_dir() / m / "model.pt"))
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(torch.rand(1, 3, size, size))
        total += counter.get_total_flops()
    return total / 1e9


def time_round_robin(preds: dict[str, Predictor], inputs: dict[int, np.ndarray], repeats: int) -> dict:
    """{(label, batch): [seconds]}: each repeat times every setting once, so slow spells hit all alike."""
    for p in preds.values():
        for x in inputs.values():
            p.model_probabilities(x)
    times = {(label, b): [] for label in preds for b in inputs}
    for _ in range(repeats):
        for label, p in preds.items():
            for b, x in inputs.items():
                t0 = time.perf_counter()
                p.model_probabilities(x)
                times[label, b].append(time.perf_counter() - t0)
    return times


def agreement(preds: dict[str, Predictor], arrays, patients: list[str]) -> dict:
    """Per setting: pooled Dice of its masks against PyTorch fp32's over every slice of the patients, and the
    mean per-patient Dice against the ground truth, all with the engine's post-processing."""
    out, masks = {}, {}
    for label, p in preds.items():
        probs = engine_probabilities(p, arrays, patients)
        r = report(arrays, patients, probs, p.post)
        stacks, offset = [], 0
        for patient in patients:
            n = len(arrays.rows(patient))
            stacks.append(p.mask_stack(probs[offset:offset + n]))
            offset += n
        masks[label] = np.concatenate(stacks)
        out[label] = {"dice_per_patient_mean": r["dice_per_patient_mean"], "slices": r["slices"]}
    for label in preds:
        out[label]["dice_vs_reference"] = dice(masks[label], masks[REFERENCE])
    return out


def stack_latency(p: Predictor, slices: list[np.ndarray], repeats: int) -> list[float]:
    p.predict_stack(slices)
    return [p.predict_stack(slices).seconds for _ in range(max(3, repeats // 4))]


def engine_latency(p: Predictor, image: np.ndarray, repeats: int) -> list[float]:
    p.predict(image)
    return [p.predict(image).seconds for _ in range(repeats)]


@contextlib.contextmanager
def before_item_2():
    """The engine's stack path as it was before issue 29 item 2: every slice preprocessed before any inference,
    then fixed batches of 16 slices (x3 with TTA) whatever the network."""
    def probabilities(self, images, tta=False):
        probs = self.model_probabilities(self.preprocess(images), tta)
        return [resize_probability(p, im.shape[:2]) for p, im in zip(probs, images)]

    with mock.patch.object(Predictor, "probabilities", probabilities), mock.patch.object(Predictor, "chunk", 16), \
            mock.patch.object(Network, "logits", lambda self, x: self.forward(x)):
        yield


def before_after(run, repeats: int) -> dict[str, list[float]]:
    """Seconds of `run` with the engine before item 2 and as it is, one of each in turn after a warm-up of each."""
    arms = {"before": before_item_2, "after": contextlib.nullcontext}
    times = {arm: [] for arm in arms}
    for repeat in range(repeats + 1):
        for arm, engine in arms.items():
            with engine():
                t0 = time.perf_counter()
                run()
                if repeat:
                    times[arm].append(time.perf_counter() - t0)
    return times


def study_upload(slices: int = 51) -> tuple[bytes, str]:
    """benchmarks/study.py's three-grid DICOM study (FLAIR axial, T1 pre oblique axial, T1 post 3-D sagittal) of
    the reference data's first patient with enough slices (a synthetic head without the data), zipped."""
    from study import DATA, oblique_axial, patient_slices, regridded_study, sagittal_3d, synthetic_head, to_files, \
        zip_bytes

    if DATA.is_dir():
        patient = next(p for p in sorted(DATA.iterdir()) if len(list(p.glob("*_mask.*"))) >= slices)
        first = max(0, (len(list(patient.glob("*_mask.*"))) - slices) // 2)
        images, _ = patient_slices(patient, first=first, count=slices)
        what = f"{patient.name} slices {first}-{first + slices - 1}"
    else:
        images, _ = synthetic_head(count=slices)
        what = "a synthetic head"
    study = regridded_study(images, {"AX T1 SE PRE": oblique_axial(), "AX T1 SE POST GAD": sagittal_3d()})
    return zip_bytes(to_files(study.datasets)), what


def study_latency(upload: bytes, model: str, threads: int, repeats: int) -> dict[str, list[float]]:
    """`POST /v1/segment/study?format=dicom-seg` through the app (FastAPI's TestClient), before and after."""
    from fastapi.testclient import TestClient

    from brainmets.api.main import create_app
    from brainmets.api.settings import Settings

    with TestClient(create_app(Settings(threads=threads))) as client:
        def post():
            client.post("/v1/segment/study", params={"format": "dicom-seg", "model": model},
                        files={"file": ("study.zip", upload, "application/zip")}).raise_for_status()
        return before_after(post, repeats)


def slice_overhead(url: str, tiff: bytes, image: np.ndarray, threads: int, repeats: int) -> dict[str, dict]:
    """Per network: `POST /v1/segment` (JSON with both PNGs) through the server, and the same network alone on
    the same slice preprocessed, in this process, alternately so that both see the same load."""
    files = {"file": ("slice.tif", tiff, "image/tiff")}
    out = {}
    with httpx.Client(timeout=120) as client:
        for name in SHIPPED:
            p = Predictor.load(name, threads=threads)
            x = p.preprocess([image])
            api, alone = [], []
            for repeat in range(repeats + 5):  # 5 warm-ups, also waiting for the models still loading
                t0 = time.perf_counter()
                client.post(f"{url}/v1/segment", files=files, params={"model": name}).raise_for_status()
                t1 = time.perf_counter()
                p.networks[0].forward(x)
                if repeat >= 5:
                    api.append(t1 - t0)
                    alone.append(time.perf_counter() - t1)
            out[name] = {"api": api, "network": alone}
    return out


def batching(args, stack: list[np.ndarray], tiff: bytes, names: list[str]) -> list[str]:
    """Issue 29 items 2 and 4 measured: the Markdown section."""
    from brainmets.cache import cache_root

    lines = ["## Batches and overlap", "",
             f"Each network's slices per forward pass, measured at first load at the precision it runs (time per "
             f"slice at each size; `brainmets.precision`), on {machine()}, {args.threads} threads:", ""]
    for name in SHIPPED:
        net = Predictor.load(name, threads=args.threads).networks[0]
        lines.append(f"- {name}: {net.precision}, batch {net.batch} ({net.batch_reason})")
    lines += ["", f"Before: every slice preprocessed before any inference, then batches of 16; after: the measured "
              f"batch, the next chunk preprocessed while this one infers. Seconds, median of {args.study_repeats} "
              "interleaved before/after pairs (after a warm-up of each):", "",
              "| | before s | after s | before / after |", "|---|---|---|---|"]
    rows = []
    for name in names:
        p = Predictor.load(name, threads=args.threads)
        print(f"{name}: stack before/after", flush=True)
        rows.append((f"{len(stack)} slices through `predict_stack`, {name}",
                     before_after(lambda: p.predict_stack(stack), args.study_repeats)))
    upload, what = study_upload()
    print("study: before/after", flush=True)
    rows.append((f"51-slice three-series DICOM study ({what}) → DICOM SEG, `POST /v1/segment/study`, best "
                 f"({best_name()})", study_latency(upload, "best", args.threads, args.study_repeats)))
    for label, t in rows:
        b, a = statistics.median(t["before"]), statistics.median(t["after"])
        lines.append(f"| {label} | {b:.2f} | {a:.2f} | {b / a:.2f}x |")
    if args.no_server:
        return lines + [""]
    print("API: overhead per slice", flush=True)
    with api_server(args.threads, cache_root()) as (url, _):
        api = slice_overhead(url, tiff, stack[0], args.threads, args.repeats * 2)
    lines += ["", f"`POST /v1/segment` per 256² slice (TIFF in, JSON with mask and probability PNGs out), real uvicorn "
              f"server on loopback, one client, against the network alone on the same slice in the client's process, "
              f"alternately; p50 of {args.repeats * 2}:", "",
              "| network | API p50 ms | network alone p50 ms | API overhead ms |", "|---|---|---|---|"]
    for name, t in api.items():
        lines.append(f"| {name} | {ms(t['api']):.1f} | {ms(t['network']):.1f} | {ms(t['api']) - ms(t['network']):.1f} |")
    return lines + ["", f"Load average (1 min) at the end: {os.getloadavg()[0]:.1f}.", ""]


@contextlib.contextmanager
def api_server(threads: int, cache: Path):
    """`brainmets serve` on a free port; yields (url, seconds from start to the first /health 200)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "BRAINMETS_THREADS": str(threads), "BRAINMETS_CACHE": str(cache)}
    t0 = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "brainmets", "serve", "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            if process.poll() is not None or time.perf_counter() - t0 > 120:
                raise RuntimeError("the API server did not answer /health")
            time.sleep(0.05)
        yield url, time.perf_counter() - t0
    finally:
        process.terminate()
        process.wait(10)


def api_latency(url: str, name: str, tiff: bytes, repeats: int, clients: int = 16) -> dict:
    files = {"file": ("slice.tif", tiff, "image/tiff")}
    params = {"model": name}
    with httpx.Client(timeout=120) as client:
        for _ in range(5):  # also waits for the models still loading in the background
            client.post(f"{url}/v1/segment", files=files, params=params).raise_for_status()
        sequential, engine = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            r = client.post(f"{url}/v1/segment", files=files, params=params)
            sequential.append(time.perf_counter() - t0)
            engine.append(r.json()["inference_ms"] / 1000)

    def one(_):
        with httpx.Client(timeout=120) as c:
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
        results = list(pool.map(one, range(clients * 4)))
    wall = time.perf_counter() - t0
    done.set()
    poller.join()
    return {"sequential": sequential, "engine": engine, "concurrent": [s for _, s in results],
            "errors": sum(c != 200 for c, _ in results), "requests": len(results), "throughput": len(results) / wall,
            "health": health, "clients": clients}


def import_check() -> tuple[float, list[str]]:
    code = ("import sys, time; t = time.perf_counter(); import brainmets.api.main; "
            "print(time.perf_counter() - t); print(' '.join(m for m in sys.modules if m.startswith('brainmets.train')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    return float(out[0]), out[1].split() if len(out) > 1 else []


# ---- report ----------------------------------------------------------------------------------------

def ms(seconds: list[float], q: float = 50) -> float:
    return float(np.percentile(np.array(seconds) * 1000, q))


def machine() -> str:
    import onnxruntime
    import openvino

    return (f"{cpu_name()}, {len(os.sched_getaffinity(0))} cores; Python {platform.python_version()}, torch {torch.__version__}, "
            f"onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__.split('-')[0]}")


def model_section(r: dict) -> list[str]:
    lines = [f"## {r['name']}", "", f"{r['gflops']:.2f} GFLOP per 256² slice (multiply-adds x 2 of the convolutions"
             f"{', both networks' if r['name'] == ENSEMBLE else ''}); {r['threads']} threads.", "",
             "| setting | batch | median ms/slice | p95 ms/slice | slices/s | vs eager fp32 | vs ORT fp32 "
             "| % of peak |", "|---|---|---|---|---|---|---|---|"]
    for b in BATCHES:
        base = statistics.median(r["times"][REFERENCE, b]) / b
        ort = statistics.median(r["times"]["ONNX Runtime fp32", b]) / b
        for label in SETTINGS:
            t = statistics.median(r["times"][label, b]) / b
            p95 = float(np.percentile(r["times"][label, b], 95)) / b
            peak = PEAK_GFLOPS["bf16" if "bf16" in label else "fp32"]
            lines.append(f"| {label}{' (served)' if label == r['served'] else ''} | {b} | {t * 1000:.1f} | {p95 * 1000:.1f} | {1 / t:.1f} | {base / t:.2f}x | "
                         f"{ort / t:.2f}x | {r['gflops'] / t / peak * 100:.0f}% of {peak:g} GFLOP/s |")
    a = r.get("agreement")
    if a:
        lines += ["", f"Masks on all {a[REFERENCE]['slices']} test slices ({r['test_patients']} patients), each with the "
                  "engine's post-processing:", "", "| setting | Dice of masks vs PyTorch fp32 | mean per-patient Dice "
                  "| change vs PyTorch fp32 |", "|---|---|---|---|"]
        ref = a[REFERENCE]["dice_per_patient_mean"]
        for label, v in a.items():
            lines.append(f"| {label}{' (served)' if label == r['served'] else ''} | {v['dice_vs_reference']:.4f} | {v['dice_per_patient_mean']:.4f} | "
                         f"{v['dice_per_patient_mean'] - ref:+.4f} |")
    lines += ["", f"Engine, served setting: one uint8 slice end to end (CLAHE, network, resize back, mask, lesions) "
              f"median {ms(r['engine']):.1f} ms (p95 {ms(r['engine'], 95):.1f}); a patient's stack of "
              f"{r['stack_slices']} slices through `predict_stack` (measured batch, 3-D post-processing) median "
              f"{ms(r['stack']) / 1000:.2f} s.", ""]
    return lines


def precision_section(results: list[dict]) -> list[str]:
    """f32 and bf16 side by side (medians of the round-robin repeats, so one run's ratio), and what auto chose."""
    lines = ["## Precision chosen by measurement", "",
             "OpenVINO f32 and bf16 per slice (median ms), timed in the same round-robin; *auto* is what "
             "`BRAINMETS_PRECISION=auto` chose on this machine, from its own short measurement at first load "
             "(2 slices, 3 interleaved rounds, cached), and why.", "",
             "| network | batch | f32 ms/slice | bf16 ms/slice | f32 / bf16 | auto |", "|---|---|---|---|---|---|"]
    for r in results:
        for b in BATCHES:
            f32, bf16 = (statistics.median(r["times"][f"OpenVINO {p}", b]) / b * 1000 for p in ("f32", "bf16"))
            lines.append(f"| {r['name']} | {b} | {f32:.1f} | {bf16:.1f} | {f32 / bf16:.2f}x | {r['served'].split()[-1]} |")
    lines += ["", *[f"- {reason}" for r in results if r["name"] != ENSEMBLE for reason in r["reasons"]], ""]
    return lines


def write_report(out: Path, results: list[dict], api: dict | None, start: dict, imports: tuple, args,
                 load: tuple[float, float], batches: list[str]) -> None:
    command = "python benchmarks/inference.py " + " ".join(sys.argv[1:])
    busy = max(load) > len(os.sched_getaffinity(0))
    by = {r["name"]: r for r in results}
    check = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    rows = []
    for name, goal in TARGETS_MS.items():
        if name in by:
            served = by[name]["served"]
            t = statistics.median(by[name]["times"][served, 1]) * 1000
            ort = statistics.median(by[name]["times"]["ONNX Runtime fp32", 1]) * 1000
            rows.append((f"{name}, batch 1, network ({served})", f"≤ {goal:g} ms and ≥ 2x ORT fp32", f"{t:.1f} ms, {ort / t:.2f}x",
                         check(t <= goal and (name == ENSEMBLE or ort / t >= 2))))
            a = by[name].get("agreement")
            if a:
                d = a[served]["dice_vs_reference"]
                change = abs(a[served]["dice_per_patient_mean"] - a[REFERENCE]["dice_per_patient_mean"])
                rows.append((f"{name}, masks vs PyTorch fp32 ({served})", "Dice ≥ 0.995, per-patient Dice ± 0.005",
                             f"{d:.4f}, {change:+.4f}", check(d >= 0.995 and change <= 0.005)))
    if ENSEMBLE in by:
        s = ms(by[ENSEMBLE]["stack"]) / 1000
        rows.append((f"{by[ENSEMBLE]['stack_slices']}-slice stack, ensemble", "≤ 3 s", f"{s:.2f} s", check(s <= 3)))
    if api:
        p50, engine = ms(api["sequential"]), ms(api["engine"])
        rows.append((f"API p50, {api['model']}, one client", "≤ engine + 10 ms", f"{p50:.1f} ms (engine {engine:.1f} ms)",
                     check(p50 <= engine + 10)))
        rows.append(("16 concurrent clients", "0 errors", f"{api['errors']} errors, /health max "
                     f"{max(api['health']) * 1000:.0f} ms", check(api["errors"] == 0)))
    for label, seconds in start.items():
        rows.append((f"`brainmets serve` to first /health 200, {label}", "≤ 5 s", f"{seconds:.1f} s", check(seconds <= 5)))
    rows.append(("`import brainmets.api.main`", "loads no training module", f"{imports[0]:.1f} s, "
                 f"{'training modules: ' + ', '.join(imports[1]) if imports[1] else 'no training module'}",
                 check(not imports[1])))
    lines = ["# Inference performance", "",
             f"Generated by `{command.strip()}` on {datetime.date.today().isoformat()}; rerun it to regenerate this page.",
             "", f"Machine: {machine()}. Load average (1 min) {load[0]:.1f} at the start, {load[1]:.1f} at the end"
             + (" — other work shared the cores, so these times are noisy upper bounds." if busy else "."), "",
             f"Latencies are per slice (batch time / batch size), median and 95th percentile of {args.repeats} "
             "round-robin repeats. % of peak = achieved GFLOP/s over the 2-thread matmul peak measured on this "
             f"machine: {PEAK_GFLOPS['fp32']:g} GFLOP/s fp32, {PEAK_GFLOPS['bf16']:g} GFLOP/s bf16.", "",
             "## Targets", "", "| target | goal | measured | |", "|---|---|---|---|",
             *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows], "", *precision_section(results)]
    for r in results:
        lines += model_section(r)
    if api:
        s, c = api["sequential"], api["concurrent"]
        lines += ["## API", "", f"`POST /v1/segment?model={api['model']}`, a 256² TIFF, JSON answer with the mask and "
                  "probability PNGs, real uvicorn server on loopback, keep-alive client, served setting "
                  f"({api['threads']} threads, one inference at a time):", "",
                  "| | requests | p50 ms | p95 ms | p99 ms | throughput | errors |", "|---|---|---|---|---|---|---|",
                  f"| 1 client | {len(s)} | {ms(s):.1f} | {ms(s, 95):.1f} | {ms(s, 99):.1f} | {1000 / ms(s):.1f} req/s | 0 |",
                  f"| {api['clients']} concurrent clients | {api['requests']} | {ms(c):.1f} | {ms(c, 95):.1f} | "
                  f"{ms(c, 99):.1f} | {api['throughput']:.1f} req/s | {api['errors']} |", "",
                  f"`GET /health` during the concurrent run: p50 {ms(api['health']):.1f} ms, max "
                  f"{max(api['health']) * 1000:.1f} ms over {len(api['health'])} polls.", ""]
    lines += batches
    lines += ["## Settings", "",
              "- *PyTorch eager fp32*: the model as trained, `torch.inference_mode()`: the reference.",
              "- *ONNX Runtime fp32*: the ONNX export in ONNX Runtime's CPU provider, every graph optimisation.",
              "- *OpenVINO*: the same ONNX file compiled by OpenVINO for the CPU, `INFERENCE_PRECISION_HINT` f32 or "
              "bf16. *(served)* marks what `BRAINMETS_PRECISION=auto` chose on this machine by timing both "
              "(section *Precision chosen by measurement*).",
              "- Every setting goes through `Predictor.model_probabilities` (ensemble: both networks on the same "
              "preprocessed batch, probabilities averaged).", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))


# ---- main ------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20, help="timed repeats of every setting")
    ap.add_argument("--threads", type=int, default=2, help="threads of one inference (this machine has 2 cores)")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("BRAINMETS_DATA", REPO.parent / "shared" / "data" / "lgg")),
                    help="reference data: real slices, and the agreement on every test slice (skipped without it)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "performance.md")
    ap.add_argument("--no-server", action="store_true", help="skip the API measurements")
    ap.add_argument("--no-agreement", action="store_true",
                    help="skip the masks on every test slice (minutes per network on 2 cores)")
    ap.add_argument("--study-repeats", type=int, default=5, help="before/after pairs of the stack and study timings")
    ap.add_argument("--batching-only", action="store_true",
                    help="only the batches-and-overlap section, printed (the report is not written)")
    args = ap.parse_args()
    names = [n for n in SHIPPED if (models_dir() / n / "model.onnx").exists()]
    names += [ENSEMBLE] if len(names) == len(SHIPPED) else []
    if not names:
        sys.exit(f"no exported model to measure in {models_dir()}")
    split = load_checkpoint(models_dir() / names[0] / "model.pt")["split"]
    arrays = None
    if args.data.is_dir():
        dataset = open_dataset(args.data)
        patient = max(split["test"], key=lambda p: len(dataset.patients.get(p, ())))
        slices = [dataset.read_image(s) for s in dataset.slices if s.patient == patient]
    else:
        rng = np.random.default_rng(0)
        slices = list(rng.integers(0, 256, (88, 256, 256, 3), dtype=np.uint8))
    stack = (slices * (88 // len(slices) + 1))[:88]  # the 88-slice volume, from one real patient
    ok, tiff = cv2.imencode(".tif", np.ascontiguousarray(stack[0][..., ::-1]))
    if args.batching_only:
        print("\n".join(batching(args, stack, tiff.tobytes(), names)))
        return
    if args.data.is_dir():
        arrays = preprocessed(dataset, Predictor.load(names[0], "torch").preprocess_cfg)
        rows = arrays.rows(patient)
    inputs = {b: normalize(np.stack([cv2.resize(s, (256, 256)) for s in stack[:b]])) for b in BATCHES} if arrays is None \
        else {b: normalize(np.asarray(arrays.images[rows.start:rows.start + b])) for b in BATCHES}
    load_start = os.getloadavg()[0]
    results = []
    for name in names:
        print(f"{name}: timing", flush=True)
        served, reasons = auto_choice(name, args.threads)
        preds = predictors(name, args.threads)
        r = {"name": name, "threads": args.threads, "gflops": forward_gflops(name, 256), "served": served,
             "reasons": reasons, "times": time_round_robin(preds, inputs, args.repeats),
             "test_patients": len(split["test"]), "engine": engine_latency(preds[served], stack[0], args.repeats),
             "stack_slices": len(stack), "stack": stack_latency(preds[served], stack, args.repeats)}
        if arrays is not None and not args.no_agreement:
            print(f"{name}: agreement on the test slices", flush=True)
            r["agreement"] = agreement(preds, arrays, split["test"])
        results.append(r)
        del preds
    api, start = None, {}
    imports = import_check()
    batches = batching(args, stack, tiff.tobytes(), names)
    if not args.no_server:
        best = best_name()
        with tempfile.TemporaryDirectory() as cache:
            for label in ("cold compiled-model cache", "warm cache"):
                with api_server(args.threads, Path(cache)) as (url, seconds):
                    start[label] = seconds
                    if label == "warm cache":
                        print("API: latency", flush=True)
                        api = {**api_latency(url, best, tiff.tobytes(), args.repeats * 2), "model": best,
                               "threads": args.threads}
    write_report(args.out, results, api, start, imports, args, (load_start, os.getloadavg()[0]), batches)
    print(f"{args.out} written")


if __name__ == "__main__":
    main()
