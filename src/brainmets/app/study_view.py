"""The Study view: a whole study (a zip of DICOM series or of one patient's numbered slices, a NIfTI volume,
or several files at once) segmented through the API in one run; its slices scrubbed with the lesions
overlaid, jumping to lesion slices; the 3-D lesion table, a montage of the lesion slices, and the DICOM SEG,
NIfTI mask and lesion CSV to download.

The page reads the study itself only to draw it (the same reader as the API, so the slices line up).
"""

from __future__ import annotations

import io
import zipfile
from pathlib import PurePath

import numpy as np
import streamlit as st

from brainmets.app import images
from brainmets.app.client import ApiError, Client, StudyAnswer
from brainmets.app.compare import models_info
from brainmets.app.segment import MODES, available_modes, controls
from brainmets.preprocessing import to_uint8_rgb
from brainmets.registry import title
from brainmets.inputs.align import REGISTER
from brainmets.inputs.study import Study, study_from_upload

SLIDER = "study-slice"
MONTAGE = 8  # lesion slices shown side by side


@st.cache_resource(max_entries=2, show_spinner=False)  # shared, not copied: nothing writes to the study
def _read(data: bytes, register: str) -> Study:
    return study_from_upload(data, register=register)


def upload_bytes(files: list) -> tuple[bytes, str]:
    """One file as it is; several zipped together (the API takes one file: a zip is a study)."""
    if len(files) == 1:
        return files[0].getvalue(), files[0].name
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as bundle:
        for n, f in enumerate(files):
            bundle.writestr(f"{n:05d}_{PurePath(f.name).name}", f.getvalue())
    return out.getvalue(), "study.zip"


def render(api: str) -> None:
    try:
        models = models_info(api)
    except ApiError:
        models = None
    modes = [m for m in available_modes(models) if len(MODES[m]) == 1]
    if not modes:
        st.warning("The backend serves no model yet: ship one into models/<name>/ (see the README).")
        return
    mode, tta, opacity = controls(modes, key="study")
    register = st.radio("Registration onto FLAIR", REGISTER, horizontal=True, key="study-register",
                        help="auto: every series off FLAIR's grid is registered (rigid) and the result kept where it "
                             "improves the match; on: every series; off: the DICOM or NIfTI geometry alone.")
    files = st.file_uploader("Study: a zip of DICOM series or of one patient's numbered slices, a NIfTI volume, or "
                             "several DICOM or slice files at once", accept_multiple_files=True, key="study-upload")
    if not files:
        st.info("Upload a study. DICOM series are ordered by position and mapped to the model's channels "
                "(pre-contrast T1, FLAIR, post-contrast T1) from their descriptions; FLAIR fills a missing one.")
        return
    data, name = upload_bytes(files)
    try:
        study = _read(data, register)
    except ValueError as e:
        st.error(f"{name}: {e}")
        return
    key = (hash(data), MODES[mode][0], tta, register)
    if st.button(f"Segment the study ({len(study.slices)} slices)", key="study-run"):
        with st.status(f"Segmenting {len(study.slices)} slices with {mode}...", expanded=False) as status:
            try:
                answer = Client(api).segment_study(data, name, MODES[mode][0], tta, register)
            except ApiError as e:
                status.update(label="Failed", state="error")
                st.error(f"{name}: {e}")
                return
            st.session_state["study"] = key, answer, study.mask_slices(answer.nifti)
            status.update(label=f"Segmented in {answer.answer['total_ms'] / 1000:.1f} s", state="complete")
    stored = st.session_state.get("study")
    if stored and stored[0] == key:
        show(study, stored[1], stored[2], opacity, PurePath(name).name.split(".")[0])


def show(study: Study, result: StudyAnswer, masks: np.ndarray, opacity: float, stem: str) -> None:
    answer = result.answer
    lesions = answer["lesions"]
    count, volume, slices, ms = st.columns(4)
    count.metric("Lesions (3-D)", len(lesions))
    mm3 = answer["lesion_volume_mm3"]
    volume.metric("Lesion volume", "–" if mm3 is None else f"{mm3:,.0f} mm³", help=f"{answer['lesion_voxels']:,} voxels")
    slices.metric("Slices", answer["slices"])
    ms.metric("Inference", f"{answer['inference_ms'] / 1000:.1f} s", help=title(answer["model"]))
    for warning in answer["warnings"]:
        st.warning(warning)
    scrubber(study, masks, lesions, opacity)
    if lesions:
        st.dataframe(lesion_rows(lesions), hide_index=True)
        montage(study, masks, answer["slice_lesion_px"], opacity)
    with st.expander("Channels and series"):
        st.dataframe([channel_row(c) for c in answer["channels"]], hide_index=True)
        st.caption("Steps: " + ", ".join(f"{step} {ms / 1000:.2f} s" for step, ms in answer["steps_ms"].items()))
        st.caption(f"Model version {answer['model_version']}: {title(answer['model'])}, "
                   + ", ".join(f"{n['network']} {n['runtime']} {n['precision']}"
                               for n in answer["model_provenance"]["networks"]))
        if answer["series"]:
            st.dataframe([{k: s[k] for k in ("number", "description", "slices", "rows", "columns", "guess", "used_as")}
                          for s in answer["series"]], hide_index=True)
        for why in answer["ignored"]:
            st.caption(f"passed over: {why}")
    seg, nifti, csv = st.columns(3)
    if result.seg is not None:
        seg.download_button("DICOM SEG", result.seg, f"{stem}.seg.dcm", "application/dicom", on_click="ignore",
                            key="study-seg")
    nifti.download_button("Mask NIfTI", result.nifti, f"{stem}_mask.nii.gz", "application/gzip", on_click="ignore",
                          key="study-nifti")
    csv.download_button("Lesions CSV", result.csv, f"{stem}_lesions.csv", "text/csv", on_click="ignore",
                        key="study-csv")


def scrubber(study: Study, masks: np.ndarray, lesions: list[dict], opacity: float) -> None:
    """A slice slider, and one button per lesion that moves it to the lesion's largest slice."""
    if SLIDER not in st.session_state or st.session_state[SLIDER] >= len(study.slices):
        st.session_state[SLIDER] = largest_slice(masks, lesions[0]) if lesions else len(study.slices) // 2
    if lesions:
        buttons = st.columns(min(len(lesions), MONTAGE))
        for column, lesion in zip(buttons, lesions):
            column.button(f"Lesion {lesion['id']}", key=f"jump-{lesion['id']}", on_click=_jump,
                          args=(largest_slice(masks, lesion),))
    k = st.slider(f"Slice (of {len(study.slices)})", 0, len(study.slices) - 1, key=SLIDER)
    st.image(slice_overlay(study, masks, k, opacity), width=512,
             caption=f"Slice {k}: {int(masks[k].sum())} lesion px")


def _jump(k: int) -> None:
    st.session_state[SLIDER] = k


def largest_slice(masks: np.ndarray, lesion: dict) -> int:
    """The slice of the lesion's range holding the most lesion pixels."""
    first, last = lesion["first_slice"], lesion["last_slice"]
    return first + int(np.argmax(masks[first:last + 1].sum(axis=(1, 2))))


def slice_overlay(study: Study, masks: np.ndarray, k: int, opacity: float) -> np.ndarray:
    return images.overlay(images.flair(to_uint8_rgb(study.slices[k])), masks[k], opacity)


def montage(study: Study, masks: np.ndarray, areas: list[int], opacity: float) -> None:
    """The slices with the most lesion, in slice order."""
    shown = sorted(sorted(range(len(areas)), key=lambda k: -areas[k])[:MONTAGE])
    shown = [k for k in shown if areas[k]]
    st.image([slice_overlay(study, masks, k, opacity) for k in shown], caption=[f"slice {k}" for k in shown],
             width=160)


def channel_row(c: dict) -> dict:
    """How a channel reached FLAIR's grid, in one table row."""
    how = c["alignment"]
    if how == "registered":
        how += f" ({c['rotation_deg']:.1f}°, {c['shift_mm']:.1f} mm)"
    return {"channel": c["channel"], "filled by": c["description"], "chosen by": c["how"], "onto FLAIR's grid": how,
            "coverage": "" if c["coverage"] is None else f"{c['coverage']:.0%}", "seconds": round(c["seconds"], 2)}


def lesion_rows(lesions: list[dict]) -> list[dict]:
    rows = []
    for les in lesions:
        row = {"lesion": les["id"], "voxels": les["voxels"]}
        if les["volume_mm3"] is not None:
            row["volume (mm³)"] = round(les["volume_mm3"], 1)
        diameter = (f"{les['diameter_mm']:.1f} mm" if les["diameter_mm"] is not None
                    else f"{les['diameter_px']:.1f} px")
        rows.append({**row, "slices": f"{les['first_slice']}–{les['last_slice']}", "largest diameter": diameter,
                     "centroid (slice, row, col)": ", ".join(f"{c:.0f}" for c in les["centroid"]),
                     "mean probability": round(les["mean_probability"], 3)})
    return rows
