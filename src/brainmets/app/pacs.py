"""The PACS view: the studies of the API's PACS (GET /v1/pacs/studies), one segmented on click with its DICOM
SEG stored back beside its images (POST /v1/pacs/studies/{uid}/segment), and where the SEG went."""

from __future__ import annotations

import streamlit as st

from brainmets.app.client import ApiError, Client
from brainmets.app.compare import models_info
from brainmets.app.segment import MODES, available_modes
from brainmets.registry import title


def render(api: str) -> None:
    client = Client(api)
    try:
        listing = client.pacs_studies()
    except ApiError as e:
        st.info(f"No PACS to show. {e}")
        return
    studies = listing["studies"]
    st.caption(f"PACS `{listing['url']}`: {len(studies)} studies")
    if not studies:
        return
    st.dataframe([{"patient": s["patient_id"], "date": s["date"], "description": s["description"],
                   "series": s["series"], "brainmets SEG": ", ".join(s["brainmets_segs"]) or "–", "study UID": s["uid"]}
                  for s in studies], hide_index=True)
    labels = {s["uid"]: f"{s['patient_id']} · {s['date']} · {s['description']} · {s['uid']}" for s in studies}
    study_col, model_col = st.columns([3, 1])
    uid = study_col.selectbox("Study", list(labels), format_func=labels.get, key="pacs-study")
    try:
        modes = [m for m in available_modes(models_info(api)) if len(MODES[m]) == 1]  # one SEG per study
    except ApiError:
        modes = ["best"]
    mode = model_col.selectbox("Model", modes, key="pacs-model")
    if st.button("Segment and store the SEG in the PACS", key="pacs-segment"):
        with st.status(f"Fetching, segmenting and storing study {uid}…") as status:
            try:
                st.session_state["pacs-result"] = client.pacs_segment(uid, MODES[mode][0])
            except ApiError as e:
                status.update(label="Failed", state="error")
                st.error(str(e))
                return
            status.update(label="Stored", state="complete")
    answer = st.session_state.get("pacs-result")
    if answer and answer["study_uid"] == uid:
        show(answer)


def show(answer: dict) -> None:
    st.success(f"DICOM SEG stored in the PACS as series {answer['seg_series_uid']} of study {answer['study_uid']}: "
               f"{answer['stored_at']}")
    volume = answer["lesion_volume_mm3"]
    lesions, size, seconds = st.columns(3)
    lesions.metric("Lesions", len(answer["lesions"]))
    size.metric("Lesion volume", f"{volume:,.0f} mm³" if volume is not None else "–",
                help=f"{answer['lesion_voxels']:,} voxels")
    seconds.metric("Time", f"{answer['total_ms'] / 1000:.1f} s",
                   help=f"fetch {answer['fetch_ms']:.0f} ms, engine {answer['inference_ms']:.0f} ms, "
                        f"store {answer['store_ms']:.0f} ms; {title(answer['model'])}, version "
                        f"{answer['model_version']}")
    if answer["lesions"]:
        st.dataframe([{"lesion": les["id"], "voxels": les["voxels"], "volume (mm³)": les["volume_mm3"],
                       "slices": f"{les['first_slice']}–{les['last_slice']}", "diameter (mm)": les["diameter_mm"],
                       "mean probability": les["mean_probability"]} for les in answer["lesions"]], hide_index=True)
        st.bar_chart({"lesion pixels": answer["slice_lesion_px"]}, x_label="slice", height=200)
    for warning in answer["warnings"]:
        st.warning(warning)
