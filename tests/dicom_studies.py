"""DICOM studies built in the tests from slices (the shared dataset's, or synthetic): three MR series per
study as a scanner writes them, with real geometry and sequence tags, for the study readers, the API, the
SEG writer and the PACS client.

    study = mr_study(slices)                # slices: (H, W, 3) uint8, channels pre-T1, FLAIR, post-T1
    datasets = study.datasets               # every instance of the three series, shuffled
    data = zip_bytes(to_files(datasets))    # a zip of .dcm files
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from brainmets.data import open_dataset

# (description, channel of the dataset's slices, sequence tags): how the three sequences are labelled on
# a Siemens scanner; the post-contrast series also names its contrast agent.
SEQUENCES = (
    ("AX T1 SE PRE", 0, dict(ScanningSequence="SE", SequenceName="*se2d1", RepetitionTime=500, EchoTime=9)),
    ("AX T2 FLAIR", 1, dict(ScanningSequence=["SE", "IR"], SequenceName="*tir2d1_16", RepetitionTime=9000,
                             EchoTime=90, InversionTime=2500)),
    ("AX T1 SE POST GAD", 2, dict(ScanningSequence="SE", SequenceName="*se2d1", RepetitionTime=500, EchoTime=9,
                                  ContrastBolusAgent="Gadobutrol")),
)
PIXEL_MM = 0.9375  # 240 mm field of view over 256 pixels
SLICE_MM = 5.0


@dataclass
class MRStudy:
    study_uid: str
    series: dict[str, list[Dataset]]  # description -> instances in slice order (inferior first)

    @property
    def datasets(self) -> list[Dataset]:
        """Every instance, shuffled (seeded) as a PACS or a zip gives them: the reader must order them."""
        everything = [ds for instances in self.series.values() for ds in instances]
        order = np.random.default_rng(0).permutation(len(everything))
        return [everything[i] for i in order]

    def uid_of(self, description: str) -> str:
        return self.series[description][0].SeriesInstanceUID


def mr_study(slices: list[np.ndarray], sequences=SEQUENCES, pixel_mm: float = PIXEL_MM, slice_mm: float = SLICE_MM,
             patient_id: str = "TEST0001") -> MRStudy:
    """One study of `sequences` (description, channel of `slices`, extra tags) over the same slices."""
    study_uid, frame_uid = generate_uid(), generate_uid()
    series = {}
    for number, (description, channel, tags) in enumerate(sequences, start=1):
        uid = generate_uid()
        series[description] = [
            mr_slice(np.asarray(image)[..., channel] if np.asarray(image).ndim == 3 else image,
                     position=(-120.0, -120.0, -60.0 + k * slice_mm), pixel_mm=pixel_mm, slice_mm=slice_mm,
                     study_uid=study_uid, series_uid=uid, frame_uid=frame_uid, series_number=number,
                     instance_number=k + 1, description=description, patient_id=patient_id, **tags)
            for k, image in enumerate(slices)]
    return MRStudy(study_uid, series)


# What every instance of these studies shares: the tags highdicom copies into a SEG, and those an MR image
# carries in a real export.
COMMON_TAGS = dict(
    SpecificCharacterSet="ISO_IR 100", ImageType=["ORIGINAL", "PRIMARY", "M", "ND"], StudyDate="20260101",
    SeriesDate="20260101", ContentDate="20260101", StudyTime="120000", SeriesTime="120000", ContentTime="120000",
    AccessionNumber="A0001", Modality="MR", Manufacturer="SIEMENS", ReferringPhysicianName="",
    StudyDescription="MRI BRAIN WITH AND WITHOUT CONTRAST", PatientName="Test^Patient", PatientBirthDate="19700101",
    PatientSex="F", ScanningSequence="SE", SequenceVariant="SK", ScanOptions="", MRAcquisitionType="2D",
    MagneticFieldStrength=3, EchoTrainLength=1, PatientPosition="HFS", StudyID="1", PositionReferenceIndicator="",
    SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2", BitsAllocated=16, BitsStored=16, HighBit=15,
    PixelRepresentation=0, RescaleIntercept=0, RescaleSlope=1, RescaleType="US",
)


def mr_slice(pixels: np.ndarray, position=(0.0, 0.0, 0.0), orientation=(1, 0, 0, 0, 1, 0), pixel_mm: float = PIXEL_MM,
             slice_mm: float = SLICE_MM, study_uid: str | None = None, series_uid: str | None = None,
             frame_uid: str | None = None, series_number: int = 1, instance_number: int = 1,
             description: str = "AX T2 FLAIR", patient_id: str = "TEST0001", **tags) -> Dataset:
    """One MR Image Storage instance, 16-bit stored values equal to `pixels` (rescale slope 1, intercept 0);
    `tags` are set last, over any of the above."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    values = {
        **COMMON_TAGS, "SeriesDescription": description, "PatientID": patient_id, "SliceThickness": slice_mm,
        "SpacingBetweenSlices": slice_mm, "StudyInstanceUID": study_uid or generate_uid(),
        "SeriesInstanceUID": series_uid or generate_uid(), "FrameOfReferenceUID": frame_uid or generate_uid(),
        "SeriesNumber": series_number, "InstanceNumber": instance_number,
        "ImagePositionPatient": [float(v) for v in position], "ImageOrientationPatient": [float(v) for v in orientation],
        "SliceLocation": float(position[2]), "Rows": pixels.shape[0], "Columns": pixels.shape[1],
        "PixelSpacing": [pixel_mm, pixel_mm], "PixelData": np.asarray(pixels).astype("<u2").tobytes(), **tags}
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def to_files(datasets: list[Dataset], folder: str = "DICOM") -> dict[str, bytes]:
    """As a PACS export names them: opaque names, no extension, one folder per series."""
    return {f"{folder}/S{int(ds.SeriesNumber):03d}/IM{i:05d}": to_bytes(ds) for i, ds in enumerate(datasets)}


def zip_bytes(files: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def write_files(files: dict[str, bytes], root: Path) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def patient_slices(patient_dir: Path, first: int = 0, count: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A patient's slices (H, W, 3) and masks (0/1) in slice order, read by `brainmets.data`; `count` from the
    `first`th on."""
    dataset = open_dataset(patient_dir)
    pairs = dataset.slices[first:first + count if count else None]
    return [dataset.read_image(p) for p in pairs], [dataset.read_mask(p) for p in pairs]
