"""What the page draws: the input as 8-bit RGB, the lesion overlay, the probability heat map, PNG bytes.

Only display happens here; segmentation comes from the API. Masks and probability maps arrive as PNGs
at the input's size, so they line up with the input pixel for pixel.
"""

from __future__ import annotations

import cv2
import numpy as np

LESION_RGB = (255, 40, 40)


def decode_png(data: bytes) -> np.ndarray:
    """A PNG from the API as a 2-D uint8 array."""
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if array is None:
        raise ValueError("the API sent an image that is not a readable PNG")
    return array


def flair(rgb: np.ndarray) -> np.ndarray:
    """The middle channel as a gray image: FLAIR in the reference data (pre-contrast, FLAIR, post-contrast),
    the sequence its masks were drawn on; a gray slice (three equal channels) comes back unchanged."""
    return np.repeat(rgb[..., 1:2], 3, axis=2)


def overlay(rgb: np.ndarray, mask: np.ndarray, opacity: float) -> np.ndarray:
    """The lesion filled at `opacity` and outlined at full strength, on the uint8 (H, W, 3) image."""
    lesion = mask > 0
    out = rgb.astype(np.float32)
    out[lesion] = (1 - opacity) * out[lesion] + opacity * np.array(LESION_RGB, np.float32)
    out = out.round().astype(np.uint8)
    contours, _ = cv2.findContours(lesion.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    thickness = max(1, round(max(rgb.shape[:2]) / 160))  # still visible when a 256² slice is shown small
    cv2.drawContours(out, contours, -1, LESION_RGB, thickness)
    return out


def heatmap(rgb: np.ndarray, probability: np.ndarray) -> np.ndarray:
    """The probability (uint8 0-255) in the inferno colour map, blended in as strongly as it is sure,
    so confident lesion pixels stand out and the anatomy stays visible where the model sees nothing."""
    colours = cv2.applyColorMap(probability, cv2.COLORMAP_INFERNO)[..., ::-1].astype(np.float32)
    weight = (probability.astype(np.float32) / 255 * 0.85)[..., None]
    gray = rgb.astype(np.float32).mean(axis=2, keepdims=True)
    return ((1 - weight) * gray + weight * colours).round().astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise ValueError("could not encode the image as PNG")
    return buffer.tobytes()
