"""DICOM studies built in the tests from slices (the shared dataset's, or synthetic): three MR series per
study as a scanner writes them, with real geometry and sequence tags, for the study readers, the API, the
SEG writer and the PACS client.

    study = mr_study(slices)                # slices: (H, W, 3) uint8, channels pre-T1, FLAIR, post-T1
    datasets = study.datasets               # every instance of the three series, shuffled
    data = zip_bytes(to_files(datasets))    # a zip of .dcm files

    # the same study with series on other grids (and unrecorded motion), resampled with SimpleITK:
    study = regridded_study(slices, {"AX T1 SE PRE": oblique_axial(), "AX T1 SE POST GAD": sagittal_3d()},
                            motions={"AX T1 SE PRE": Motion(3.0, shift_mm=(1.5, -2.0, 0.0))})
    study.volumes["AX T1 SE PRE"]           # each series as written, a SimpleITK image with its geometry
    slices, masks = synthetic_head()        # a smooth 3-D synthetic head with one lesion, when the data is absent
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from scipy import ndimage

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
    volumes: dict[str, sitk.Image] = field(default_factory=dict, repr=False)  # regridded_study: each series
    # as written (uint16 voxels with its geometry), by description

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


# --- studies whose series lie on other grids ----------------------------------------------------------------
#
#     study = regridded_study(slices, {"AX T1 SE PRE": oblique_axial(), "AX T1 SE POST GAD": sagittal_3d()},
#                             motions={"AX T1 SE PRE": Motion(3.0, shift_mm=(1.5, -2.0, 0.0))})
#
# The aligned study (as `mr_study` places it) is the truth: each channel's volume on the axial grid, origin
# (-120, -120, -60) LPS mm. A sequence given a Grid is resampled onto it with SimpleITK, after its Motion if
# one is given (the patient moved before that series; no tag records it), and written with that grid's
# geometry; the others are written exactly as `mr_study` writes them.

ALIGNED_ORIGIN = (-120.0, -120.0, -60.0)  # mr_study's first slice position (LPS mm)
HEAD_MARGIN_MM = 10.0  # a grid sized to the head (rows etc. None) reaches this far beyond it


@dataclass(frozen=True)
class Grid:
    """Where a series' voxels lie, as its DICOM headers say. `row` and `column` are ImageOrientationPatient's
    two vectors (the direction of increasing column index along a row, then of increasing row index); slices
    follow their cross product (the slice normal), ImagePositionPatient of the first slice is `origin`.
    `rows`, `columns` or `slices` None: as many as cover the aligned volume's head (+ HEAD_MARGIN_MM) with the
    grid centred on that volume's centre; `origin` None: the grid centred on the aligned volume's centre."""
    row: tuple[float, float, float] = (1.0, 0.0, 0.0)
    column: tuple[float, float, float] = (0.0, 1.0, 0.0)
    pixel_mm: float | tuple[float, float] = 1.0  # PixelSpacing: (between rows, between columns), or one for both
    slice_mm: float = 5.0  # between slice centres (SpacingBetweenSlices; SliceThickness too unless thickness_mm)
    rows: int | None = None
    columns: int | None = None
    slices: int | None = None
    origin: tuple[float, float, float] | None = None
    acquisition: str = "2D"  # MRAcquisitionType
    thickness_mm: float | None = None
    interpolator: str = "linear"  # or "bspline"

    @property
    def spacing(self) -> tuple[float, float]:
        """PixelSpacing: (row spacing, column spacing) mm."""
        return (float(self.pixel_mm), float(self.pixel_mm)) if np.isscalar(self.pixel_mm) else \
            tuple(float(v) for v in self.pixel_mm)

    @property
    def direction(self) -> np.ndarray:
        """3x3, columns: the row, column and slice-normal unit vectors (ITK's direction matrix)."""
        row, column = np.asarray(self.row, float), np.asarray(self.column, float)
        row, column = row / np.linalg.norm(row), column / np.linalg.norm(column)
        return np.stack([row, column, np.cross(row, column)], axis=1)

    @property
    def orientation(self) -> list[float]:
        d = self.direction
        return [float(v) for v in (*d[:, 0], *d[:, 1])]


def oblique_axial(tilt_deg: float = 18.0, pixel_mm: float = 1.0, slice_mm: float = 4.0, **kw) -> Grid:
    """Axial slices tilted about the patient's left-right axis, as a T1 aligned with the AC-PC line is:
    1 mm pixels, 4 mm slices, covering the head."""
    t = np.radians(tilt_deg)
    return Grid(row=(1.0, 0.0, 0.0), column=(0.0, float(np.cos(t)), float(np.sin(t))), pixel_mm=pixel_mm,
                slice_mm=slice_mm, **kw)


def sagittal_3d(voxel_mm: float = 1.2, **kw) -> Grid:
    """A 3-D sagittal acquisition (MPRAGE-like): isotropic voxels, rows anterior to posterior, columns
    superior to inferior (IOP 0\\1\\0\\0\\0\\-1, as scanners write it), slices from the patient's left to
    right, covering the head."""
    return Grid(row=(0.0, 1.0, 0.0), column=(0.0, 0.0, -1.0), pixel_mm=voxel_mm, slice_mm=voxel_mm,
                acquisition="3D", **kw)


def coronal_3d(voxel_mm: float = 1.2, **kw) -> Grid:
    """A 3-D coronal acquisition: rows right to left, columns superior to inferior."""
    return Grid(row=(1.0, 0.0, 0.0), column=(0.0, 0.0, -1.0), pixel_mm=voxel_mm, slice_mm=voxel_mm,
                acquisition="3D", **kw)


def coarser(pixel_mm: float = 1.875, slice_mm: float = 6.0, **kw) -> Grid:
    """Axial, 1.875 mm pixels (a 240 mm field of view over 128), 6 mm slices."""
    return Grid(pixel_mm=pixel_mm, slice_mm=slice_mm, **kw)


def finer(pixel_mm: float = 0.7, slice_mm: float = 3.0, **kw) -> Grid:
    """Axial, 0.7 mm pixels, 3 mm slices."""
    return Grid(pixel_mm=pixel_mm, slice_mm=slice_mm, **kw)


@dataclass(frozen=True)
class Motion:
    """The patient moved before a series: a rotation of `degrees` about `axis` through `centre` (default the
    aligned volume's centre), then a shift of `shift_mm` (LPS). A tissue point p of the aligned study lies at
    R (p - c) + c + t in that series. A rigid registration of the series onto the (aligned) FLAIR finds this
    very transform or its inverse: rotation angle `degrees` either way, and at the centre c a translation of
    length |t| either way."""
    degrees: float = 0.0
    axis: tuple[float, float, float] = (1.0, 0.0, 0.0)
    shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    centre: tuple[float, float, float] | None = None

    @property
    def shift_length_mm(self) -> float:
        return float(np.linalg.norm(self.shift_mm))

    def transform(self, centre) -> sitk.VersorRigid3DTransform:
        """Tissue's old position -> its position in the moved series (about `self.centre` or `centre`)."""
        t = sitk.VersorRigid3DTransform()
        t.SetCenter([float(v) for v in (self.centre or centre)])
        axis = np.asarray(self.axis, float)
        t.SetRotation([float(v) for v in axis / np.linalg.norm(axis)], float(np.radians(self.degrees)))
        t.SetTranslation([float(v) for v in self.shift_mm])
        return t

    def shift_at(self, point, centre) -> float:
        """The length of the translation this motion makes at `point` (a registration reports the translation
        at its own centre of rotation: |t| only at the motion's centre)."""
        p = np.asarray(point, float)
        return float(np.linalg.norm(np.asarray(self.transform(centre).TransformPoint([float(v) for v in p])) - p))


def aligned_volumes(slices: list[np.ndarray], pixel_mm: float = PIXEL_MM,
                    slice_mm: float = SLICE_MM) -> dict[str, sitk.Image]:
    """The aligned study's channel volumes as SimpleITK images (float32) with mr_study's geometry:
    description -> image, for the descriptions of SEQUENCES."""
    stack = np.stack([np.asarray(s) for s in slices]).astype(np.float32)  # (N, H, W, 3)
    out = {}
    for description, channel, _ in SEQUENCES:
        img = sitk.GetImageFromArray(np.ascontiguousarray(stack[..., channel]))
        img.SetOrigin(ALIGNED_ORIGIN)
        img.SetSpacing((pixel_mm, pixel_mm, slice_mm))
        out[description] = img
    return out


def centre_of(img: sitk.Image) -> np.ndarray:
    """The physical centre of an image's voxel grid (LPS mm)."""
    size = np.asarray(img.GetSize(), float)
    return np.asarray(img.TransformContinuousIndexToPhysicalPoint([float(v) for v in (size - 1) / 2]))


def head_corners(volumes: Mapping[str, sitk.Image], margin_mm: float = HEAD_MARGIN_MM) -> np.ndarray:
    """The 8 corners (LPS mm) of the bounding box of the head in the aligned volumes (any channel above a
    tenth of its 99th percentile), `margin_mm` beyond the outer voxels' edges but not beyond the volumes'."""
    ref = next(iter(volumes.values()))
    inside = np.zeros(tuple(reversed(ref.GetSize())), bool)
    for img in volumes.values():
        a = sitk.GetArrayViewFromImage(img)
        inside |= a > 0.1 * float(np.percentile(a, 99))
    if not inside.any():
        inside[:] = True
    idx = np.argwhere(inside)  # (slice, row, column)
    low, high = idx.min(0)[::-1] - 0.5, idx.max(0)[::-1] + 0.5  # (column, row, slice) continuous index
    spacing, origin = np.asarray(ref.GetSpacing()), np.asarray(ref.GetOrigin())
    edges = origin - spacing / 2, origin + (np.asarray(ref.GetSize()) - 0.5) * spacing  # axial: no rotation
    low = np.maximum(origin + low * spacing - margin_mm, edges[0])
    high = np.minimum(origin + high * spacing + margin_mm, edges[1])
    return np.array([[x, y, z] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])


def grid_image(grid: Grid, volumes: Mapping[str, sitk.Image]) -> sitk.Image:
    """An empty image with `grid`'s geometry, its unset sizes and origin filled in from the aligned volumes."""
    ref = next(iter(volumes.values()))
    direction = grid.direction
    spacing = np.array([grid.spacing[1], grid.spacing[0], grid.slice_mm])  # ITK: columns, rows, slices
    centre = centre_of(ref)
    reach = np.abs((head_corners(volumes) - centre) @ direction).max(axis=0)  # mm from the centre, per axis
    size = [n if n is not None else int(np.ceil(2 * r / s)) + 1
            for n, r, s in zip((grid.columns, grid.rows, grid.slices), reach, spacing)]
    origin = np.asarray(grid.origin, float) if grid.origin is not None else \
        centre - direction @ (spacing * (np.asarray(size) - 1) / 2)
    out = sitk.Image([int(v) for v in size], sitk.sitkFloat32)
    out.SetSpacing([float(v) for v in spacing])
    out.SetDirection([float(v) for v in direction.ravel()])
    out.SetOrigin([float(v) for v in origin])
    return out


INTERPOLATORS = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline, "nearest": sitk.sitkNearestNeighbor}


def regrid(volume: sitk.Image, grid: Grid, volumes: Mapping[str, sitk.Image], motion: Motion | None = None,
           interpolator: str | None = None) -> sitk.Image:
    """`volume` (an aligned channel) seen on `grid` after `motion`: float32, 0 outside its field of view."""
    reference = grid_image(grid, volumes)
    # Resample pulls from the input at transform(output point): the tissue now at q was at motion^-1(q).
    transform = motion.transform(centre_of(volume)).GetInverse() if motion else sitk.Transform()
    return sitk.Resample(volume, reference, transform, INTERPOLATORS[interpolator or grid.interpolator], 0.0,
                         sitk.sitkFloat32)


def regridded_study(slices: list[np.ndarray], grids: Mapping[str, Grid | None],
                    motions: Mapping[str, Motion] | None = None, pixel_mm: float = PIXEL_MM,
                    slice_mm: float = SLICE_MM, patient_id: str = "TEST0001",
                    descriptions: Mapping[str, str] | None = None, own_frame: Sequence[str] = (),
                    sequences=SEQUENCES) -> MRStudy:
    """The study `mr_study(slices)` would write, but each sequence named in `grids` (a description of
    SEQUENCES) resampled onto its Grid, after its Motion in `motions` if any, and written with that geometry;
    a sequence with no Grid (None or absent) is written as mr_study writes it, pixel for pixel. Stored values
    are the resampled intensities rounded and clipped to 0..255 (so the reader keeps them 8-bit as they are);
    outside the aligned volume 0. `descriptions` renames series (e.g. FLAIR on a sagittal grid as
    "SAG 3D FLAIR"); sequences in `own_frame` get a FrameOfReferenceUID of their own. The study's `volumes`
    hold each series as written (a SimpleITK image with its geometry), keyed by its written description."""
    motions, descriptions = motions or {}, descriptions or {}
    unknown = (set(grids) | set(motions) | set(descriptions) | set(own_frame)) - {d for d, _, _ in sequences}
    if unknown:
        raise ValueError(f"no such sequence {sorted(unknown)}; expected one of {[d for d, _, _ in sequences]}")
    volumes = aligned_volumes(slices, pixel_mm, slice_mm)
    study_uid, frame_uid = generate_uid(), generate_uid()
    series, written = {}, {}
    for number, (description, channel, tags) in enumerate(sequences, start=1):
        name = descriptions.get(description, description)
        grid, motion = grids.get(description), motions.get(description)
        if grid is None and motion is not None:
            grid = Grid(pixel_mm=pixel_mm, slice_mm=slice_mm, rows=volumes[description].GetHeight(),
                        columns=volumes[description].GetWidth(), slices=volumes[description].GetDepth(),
                        origin=ALIGNED_ORIGIN)
        img = volumes[description] if grid is None else regrid(volumes[description], grid, volumes, motion)
        voxels = np.clip(np.round(sitk.GetArrayViewFromImage(img)), 0, 255).astype(np.uint16)
        stored = sitk.GetImageFromArray(voxels)
        stored.CopyInformation(img)
        written[name] = stored
        uid = generate_uid()
        frame = generate_uid() if description in own_frame else frame_uid
        if grid is None:
            spacing, orientation, thickness, extra = (pixel_mm, pixel_mm), [1.0, 0, 0, 0, 1.0, 0], slice_mm, {}
            step = slice_mm
        else:
            spacing, orientation, step = grid.spacing, grid.orientation, grid.slice_mm
            thickness = grid.thickness_mm or grid.slice_mm
            extra = dict(MRAcquisitionType=grid.acquisition)
        instances = []
        for k in range(voxels.shape[0]):
            position = img.TransformIndexToPhysicalPoint((0, 0, k))
            instances.append(mr_slice(
                voxels[k], position=position, orientation=orientation, pixel_mm=spacing[0], slice_mm=thickness,
                study_uid=study_uid, series_uid=uid, frame_uid=frame, series_number=number, instance_number=k + 1,
                description=name, patient_id=patient_id,
                **{**tags, "PixelSpacing": [float(spacing[0]), float(spacing[1])], "SliceThickness": float(thickness),
                   "SpacingBetweenSlices": float(step), **extra}))
        series[name] = instances
    return MRStudy(study_uid, series, written)


def synthetic_head(count: int = 51, size: int = 256, pixel_mm: float = PIXEL_MM, slice_mm: float = SLICE_MM,
                   seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A smooth synthetic head as `count` axial (size, size, 3) uint8 slices (pre-T1, FLAIR, post-T1) and
    0/1 masks, on mr_study's grid: an ellipsoid head (scalp, brain with smooth texture, ventricles) and one
    ellipsoid lesion (dark on T1, bright on FLAIR, an enhancing rim after contrast). Smooth in 3-D, so that
    resampling it onto other grids and back errs as it does on real slices, not as on pixel noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid((np.arange(count) - (count - 1) / 2) * slice_mm, (np.arange(size) - (size - 1) / 2) * pixel_mm,
                          (np.arange(size) - (size - 1) / 2) * pixel_mm, indexing="ij", sparse=True)
    outer = (x / 88) ** 2 + (y / 105) ** 2 + (z / 112) ** 2
    brain = (x / 80) ** 2 + (y / 97) ** 2 + (z / 104) ** 2 < 1
    scalp = (outer < 1) & ~brain
    ventricles = ((np.abs(x) - 10) / 7) ** 2 + ((y - 5) / 28) ** 2 + ((z - 10) / 20) ** 2 < 1
    texture = np.sin(x / 9 + 1.3) * np.sin(y / 11) * np.cos(z / 13 + 0.4)  # gray-white contrast, smooth
    centre = rng.uniform([-40, -40, -20], [40, 30, 30])
    radii = rng.uniform([12, 12, 12], [20, 20, 18])
    r = np.sqrt(sum(((v - c) / a) ** 2 for v, c, a in zip((x, y, z), centre, radii)))
    lesion = brain & (r < 1)
    rim = lesion & (r > 0.7)
    channels = []
    for base, tex, vent, les, rim_gain, scalp_value in ((90, 12, -50, -30, 0, 160), (110, 10, -80, 90, 0, 80),
                                                        (95, 12, -50, -20, 110, 170)):
        v = np.zeros((count, size, size), np.float32)
        v += brain * (base + tex * texture)
        v += scalp * scalp_value
        v += (brain & ventricles) * vent + lesion * les + rim * rim_gain
        channels.append(v)
    volume = np.stack(channels, axis=-1)
    volume += rng.normal(0, 2.0, volume.shape).astype(np.float32)
    volume = ndimage.gaussian_filter(volume, (0.6, 1.2, 1.2, 0))  # partial volume, as a scanner's point spread
    slices = [np.clip(np.round(v), 0, 255).astype(np.uint8) for v in volume]
    return slices, [m.astype(np.uint8) for m in np.broadcast_to(lesion, (count, size, size))]
