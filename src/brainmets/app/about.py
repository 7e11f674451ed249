"""The About view: the data, what the numbers mean, and what the page must not be used for."""

from __future__ import annotations

import streamlit as st

from brainmets.app.client import ApiError
from brainmets.app.compare import models_info
from brainmets.registry import title

ABOUT = """
### The data
The models were trained on the **TCGA lower-grade glioma** collection prepared by Buda et al.
(2019, *Computers in Biology and Medicine* 109:218-225, "Association of genomic subtypes of lower-grade
gliomas with shape features automatically extracted by a deep learning algorithm"): 110 patients
from The Cancer Imaging Archive, 3 929 axial slices of 256 x 256 px with three channels
(pre-contrast, FLAIR, post-contrast). The masks outline the **FLAIR abnormality**, drawn by a
radiologist; about a third of the slices hold a lesion. The shipped models used 88 of the 110
patients, split by patient (never by slice) into training, validation and test, so no test patient was
seen in training.

### What the page does
The file goes to the brainmets API, which applies the training preprocessing (three 8-bit channels,
resize to the network's input, CLAHE per channel), runs the chosen network, and returns the
probability map and the mask, both at the input's size. The mask keeps the pixels above the model's
threshold, less lesions under its smallest size, both chosen on the validation patients and read from
each model's configuration: {postprocessing}. *CLAHE-enhanced*
shows what the network sees. The overlay and the heat map are drawn on the middle channel, FLAIR in the
reference data, on which its masks were drawn. Lesions are the connected components of the mask; their area is in
pixels, and in mm² when the file carries a pixel spacing (DICOM, NIfTI). *Flip TTA* averages the
prediction over flipped copies of the slice; *ensemble* averages both networks' probabilities.

### What the metrics mean
- **Dice per patient (3-D)**, the headline: each test patient's slices are stacked into a volume,
  Dice = 2|P∩T| / (|P|+|T|) is computed on it, then averaged over patients (as in Buda et al., who
  report 0.82). A patient with no lesion scores 1 when nothing is predicted and 0 otherwise.
- **Dice per lesion slice**: 2-D Dice averaged over the slices that hold a lesion.
- **Pooled Dice, IoU, precision, recall**: over every pixel of every test slice together.
- **HD95**: the 95th percentile of the distance between the predicted and true outlines, in pixels
  (about 1 mm at this resolution), over patients where both are non-empty.
- **Lesion sensitivity / false positives per patient**: connected components found or invented.
- **Lesion-wise Dice and HD95** (BraTS-METS 2023, the metastasis challenge's ranking): each true lesion
  (26-connected, lesions two voxels apart or closer taken as one) is scored against the predicted components
  that touch it; a missed lesion and a predicted component touching none score Dice 0 and HD95 374 (mm in the
  challenge; pixels here, the reference data carrying no spacing); lesions of 2 voxels or fewer are left out;
  the sum is divided by the true plus false lesions, per patient, then averaged. A patient with nothing to find
  and nothing claimed scores 1 and 0. On the whole lesion, as the masks are binary. {lesion_wise}

### Limits
For research and teaching only: **not a medical device**, not validated for diagnosis or treatment.
The models learnt FLAIR abnormalities of lower-grade gliomas in one public dataset; other tumours,
sequences, scanners or orientations may fail silently. Images you upload are sent to the API
this page is configured with.
"""


def postprocessing(models: list[dict] | None) -> str:
    """Each served model's threshold and smallest lesion, as GET /v1/models reports them from its config."""
    known = [m for m in models or [] if m.get("threshold") is not None]
    if not known:
        return "shown here when the API answers"
    return "; ".join(f"{title(m['name'])} threshold {m['threshold']:g}"
                     + (f", a lone slice's lesions under {m['min_lesion_px']} px of a {m['image_size']}² slice dropped"
                        if m.get("min_lesion_px") else "")
                     + {"single": ", a volume or study keeps its one strongest 3-D lesion",
                        "multiple": ", a volume or study keeps every 3-D lesion"}.get(m.get("lesion_mode"), "")
                     for m in known)


def lesion_wise(models: list[dict] | None) -> str:
    """Each served model's lesion-wise test scores, where its metrics carry them (GET /v1/models)."""
    if models is None:
        return "Each model's scores are shown here when the API answers."
    scored = [m for m in models if (m.get("metrics") or {}).get("lesion_wise_dice_mean") is not None]
    unscored = [title(m["name"]) for m in models if m not in scored and m.get("metrics")]
    parts = [f"{title(m['name'])}: lesion-wise Dice {m['metrics']['lesion_wise_dice_mean']:.3f}, HD95 "
             f"{m['metrics']['lesion_wise_hd95_mean']:.1f} px on its test patients" for m in scored]
    if unscored:
        parts.append(f"{', '.join(unscored)}: not in its metrics.json yet (shipped before `brainmets evaluate` "
                     "computed them)")
    return ("; ".join(parts) + ".") if parts else ""


def render(api: str) -> None:
    try:
        models = models_info(api)
    except ApiError:
        models = None  # the sidebar says why
    st.markdown(ABOUT.format(postprocessing=postprocessing(models), lesion_wise=lesion_wise(models)))
