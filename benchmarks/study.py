"""A whole study through the API: a 40-slice, 3-series DICOM study (zipped) to a DICOM SEG, the issue's
target being 4 s on 2 cores with `best`.

    python benchmarks/study.py [--patient DIR] [--slices 40] [--model best] [--repeats 5]

The study is built from one patient of the reference data ($BRAINMETS_DATA) as three MR series of 256x256
slices (tests/dicom_studies.py) and posted to a real `brainmets serve` (the shipped models) as
`POST /v1/segment/study?format=dicom-seg`, after one warm-up request. Prints each request's time, the engine's
share (`X-Inference-Ms`) and the machine's load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from dicom_studies import mr_study, patient_slices, to_files, zip_bytes  # noqa: E402
from inference import api_server  # noqa: E402  (benchmarks/inference.py)


def study_arguments(doc: str, repeats: int):
    """The options both study benchmarks take, and the study's slices: (args, patient folder, images)."""
    data = Path(os.environ.get("BRAINMETS_DATA", HERE.parents[1] / "shared" / "data" / "lgg"))
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--patient", type=Path, help="a patient folder (default: the first with enough slices)")
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--model", default="best")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    patient = args.patient or next(p for p in sorted(data.iterdir())
                                   if len(list(p.glob("*_mask.*"))) >= args.slices)
    images, _ = patient_slices(patient, count=args.slices)
    return args, patient, images


def main() -> None:
    args, patient, images = study_arguments(__doc__, repeats=5)
    upload = zip_bytes(to_files(mr_study(images).datasets))
    files = {"file": ("study.zip", upload, "application/zip")}
    params = {"model": args.model, "format": "dicom-seg"}
    with tempfile.TemporaryDirectory() as cache, api_server(args.threads, Path(cache)) as (url, _):
        with httpx.Client(timeout=300) as client:
            client.post(f"{url}/v1/segment/study", files=files, params=params).raise_for_status()  # warm-up
            print(f"{patient.name}: {args.slices} slices x 3 series, {len(upload) / 1e6:.1f} MB zipped, model "
                  f"{args.model}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
            totals = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                r = client.post(f"{url}/v1/segment/study", files=files, params=params)
                r.raise_for_status()
                totals.append(time.perf_counter() - t0)
                print(f"  {totals[-1]:.2f} s, engine {float(r.headers['x-inference-ms']) / 1000:.2f} s, "
                      f"{r.headers['x-model']}, SEG {len(r.content) / 1e3:.0f} kB")
    print(f"median {statistics.median(totals):.2f} s, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
