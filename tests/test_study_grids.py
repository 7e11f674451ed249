"""Studies whose sequences lie on other grids than FLAIR's (issue 26): built from one aligned study with known
geometry (tests/dicom_studies.py `regridded_study`), read by the study reader, and compared with the aligned
study: each channel's alignment, its intensities, the recovered motion, the mask's Dice, and the SEG on
FLAIR's own instances.

The aligned study is a real patient of the shipped models' test split when the data is here (51 of its slices
around the lesion), and always a smooth synthetic head, so the geometry and intensity checks run without the
data; the end-to-end Dice checks with the shipped model need the real patient.

Figures measured when these thresholds were set (patient TCGA_DU_7014_19860618, slices 5-55; the synthetic
head, seed 0), mean absolute error in 8-bit units over FLAIR's head against the aligned channel: oblique T1 pre
2.8 (synthetic 2.0), sagittal 3-D T1 post 2.2 (1.0), coarser 4.2 (3.1), finer 2.2 (1.6); after a 3 deg / 2.5 mm
motion of the oblique T1 pre 2.8 (2.8) where geometry alone leaves 8.0 (7.5), registration finding 2.9 deg and
2.2 mm (on the smooth synthetic head only 1.3-1.7 deg); a sagittal FLAIR's axial reformat, per channel, <= 1.8
(0.23). The shipped model's mask (best) against the aligned study's: Dice 0.995 three grids, 0.995 with the
motion (the aligned study's own Dice against the truth 0.91): DICE_THREE_GRIDS and DICE_MOTION.
"""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from brainmets.inputs.study import CHANNELS, study_from_datasets
from conftest import REAL_DATA, REPO, api_client
from dicom_studies import (SEQUENCES, Motion, aligned_volumes, coarser, finer, mr_study, oblique_axial,
                           patient_slices, regridded_study, sagittal_3d, synthetic_head, to_files, zip_bytes)

PRE, FLAIR, POST = (d for d, _, _ in SEQUENCES)
PATIENT = "TCGA_DU_7014_19860618"  # in the shipped models' test split: 60 slices, the lesion in slices 21-50
FIRST, COUNT = 5, 51

THREE_GRIDS = {PRE: oblique_axial(), POST: sagittal_3d()}  # FLAIR axial, as acquired
OTHER_SIZES = {PRE: coarser(), POST: finer()}
# 3 degrees about an oblique axis through the volume's centre and 2.5 mm, on the oblique T1 pre
MOTION = Motion(3.0, axis=(1.0, 1.0, 1.0), shift_mm=(1.5, -1.5, 1.3229))

# Mean absolute error (8-bit) over FLAIR's head allowed, per source: about 1.5x what was measured (docstring)
MAE = {"real": dict(oblique=4.0, sagittal=3.5, coarser=6.0, finer=3.5, motion=4.0, sagittal_flair=2.5),
       "synthetic": dict(oblique=3.0, sagittal=1.5, coarser=4.5, finer=2.5, motion=4.5, sagittal_flair=1.0)}
DICE_THREE_GRIDS = 0.97  # the shipped model's mask, three-grid study against the aligned one
DICE_MOTION = 0.96  # the same with MOTION on T1 pre


# --- the studies -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["synthetic", "real"])
def source(request) -> str:
    if request.param == "real" and not (REAL_DATA / PATIENT).is_dir():
        pytest.skip(f"real patient {PATIENT} not found under {REAL_DATA} (set BRAINMETS_DATA)")
    return request.param


_SLICES: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
_BUILT: dict[tuple, object] = {}
_READ: dict[tuple, object] = {}


def slices_of(source: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The aligned study's slices (N, H, W, 3) uint8 and 0/1 masks."""
    if source not in _SLICES:
        _SLICES[source] = patient_slices(REAL_DATA / PATIENT, FIRST, COUNT) if source == "real" else synthetic_head()
    return _SLICES[source]


def built(source: str, name: str, register: str = "auto"):
    """(MRStudy, the Study read from it), built once per session and read once per `register`."""
    if (source, name) not in _BUILT:
        _BUILT[source, name] = regridded_study(slices_of(source)[0], **STUDIES[name])
    if (source, name, register) not in _READ:
        _READ[source, name, register] = study_from_datasets(_BUILT[source, name].datasets, register=register)
    return _BUILT[source, name], _READ[source, name, register]


STUDIES = {
    "aligned": dict(grids={}),
    "three grids": dict(grids=THREE_GRIDS),
    "other sizes": dict(grids=OTHER_SIZES),
    "motion": dict(grids=THREE_GRIDS, motions={PRE: MOTION}),
    "sagittal flair": dict(grids={FLAIR: sagittal_3d()}, descriptions={FLAIR: "SAG 3D T2 FLAIR"}),
}


def head(source: str) -> np.ndarray:
    """FLAIR's head in the aligned study: above a tenth of its 99th percentile (the reader's rule)."""
    flair = np.stack(slices_of(source)[0])[..., 1].astype(np.float32)
    return flair > 0.1 * float(np.percentile(flair, 99))


def mae(study, channel: int, source: str) -> float:
    """Mean absolute error (8-bit) of a channel of the study read, on the aligned grid, inside FLAIR's head."""
    got = np.stack(study.slices)[..., channel].astype(np.float32)
    truth = np.stack(slices_of(source)[0])[..., channel].astype(np.float32)
    assert got.shape == truth.shape, "the slices are not on FLAIR's (the aligned) grid"
    return float(np.abs(got - truth)[head(source)].mean())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 1.0 if not a.any() and not b.any() else float(2 * (a & b).sum() / (a.sum() + b.sum()))


# --- geometry and intensities ----------------------------------------------------------------------------


def test_the_aligned_study_is_used_as_it_is(source):
    _, study = built(source, "aligned")
    assert [c.channel for c in study.channels] == list(CHANNELS)
    assert [c.alignment for c in study.channels] == ["same grid"] * 3
    assert np.array_equal(np.stack(study.slices), np.stack(slices_of(source)[0]))
    assert set(study.seconds) >= {"read", "resample", "register"}
    assert not [w for w in study.warnings if "cover" in w]


def test_an_oblique_t1_and_a_sagittal_3d_t1_post_come_back_onto_flair_s_grid(source):
    mr, study = built(source, "three grids")
    pre, flair, post = study.channels
    assert (pre.series_uid, flair.series_uid, post.series_uid) == (mr.uid_of(PRE), mr.uid_of(FLAIR), mr.uid_of(POST))
    assert flair.alignment == "same grid"
    assert pre.alignment in ("resampled", "registered") and post.alignment in ("resampled", "registered")
    for c in (pre, post):
        assert c.coverage is not None and c.coverage > 0.95, c
        if c.alignment == "registered":  # nothing moved: registration may only find round-off
            assert c.rotation_deg < 1.0 and c.shift_mm < 1.0, c
    errors = mae(study, 0, source), mae(study, 1, source), mae(study, 2, source)
    print(f"{source} three grids: MAE t1_pre {errors[0]:.2f}, flair {errors[1]:.2f}, t1_post {errors[2]:.2f}; "
          f"{[(c.alignment, c.rotation_deg, c.shift_mm, c.coverage) for c in study.channels]}; {study.seconds}")
    assert errors[1] == 0
    assert errors[0] <= MAE[source]["oblique"] and errors[2] <= MAE[source]["sagittal"], errors
    assert not [w for w in study.warnings if "cover" in w], study.warnings


def test_coarser_and_finer_grids_come_back_onto_flair_s_grid(source):
    _, study = built(source, "other sizes")
    assert [c.alignment in ("resampled", "registered") for c in study.channels] == [True, False, True]
    errors = mae(study, 0, source), mae(study, 2, source)
    print(f"{source} coarser t1_pre MAE {errors[0]:.2f}, finer t1_post MAE {errors[1]:.2f}")
    assert errors[0] <= MAE[source]["coarser"] and errors[1] <= MAE[source]["finer"], errors


def test_registration_undoes_a_motion_the_tags_do_not_record(source):
    _, study = built(source, "motion")
    _, geometry_only = built(source, "motion", register="off")
    pre = study.channels[0]
    registered, unregistered = mae(study, 0, source), mae(geometry_only, 0, source)
    print(f"{source} motion {MOTION.degrees} deg {MOTION.shift_length_mm:.2f} mm: found {pre.rotation_deg} deg "
          f"{pre.shift_mm} mm; MAE registered {registered:.2f}, geometry alone {unregistered:.2f}; {study.seconds}")
    assert pre.alignment == "registered"
    assert geometry_only.channels[0].alignment == "resampled"
    # The rotation's angle is the same for the motion and its inverse; the translation is |t| at the centre of
    # rotation (the volume's centre, FLAIR's too), whichever way registration reports it.
    if source == "real":  # the smooth synthetic head constrains rotation less: there the intensities are checked
        assert abs(pre.rotation_deg - MOTION.degrees) <= 1.0
        assert abs(pre.shift_mm - MOTION.shift_length_mm) <= 1.0
    assert registered <= MAE[source]["motion"]
    assert registered < 0.6 * unregistered  # the motion was undone, not only resampled
    assert study.seconds["register"] > 0


def test_a_sagittal_flair_is_segmented_on_axial_slices_and_the_seg_stays_on_its_instances(source):
    from brainmets.study_results import StudyResult

    mr, study = built(source, "sagittal flair")
    flair = mr.volumes["SAG 3D T2 FLAIR"]
    assert study.channels[1].series_uid == mr.uid_of("SAG 3D T2 FLAIR")
    assert all(c.alignment in ("resampled", "registered") for c in study.channels[::2])
    # the slices are axial: their grid's slice normal is the patient's inferior-superior axis
    normal = np.reshape(study.grid.GetDirection(), (3, 3))[:, 2]
    assert abs(normal[2]) > 0.99
    # every channel is the aligned one seen on that grid
    truth = aligned_volumes(slices_of(source)[0])
    got = np.stack(study.slices).astype(np.float32)
    inside = None
    for c, description in enumerate((PRE, FLAIR, POST)):
        expected = sitk.GetArrayFromImage(sitk.Resample(truth[description], study.grid, sitk.Transform(),
                                                        sitk.sitkLinear, -1.0))
        if inside is None:
            inside = expected > 0.1 * float(np.percentile(expected[expected >= 0], 99))
        error = float(np.abs(got[..., c] - expected)[inside].mean())
        print(f"{source} sagittal FLAIR, channel {CHANNELS[c]}: MAE {error:.2f}")
        assert error <= MAE[source]["sagittal_flair"]

    # a mask on the axial slices goes back to FLAIR's own grid, and the SEG references FLAIR's instances
    lesion = sitk.GetImageFromArray(np.stack(slices_of(source)[1]).astype(np.uint8))
    lesion.CopyInformation(truth[FLAIR])
    on_slices = sitk.GetArrayFromImage(sitk.Resample(lesion, study.grid, sitk.Transform(),
                                                     sitk.sitkNearestNeighbor, 0)) > 0
    on_flair = sitk.GetArrayFromImage(sitk.Resample(lesion, flair, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0
    if not on_slices.any():
        pytest.skip("no lesion in these slices")
    back = study.on_source_grid(on_slices) > 0
    assert back.shape == on_flair.shape == (len(mr.series["SAG 3D T2 FLAIR"]), flair.GetHeight(), flair.GetWidth())
    assert dice(back, on_flair) > 0.9
    result = StudyResult(study, "truth", on_slices.astype(np.float32), on_slices, [], 0.0)
    seg = pydicom.dcmread(io.BytesIO(result.dicom_seg()))
    assert_seg_on_instances(seg, mr.series["SAG 3D T2 FLAIR"], expected=on_flair)


def assert_seg_on_instances(seg, instances, expected: np.ndarray | None = None, at_least: float = 0.9) -> None:
    """The SEG references these instances (the FLAIR series) only, and each frame is one of them; its mask,
    put back on that series' slices, has Dice > `at_least` with `expected` (slices, rows, columns)."""
    uids = [ds.SOPInstanceUID for ds in instances]
    assert seg.Modality == "SEG"
    referenced = [item.SeriesInstanceUID for item in seg.ReferencedSeriesSequence]
    assert referenced == [instances[0].SeriesInstanceUID]
    assert {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} <= set(uids)
    assert (seg.Rows, seg.Columns) == (instances[0].Rows, instances[0].Columns)
    mask = np.zeros((len(uids), seg.Rows, seg.Columns), bool)
    if int(getattr(seg, "NumberOfFrames", 0) or 0):
        frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
        for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence):
            source_uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            mask[uids.index(source_uid)] |= frame > 0
    if expected is not None:
        assert dice(mask, expected) > at_least


# --- end to end with the shipped model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped(real_data):
    """The shipped `best` model (models/ of this checkout), 2 threads."""
    from brainmets.inference import Predictor

    if not (REAL_DATA / PATIENT).is_dir():
        pytest.skip(f"real patient {PATIENT} not found under {REAL_DATA}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BRAINMETS_MODELS", str(REPO / "models"))
        yield Predictor.load("best", threads=2)


@pytest.mark.slow
def test_the_shipped_model_s_mask_of_three_grid_studies_matches_the_aligned_one(shipped):
    from brainmets.study_results import segment_study

    masks = {name: segment_study(shipped, built("real", name)[1]).mask for name in ("aligned", "three grids", "motion")}
    truth = np.stack(slices_of("real")[1]) > 0
    figures = {name: dice(mask, masks["aligned"]) for name, mask in masks.items()}
    print(f"{PATIENT}: Dice against the aligned study's mask {figures}; against the truth "
          f"{ {n: round(dice(m, truth), 3) for n, m in masks.items()} }")
    assert masks["aligned"].sum() > 1000  # the patient has a lesion, and the model finds it
    assert figures["three grids"] >= DICE_THREE_GRIDS
    assert figures["motion"] >= DICE_MOTION


@pytest.mark.slow
def test_the_api_answers_a_three_grid_study_with_a_seg_on_flair_s_instances():
    """POST /v1/segment/study?format=dicom-seg, default parameters, the shipped models; the real patient when
    here, else the synthetic head (once: the app's start-up is most of its ~20 s)."""
    source = "real" if (REAL_DATA / PATIENT).is_dir() else "synthetic"
    mr, study = built(source, "three grids")
    upload = zip_bytes(to_files(mr.datasets))
    for client in api_client(REPO / "models"):
        r = client.post("/v1/segment/study", params={"format": "dicom-seg"},
                        files={"file": ("study.zip", upload, "application/zip")})
        assert r.status_code == 200, r.text[:500]
    seg = pydicom.dcmread(io.BytesIO(r.content))
    expected = None
    if source == "real":  # the engine's mask of the same study, read here
        from brainmets.inference import Predictor
        from brainmets.study_results import segment_study

        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("BRAINMETS_MODELS", str(REPO / "models"))
            expected = segment_study(Predictor.load("best", threads=2), study).mask
    assert_seg_on_instances(seg, mr.series[FLAIR], expected=expected)


def test_grids_are_written_with_their_geometry(tmp_path):
    """The builder itself: each series read back by ITK (GDCM) has the grid it was given."""
    slices, _ = synthetic_head(count=20, size=128)
    mr = regridded_study(slices, {PRE: oblique_axial(), POST: sagittal_3d(voxel_mm=2.0)}, pixel_mm=1.875)
    for description, instances in mr.series.items():
        folder = tmp_path / description.replace(" ", "_")
        folder.mkdir()
        for i, ds in enumerate(instances):
            ds.save_as(folder / f"{i}.dcm", enforce_file_format=True)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
        image, written = reader.Execute(), mr.volumes[description]
        assert image.GetSize() == written.GetSize()
        assert np.allclose(image.GetOrigin(), written.GetOrigin(), atol=1e-3)
        assert np.allclose(image.GetSpacing(), written.GetSpacing(), atol=1e-4)
        assert np.allclose(image.GetDirection(), written.GetDirection(), atol=1e-5)
        assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(written))
    assert mr.series[POST][0].MRAcquisitionType == "3D"
    assert len({ds.FrameOfReferenceUID for ds in mr.datasets}) == 1
    tilt = np.degrees(np.arccos(np.reshape(mr.volumes[PRE].GetDirection(), (3, 3))[2, 2]))
    assert 15 <= tilt <= 20


def test_a_series_of_another_frame_of_reference_is_registered_from_centred_volumes_with_a_warning():
    slices, _ = synthetic_head(count=24, size=128, pixel_mm=1.875)
    study = regridded_study(slices, {"AX T1 SE PRE": oblique_axial()}, own_frame=["AX T1 SE PRE"], pixel_mm=1.875)
    s = study_from_datasets(study.datasets)
    assert s.channels[0].alignment in ("registered", "resampled") and s.seconds["register"] > 0
    assert any("another frame of reference than FLAIR (or none)" in w and "centred volumes" in w for w in s.warnings)
    aligned = np.stack(study_from_datasets(mr_study(slices, pixel_mm=1.875).datasets).slices)
    got = np.stack(s.slices)
    head = aligned[..., 1] > 20
    assert np.abs(got[..., 0].astype(int) - aligned[..., 0])[head].mean() < 3.0  # in place, from centred volumes
    off = study_from_datasets(study.datasets, register="off")
    assert off.channels[0].alignment == "resampled" and any("registration is off" in w for w in off.warnings)
