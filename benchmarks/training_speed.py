"""Training-step speed of each lever, measured side by side in one run (medians of repeated steps).

    python benchmarks/training_speed.py [--repeats 5] [--threads 2]

Prints a Markdown table: seconds per step and images/s for each network and setting, and the ratio
to the seed recipe's setting (whole 256² slices, fp32, batch 8) of the same network.
"""

from __future__ import annotations

import argparse

import torch

from brainmets.config import make_config
from brainmets.models import build_model, count_parameters
from brainmets.training import step_seconds

SETTINGS = [  # (label, crop, batch, bf16, channels_last)
    ("seed: 256², fp32, batch 8", 256, 8, False, False),
    ("256², bf16", 256, 8, True, False),
    ("128² crops, fp32", 128, 8, False, False),
    ("128² crops, bf16", 128, 8, True, False),
    ("128² crops, bf16, channels_last", 128, 8, True, True),
    ("128² crops, bf16, channels_last, batch 16", 128, 16, True, True),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=["attention-unet", "unetpp"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats} steps\n")
    print("| network | setting | s/step | images/s | speed-up vs seed |")
    print("|---|---|---|---|---|")
    for name in args.models:
        params = count_parameters(build_model(make_config(name).model))
        base = None
        for label, crop, batch, bf16, cl in SETTINGS:
            s = step_seconds(make_config(name, "fast", bf16=bf16, channels_last=cl), crop, batch, args.repeats)
            # Pixels per second relative to the seed setting: a 128² crop is a quarter of a slice.
            px_rate = batch * crop * crop / s
            base = base or px_rate
            print(f"| {name} ({params / 1e6:.1f} M) | {label} | {s:.3f} | {batch / s:.1f} | "
                  f"{px_rate / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
