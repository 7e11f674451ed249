"""The Segment view: upload a slice or a volume, segment it through the API, show and explain the result."""

from __future__ import annotations

import base64
from pathlib import PurePath

import numpy as np
import streamlit as st

from brainmets.app import images
from brainmets.app.client import ApiError, Client
from brainmets.app.compare import models_info
from brainmets.config import PreprocessConfig
from brainmets.preprocessing import enhance, to_uint8_rgb
from brainmets.inputs.readers import ACCEPTED, ImageReadError, read_slice, read_volume, sniff
from brainmets.inputs.study import study_from_volume
from brainmets.registry import BEST, ENSEMBLE, SHIPPED, title

SIDE_BY_SIDE = "both side by side" if len(SHIPPED) == 2 else "all side by side"
MODES = {  # choice on the page -> the API's model names, one request each
    BEST: (BEST,),
    **{title(name): (name,) for name in SHIPPED},
    SIDE_BY_SIDE: SHIPPED,
    ENSEMBLE: (ENSEMBLE,),
}


def available_modes(models: list[dict] | None) -> list[str]:
    """The choices the backend can serve (GET /v1/models); all of them when that is unknown. `best` needs
    a model marked best (it has test metrics), the ensemble both networks."""
    if models is None:
        return list(MODES)
    installed = {m["name"] for m in models}
    needs = {BEST: set(), ENSEMBLE: set(SHIPPED)}
    return [label for label, names in MODES.items()
            if (names != (BEST,) or any(m["best"] for m in models))
            and set().union(*(needs.get(n, {n}) for n in names)) <= installed]


@st.cache_data(max_entries=64, show_spinner=False)
def _segment(api: str, data: bytes, filename: str, model: str, tta: bool) -> dict:
    # Cached so that moving the opacity slider or switching views does not run the model again.
    return Client(api).segment(data, filename, model, tta)


@st.cache_resource(max_entries=4, show_spinner=False)  # shared, not copied: nothing writes to the slices
def _volume(data: bytes) -> tuple[list[np.ndarray], tuple[float, float]]:
    """The volume's slices as the engine sees them (its axial slices, scaled to 8 bits over the volume)."""
    study = study_from_volume(read_volume(data))
    return study.slices, study.spacing[1:]


def render(api: str) -> None:
    try:
        models = models_info(api)
    except ApiError:
        models = None  # the sidebar says why; an upload will name the problem again
    modes = available_modes(models)
    if not modes:
        st.warning("The backend serves no model yet: ship one into models/<name>/ (see the README).")
        return
    mode, tta, opacity = controls(modes)
    upload = st.file_uploader(f"MRI slice or volume: {ACCEPTED}", key="upload")
    if upload is None:
        st.info(f"Upload an MRI slice or volume ({ACCEPTED}). The reference data's slices are 3-channel "
                f"TIFFs (pre-contrast, FLAIR, post-contrast).")
        return
    data, name = upload.getvalue(), upload.name
    stem = PurePath(name).name.split(".")[0]
    volume = is_volume(data)
    try:
        if volume:
            image, spacing, file, filename = volume_slice(data, stem)
        else:  # the API reads it and names any problem; the page decodes it only to draw it
            image, spacing, file, filename = None, None, data, name
        results = {model: _segment(api, file, filename, model, tta) for model in MODES[mode]}
        if image is None:
            image = read_slice(data).pixels
    except (ApiError, ImageReadError) as e:
        st.error(f"{name}: {e}")
        return
    show_results(image, {m: with_spacing(r, spacing) for m, r in results.items()}, input_size(api, results),
                 opacity, stem)
    if volume:
        show_volume(api, data, stem, MODES[mode], tta)


def controls(modes: list[str], key: str | None = None) -> tuple[str, bool, float]:
    """Model, flip TTA and overlay opacity, side by side; `key` tells a second view's widgets apart."""
    choice, tta_col, opacity_col = st.columns([2, 1, 2])
    mode = choice.selectbox("Model", modes, key=key and f"{key}-model",
                            help="best = the shipped candidate (either network or their ensemble) with the "
                                 "highest validation Dice per patient.")
    tta = tta_col.toggle("Flip TTA", help="Test-time augmentation: average the prediction over flipped copies.",
                         key=key and f"{key}-tta")
    opacity = opacity_col.slider("Overlay opacity", 0.0, 1.0, 0.4, 0.05, key=key and f"{key}-opacity")
    return mode, tta, opacity


def is_volume(data: bytes) -> bool:
    try:
        return sniff(data).startswith("nifti")
    except ImageReadError:
        return False


def volume_slice(data: bytes, stem: str) -> tuple[np.ndarray, tuple[float, float], bytes, str]:
    """The slice the slider picks, oriented as the API segments volumes, and that slice as a file."""
    slices, spacing = _volume(data)
    k = st.slider(f"Axial slice (of {len(slices)})", 0, len(slices) - 1, len(slices) // 2)
    # The engine's slices are 8-bit: a PNG carries one to the API unchanged, as the network sees it.
    return slices[k], spacing, images.png_bytes(slices[k]), f"{stem}_slice{k}.png"


def with_spacing(result: dict, spacing: tuple[float, float] | None) -> dict:
    """Areas in mm² for a volume's slice: the slice travels as a plain image, its spacing stays here."""
    if spacing is None:
        return result
    pixel_mm2 = spacing[0] * spacing[1]
    return {**result, "lesion_area_mm2": result["lesion_area_px"] * pixel_mm2,
            "lesions": [{**les, "area_mm2": les["area_px"] * pixel_mm2} for les in result["lesions"]]}


def show_volume(api: str, data: bytes, stem: str, models: tuple[str, ...], tta: bool) -> None:
    """The whole volume on demand (it takes a while): lesion volume and the NIfTI mask to download."""
    st.subheader("Whole volume")
    key = (hash(data), models, tta)
    if st.button("Segment every slice", help="The NIfTI mask on the input's grid, with the lesion volume."):
        try:
            st.session_state["volume"] = key, {m: Client(api).segment_volume(data, f"{stem}.nii.gz", m, tta)
                                               for m in models}
        except ApiError as e:
            st.error(str(e))
    stored = st.session_state.get("volume")
    if not stored or stored[0] != key:
        return
    for column, (model, result) in zip(st.columns(len(models)), stored[1].items()):
        column.metric(f"Lesion volume, {title(result.model)}",
                      f"{result.lesion_volume_mm3:,.0f} mm³", help=f"{result.lesion_voxels:,} voxels")
        column.download_button("Mask NIfTI", result.nifti, f"{stem}_{model}_mask.nii.gz", "application/gzip",
                               on_click="ignore", key=f"nifti-{model}")


def input_size(api: str, results: dict[str, dict]) -> int:
    """The side of the square the answering network takes, for the CLAHE view (the API knows it)."""
    try:
        sizes = {m["name"]: m["image_size"] for m in models_info(api) if m.get("image_size")}
    except ApiError:
        sizes = {}
    answered = [sizes[r["model"]] for r in results.values() if r["model"] in sizes]
    return (answered or list(sizes.values()) or [PreprocessConfig().image_size])[0]


def show_results(image: np.ndarray, results: dict[str, dict], size: int, opacity: float, stem: str) -> None:
    """One row of pictures (input, CLAHE view, then overlay and heat map per model), then per model its
    numbers, lesion table and downloads, side by side."""
    rgb = to_uint8_rgb(image)
    columns = iter(st.columns(2 + 2 * len(results)))
    next(columns).image(rgb, caption=f"Input ({image.shape[1]}x{image.shape[0]} px)", width="stretch")
    next(columns).image(enhance(image, PreprocessConfig(image_size=size)),
                        caption=f"CLAHE-enhanced at {size}x{size}, as the network sees it", width="stretch")
    base = images.flair(rgb)
    overlays = {}
    for model, result in results.items():
        label = title(result["model"])
        mask = images.decode_png(base64.b64decode(result["mask_png"]))
        probability = images.decode_png(base64.b64decode(result["probability_png"]))
        overlays[model] = images.overlay(base, mask, opacity)
        next(columns).image(overlays[model], caption=f"{label}: lesions outlined", width="stretch")
        next(columns).image(images.heatmap(base, probability), caption=f"{label}: probability (dark 0, yellow 1)",
                            width="stretch")
    for column, (model, result) in zip(st.columns(len(results)), results.items()):
        with column, st.container(key=f"result-{model}", border=True):
            show_numbers(result, overlays[model], stem, model)


def show_numbers(result: dict, overlay: np.ndarray, stem: str, key: str) -> None:
    st.subheader(title(result["model"]))
    lesions, mm2 = result["lesions"], result["lesion_area_mm2"]
    count, area, area_mm2, ms = st.columns(4)
    count.metric("Lesions", len(lesions))
    area.metric("Area (px)", result["lesion_area_px"])
    area_mm2.metric("Area (mm²)", "–" if mm2 is None else f"{mm2:.1f}",
                    help="Unknown: the file gives no pixel spacing (DICOM and NIfTI do)." if mm2 is None else None)
    ms.metric("Inference", f"{result['inference_ms']:.0f} ms", help="In the API: preprocessing, network, lesions.")
    if lesions:
        st.dataframe(lesion_table(lesions), hide_index=True)
    down_mask, down_overlay = st.columns(2)
    down_mask.download_button("Mask PNG", base64.b64decode(result["mask_png"]), f"{stem}_{key}_mask.png",
                              "image/png", on_click="ignore", key=f"mask-{key}")
    down_overlay.download_button("Overlay PNG", images.png_bytes(overlay), f"{stem}_{key}_overlay.png",
                                 "image/png", on_click="ignore", key=f"overlay-{key}")


def lesion_table(lesions: list[dict]) -> list[dict]:
    """One row per lesion, largest first; the mm² column only when the spacing is known."""
    rows = []
    for i, les in enumerate(lesions, start=1):
        row = {"lesion": i, "area (px)": les["area_px"]}
        if les["area_mm2"] is not None:
            row["area (mm²)"] = round(les["area_mm2"], 1)
        rows.append({**row, "centroid x": round(les["centroid"][0], 1), "centroid y": round(les["centroid"][1], 1),
                     "mean probability": round(les["mean_probability"], 3)})
    return rows
