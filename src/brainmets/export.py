"""Export a checkpoint to ONNX for the inference engine, and prove the file computes what PyTorch does.

    export_onnx(checkpoint) -> <checkpoint>.onnx and config.json beside it

The graph takes `image` float32 (batch, 3, height, width), preprocessed as in training, with batch and
spatial sizes free (multiples of 16), and returns `logits` (batch, 1, height, width). Its metadata
holds the checkpoint's SHA-256, so the engine never pairs an ONNX file with a checkpoint it was not
exported from.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from brainmets.checkpoints import load_hashed_checkpoint, model_from_checkpoint
from brainmets.inference import ONNX_SHA_KEY, onnx_session

# max |ONNX - PyTorch| on the probabilities, what the engine serves. Not on the logits: a trained
# network's logits reach tens, where float32 reordering alone moves them by ~4e-4.
TOLERANCE = 1e-4
OPSET = 18


@dataclass(frozen=True)
class Exported:
    onnx: Path
    config: Path
    max_abs_diff: float  # over the check inputs, on the probabilities


def export_onnx(checkpoint: Path, out: Path | None = None, opset: int = OPSET) -> Exported:
    """Write `out` (default: the checkpoint with suffix .onnx) and config.json in its folder; raise
    ValueError if ONNX Runtime's probabilities differ from PyTorch's by more than TOLERANCE."""
    checkpoint = Path(checkpoint)
    out = Path(out) if out else checkpoint.with_suffix(".onnx")
    ckpt, sha256 = load_hashed_checkpoint(checkpoint)
    model, cfg = model_from_checkpoint(ckpt)
    size = cfg.preprocess.image_size
    free = torch.export.Dim.DYNAMIC
    # The exporter warns about each torchvision operator it cannot register (we use none) and about
    # its own deprecated internals; neither says anything about this model.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(model, (torch.rand(1, 3, size, size),), dynamo=True, opset_version=opset,
                                    input_names=["image"], output_names=["logits"],
                                    dynamic_shapes=({0: free, 2: free, 3: free},), verbose=False)
    program.model.metadata_props[ONNX_SHA_KEY] = sha256
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        program.save(str(tmp))
        diff = max_abs_diff(model, tmp, [(1, size, size), (2, size // 2, size + 16)])
        if diff > TOLERANCE:
            raise ValueError(f"ONNX export of {checkpoint} differs from PyTorch by {diff:.2e} (> {TOLERANCE:.0e})")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    cfg.save(out.parent / "config.json")
    return Exported(out, out.parent / "config.json", diff)


@torch.inference_mode()
def max_abs_diff(model: torch.nn.Module, onnx_path: Path, shapes: list[tuple[int, int, int]]) -> float:
    """Largest |ONNX Runtime - PyTorch| probability over random inputs of the (batch, height, width) shapes."""
    session = onnx_session(onnx_path)
    rng = np.random.default_rng(0)
    worst = 0.0
    for batch, height, width in shapes:
        x = rng.random((batch, 3, height, width), dtype=np.float32)
        ours = torch.sigmoid(torch.from_numpy(session.run(None, {"image": x})[0]))
        worst = max(worst, float((ours - torch.sigmoid(model(torch.from_numpy(x)))).abs().max()))
    return worst
