"""A PACS round trip: a 40-slice, 3-series study fetched from Orthanc (WADO-RS), segmented, its SEG stored back
(STOW-RS), as `brainmets pacs segment` does it; the issue's target is 10 s on 2 cores.

    python benchmarks/pacs.py [--patient DIR] [--slices 40] [--model best] [--repeats 3]

The study is built from one patient of the reference data ($BRAINMETS_DATA) as three MR series of 256x256
slices (tests/dicom_studies.py) and uploaded to a throwaway Orthanc (tests/orthanc.py). The model is loaded
once, before timing, as a running `watch` or API has it; each repeat segments the study again (the same SEG
instance is stored again, which Orthanc keeps once). Prints each phase and the machine's load average.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

from dicom_studies import mr_study, to_bytes  # noqa: E402
from orthanc import OrthancServer, missing  # noqa: E402
from study import study_arguments  # noqa: E402  (benchmarks/study.py)

from brainmets.dicomweb import Pacs  # noqa: E402
from brainmets.inference import Predictor  # noqa: E402
from brainmets.pacs import segment_in_pacs  # noqa: E402


def main() -> None:
    args, patient, images = study_arguments(__doc__, repeats=3)
    if reason := missing():
        sys.exit(reason)
    study = mr_study(images)
    with tempfile.TemporaryDirectory() as folder:
        server = OrthancServer(Path(folder)).start()
        try:
            server.upload([to_bytes(ds) for ds in study.datasets])
            predictor = Predictor.load(args.model, threads=args.threads)
            print(f"{patient.name}: {args.slices} slices x 3 series of {images[0].shape[1]}x{images[0].shape[0]}, "
                  f"model {predictor.name}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
            totals = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                done = segment_in_pacs(Pacs(server.dicomweb_url), predictor, study.study_uid)
                totals.append(time.perf_counter() - t0)
                print(f"  {totals[-1]:.2f} s: " + ", ".join(f"{k} {v:.2f} s" for k, v in done.seconds.items())
                      + f"; {len(done.result.lesions)} lesion(s)")
            print(f"median {statistics.median(totals):.2f} s, load average {os.getloadavg()[0]:.1f}")
        finally:
            server.stop(graceful=False)


if __name__ == "__main__":
    main()
