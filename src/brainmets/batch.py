"""Segment a folder tree, a Data.zip or a list of files with N processes (`brainmets predict`).

    find_jobs  inputs -> one Job per file, its format sniffed from its first bytes and its mask's path
               mirroring the inputs' tree: <name>.png per slice, <name>_mask.nii.gz per volume; and one
               Job per study: the DICOM files of one study (one folder, or its series' folders), or one
               patient's numbered slices in a folder (<patient>_<n>.tif),
               segmented as one stack into <folder>_mask.nii.gz, <folder>_lesions.csv (3-D lesions),
               <folder>.seg.dcm (DICOM input) and, for numbered slices, the <name>.png of each slice
    run_batch  the jobs through the inference engine, in this process (1 worker) or in N worker
               processes with a Predictor each; every mask is written atomically, and `summary.csv`

Restartable: a file whose mask exists and whose row in `summary.csv` says ok is skipped, so the same
command run again after Ctrl-C, a crash or a full disk continues where the first one stopped. Rows are
appended as files finish and the CSV is rewritten, one row per input, at the end.

summary.csv: file (relative to the inputs' common folder), mask (relative to --out), kind (slice,
volume or study), slices, lesions (8-connected in a slice, 26-connected in a volume or study), lesion_px
(pixels of a slice, voxels of a volume or study), lesion_mm2 (slices with a known pixel spacing), lesion_mm3
(volumes, studies with a known voxel size), inference_ms
(preprocessing, network, postprocessing; not reading or writing), status (ok or error), error.
"""

from __future__ import annotations

import csv
import io
import functools
import multiprocessing
import os
import time
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np
import pydicom
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from scipy import ndimage

from brainmets.checkpoints import replacing, write_atomic
from brainmets.data import IMAGE_EXTS, MASK_SUFFIX, SLICE_NUMBER, Source, ignored
from brainmets.inference import Predictor, encode_png
from brainmets.readers import ACCEPTED, UnsupportedFormat, axial_slices, read_slice, read_volume, sniff
from brainmets.study import study_from_files
from brainmets.study_results import segment_study

SUMMARY = "summary.csv"
COLUMNS = ("file", "mask", "kind", "slices", "lesions", "lesion_px", "lesion_mm2", "lesion_mm3", "inference_ms",
           "status", "error")
SNIFF_BYTES = 1 << 16  # more than any header `sniff` reads, gzip-compressed NIfTI included
NAME_EXTS = (".nii.gz", ".nii", ".dcm", ".dicom", *IMAGE_EXTS)  # cut from names; other dots are kept (DICOM UIDs)


@dataclass(frozen=True)
class Job:
    source: Path  # the folder or zip the file is read from, through brainmets.data.Source
    key: str  # the file inside it (posix)
    file: str  # the input's path relative to the inputs' common folder, as --out mirrors it
    kind: str  # 'slice', 'volume' or 'study'; '' when the format is unknown
    mask: str  # the output, relative to --out
    error: str = ""  # why the file is refused without trying: unreadable, no accepted format, a clashing name
    members: tuple[tuple[str, str], ...] = ()  # a study's files: (key, file) each


@dataclass
class Summary:
    rows: list[dict]  # one per job, in job order (this run's, or the earlier run's for skipped files)
    done: int  # segmented by this run
    failed: int
    skipped: int  # done by an earlier run
    slices: int  # slices segmented by this run
    seconds: float  # wall time of this run's segmentation, starting the workers included

    @property
    def files_per_s(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    @property
    def slices_per_s(self) -> float:
        return self.slices / self.seconds if self.seconds else 0.0


def mask_path(file: str, kind: str) -> str:
    """`a/b.webp` -> `a/b.png`; `a/v.nii.gz` -> `a/v_mask.nii.gz` (beside a volume, `v.nii.gz` would be taken
    for the image)."""
    path = PurePosixPath(file)
    stem = _stem(path.name)
    return str(path.with_name(f"{stem}_mask.nii.gz" if kind == "volume" else f"{stem}.png"))


def _stem(name: str) -> str:
    ext = next((e for e in NAME_EXTS if name.lower().endswith(e)), "")
    return name[:len(name) - len(ext)]


def find_jobs(inputs: Iterable[Path], out: Path) -> tuple[list[Job], Counter]:
    """The files to segment under folders (at any depth), in zips, or named, and what was passed over.

    In folders and zips, the dataset's ground-truth masks (`<name>_mask.<ext>`), hidden files, __MACOSX
    and files of no accepted format are passed over (counted, not segmented); a named file is always tried.
    Mask paths mirror the inputs relative to their common folder, so `--out` must not be that folder.
    """
    inputs, out = [Path(p) for p in inputs], Path(out).resolve()
    anchors = []  # (source, the folder it stands for, one named key or None for all)
    for path in inputs:
        path = path.resolve()
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        if path.is_dir():
            anchors.append((path, path, None))
        elif zipfile.is_zipfile(path):
            anchors.append((path, path.with_suffix(""), None))  # Data.zip mirrors as a folder Data/
        else:
            anchors.append((path.parent, path.parent, path.name))
    if not anchors:
        raise ValueError(f"nothing to segment: give folders, a Data.zip or files ({ACCEPTED})")
    base = Path(os.path.commonpath([anchor for _, anchor, _ in anchors]))
    if out == base:
        raise ValueError(f"--out {out} is the inputs' own folder: the masks would land among the inputs; "
                         f"choose another folder")
    jobs, passed, seen = [], Counter(), set()
    formats: dict[str, str] = {}  # file -> its sniffed format
    for source_path, anchor, named in anchors:
        source = Source(source_path)
        prefix = anchor.relative_to(base)
        keys = [named] if named else sorted(k for k in source.keys() if not ignored(k))
        # An earlier run's masks, when --out lies inside a walked folder, are not inputs.
        outputs = f"{out.relative_to(source_path).as_posix()}/" if out.is_relative_to(source_path) else None
        for key in keys:
            file = (prefix / key).as_posix()
            if file in seen or (outputs and not named and key.startswith(outputs)):
                continue
            seen.add(file)
            if not named and _stem(PurePosixPath(key).name).endswith(MASK_SUFFIX):
                passed["ground-truth masks (*_mask)"] += 1
                continue
            try:
                head = _head(source, key)
                formats[file] = sniff(head)  # 'dicom:<StudyInstanceUID>' for DICOM, to group studies
                formats[file] += f":{_study_uid(head)}" if formats[file] == "dicom" else ""
                kind = "volume" if formats[file].startswith("nifti") else "slice"
            except UnsupportedFormat as e:
                if not named:
                    passed["files of no accepted format"] += 1
                    continue
                jobs.append(Job(source_path, key, file, "", "", str(e)))
                continue
            except (ValueError, OSError) as e:  # empty or unreadable
                jobs.append(Job(source_path, key, file, "", "", str(e)))
                continue
            jobs.append(Job(source_path, key, file, kind, mask_path(file, kind)))
    if not jobs:
        raise ValueError(f"no slice or volume found in {', '.join(str(p) for p in inputs)}: expected {ACCEPTED}"
                         + (f" (passed over: {_counts(passed)})" if passed else ""))
    return _refuse_clashes(_studies(jobs, formats, base.name)), passed


def _studies(jobs: list[Job], formats: dict[str, str], root_name: str) -> list[Job]:
    """One study job, in the place of its first file, for: the DICOM files of one study (2 or more, one
    StudyInstanceUID, in one folder or in its series' sibling folders), or 2 or more numbered slices of one
    patient in one folder (`<patient>_<n>.<ext>`)."""
    groups: dict[tuple, list[Job]] = {}  # (source, study UID or patient, patient's folder) -> its files
    for job in jobs:
        if job.kind != "slice" or job.error:
            continue
        folder = str(PurePosixPath(job.file).parent)
        if formats[job.file].startswith("dicom"):
            uid = formats[job.file].partition(":")[2]
            groups.setdefault((job.source, uid or folder, ""), []).append(job)
        elif SLICE_NUMBER.search(_stem(job.file)):
            patient = SLICE_NUMBER.sub("", _stem(PurePosixPath(job.file).name))
            groups.setdefault((job.source, patient, folder), []).append(job)
    named = {}
    for (_, who, _), group in groups.items():
        if len(group) > 1:
            folder = os.path.commonpath([str(PurePosixPath(j.file).parent) for j in group])
            named[who, group[0].file] = root_name if folder in ("", ".") else folder
    clashes = Counter(named.values())
    studies: dict[str, Job] = {}  # first member's file -> the study
    for (source, who, _), group in groups.items():
        if len(group) > 1:
            name = named[who, group[0].file]
            name = f"{name}/{who}" if clashes[name] > 1 else name  # several studies or patients in one folder
            studies[group[0].file] = Job(source, "", name, "study", f"{name}_mask.nii.gz",
                                         members=tuple((j.key, j.file) for j in group))
    grouped = {file for study in studies.values() for _, file in study.members}
    return [studies.get(job.file, job) for job in jobs if job.file in studies or job.file not in grouped]


def _study_uid(head: bytes) -> str:
    """A DICOM file's StudyInstanceUID from its first bytes; '' where they do not hold it."""
    try:
        ds = pydicom.dcmread(io.BytesIO(head), stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        return str(ds.get("StudyInstanceUID", ""))
    except Exception:  # a header past the bytes read, or broken: the file's folder stands for its study
        return ""


def _head(source: Source, key: str) -> bytes:
    if source.is_zip:
        return source.read(key)[:SNIFF_BYTES]
    with open(source.path / key, "rb") as f:
        return f.read(SNIFF_BYTES)


def _refuse_clashes(jobs: list[Job]) -> list[Job]:
    """`scan.png` beside `scan.webp` would write one mask: which one it is must not depend on the order."""
    owners: dict[str, list[str]] = {}
    for job in jobs:
        if job.mask:
            owners.setdefault(job.mask, []).append(job.file)
    return [replace(job, error=f"its mask {job.mask} would also be the mask of "
                               f"{', '.join(f for f in owners[job.mask] if f != job.file)}; rename one")
            if job.mask and len(owners[job.mask]) > 1 else job for job in jobs]


def run_batch(jobs: list[Job], out: Path, model: str, workers: int = 1, tta: bool = False, runtime: str = "auto",
              progress: bool = True, console: Console | None = None, lesion_mode: str | None = None) -> Summary:
    """Segment the jobs not done yet into `out`; write `out/summary.csv`. `workers` 1 runs in this process
    with the runtime's default threads; N > 1 starts N processes with cores/N threads each. `lesion_mode`
    overrides the model's for studies and volumes."""
    console = console or Console(stderr=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / SUMMARY
    earlier = _read_rows(summary_path)
    rows: list[dict | None] = [None] * len(jobs)
    todo = []
    for i, job in enumerate(jobs):
        if job.error:
            rows[i] = _row(job, status="error", error=job.error)
            console.print(f"[red]failed:[/red] {escape(job.file + ': ' + job.error)}", soft_wrap=True)
        elif earlier.get(job.file, {}).get("status") == "ok" and (out / job.mask).exists():
            rows[i] = earlier[job.file]
        else:
            todo.append(i)
    skipped = sum(1 for r in rows if r is not None and not r.get("error"))
    # Loaded here even for N workers: a wrong name or a broken checkpoint fails now, in one clear line.
    predictor = Predictor.load(model, runtime, lesion_mode=lesion_mode)
    runtimes = ", ".join(n.runtime for n in predictor.networks)
    workers = max(1, min(workers, len(todo)))
    threads = max(1, _cores() // workers) if workers > 1 else 0
    if workers > 1:
        predictor = None  # each worker loads its own
    console.print(f"{_n(len(todo), 'file')} to segment with {model} ({runtimes}), "
                  + ("in this process" if workers == 1 else f"{workers} workers of {_n(threads, 'thread')}")
                  + (f"; {skipped} done by an earlier run" if skipped else ""), soft_wrap=True)
    columns = (TextColumn("segmenting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    done = failed = slices = 0
    started = time.perf_counter()
    appending = summary_path.exists() and summary_path.stat().st_size > 0
    with Progress(*columns, console=console, disable=not progress) as bar, summary_path.open("a", newline="") as f:
        # Rows are appended as files finish, so a killed run keeps what it did.
        log = csv.DictWriter(f, COLUMNS, restval="", extrasaction="ignore")
        if not appending:
            log.writeheader()
        task = bar.add_task("", total=len(todo), info="")
        for i, row in _segment_all([(i, jobs[i]) for i in todo], out, model, predictor, workers, threads,
                                   runtime, tta, lesion_mode):
            rows[i] = row
            log.writerow(row)
            f.flush()
            if row["status"] == "ok":
                done, slices = done + 1, slices + int(row["slices"])
            else:
                failed += 1
                bar.console.print(f"[red]failed:[/red] {escape(row['file'] + ': ' + row['error'])}", soft_wrap=True)
            elapsed = time.perf_counter() - started
            bar.update(task, advance=1, info=f"{slices / elapsed:.1f} slices/s")
    seconds = time.perf_counter() - started
    _write_rows(summary_path, rows)
    failed += sum(1 for j in jobs if j.error)
    return Summary(rows, done, failed, skipped, slices, seconds)


def _segment_all(jobs: list[tuple[int, Job]], out: Path, model: str, predictor: Predictor | None, workers: int,
                 threads: int, runtime: str, tta: bool, lesion_mode: str | None = None) -> Iterator[tuple[int, dict]]:
    """(index, row) pairs as the files finish: in this process with `predictor`, or in `workers` processes."""
    if workers == 1:
        for i, job in jobs:
            yield i, segment(predictor, job, out, tta)
        return
    # spawn, not fork: a forked copy of a process that has run OpenMP threads can deadlock in them.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, context, initializer=_start_worker,
                               initargs=(model, runtime, threads, lesion_mode))
    try:
        futures = {pool.submit(_segment_in_worker, job, out, tta): i for i, job in jobs}
        for future in as_completed(futures):
            yield futures[future], future.result()
    except BrokenProcessPool as e:
        raise ChildProcessError(f"a worker process died ({e}); out of memory? Run the same command again "
                                f"to continue where it stopped") from e
    finally:  # on Ctrl-C or an error, the files not started yet are dropped, not waited for
        pool.shutdown(cancel_futures=True)


_worker_predictor: Predictor | None = None  # the Predictor of this worker process


def _start_worker(model: str, runtime: str, threads: int, lesion_mode: str | None) -> None:
    global _worker_predictor
    _worker_predictor = Predictor.load(model, runtime, threads, lesion_mode=lesion_mode)


def _segment_in_worker(job: Job, out: Path, tta: bool) -> dict:
    return segment(_worker_predictor, job, out, tta)


def segment(predictor: Predictor, job: Job, out: Path, tta: bool = False) -> dict:
    """One file through the engine, its mask written atomically: its summary row. A failure becomes the
    row's error; it never stops the batch."""
    row = _row(job, status="ok")
    try:
        data = _source(job.source).read(job.key) if job.key else b""
        if job.kind == "study":
            result = _segment_study(predictor, job, out, tta)
            row.update(slices=len(result.study.slices), lesions=len(result.lesions), lesion_px=result.lesion_voxels,
                       lesion_mm3="" if result.lesion_volume_mm3 is None else round(result.lesion_volume_mm3, 3))
            payload = result.nifti_gz()
        elif job.kind == "volume":
            volume = read_volume(data)
            result = predictor.predict_volume(volume, tta)
            _, lesions = ndimage.label(result.mask, np.ones((3, 3, 3)))  # 26-connected: 8-connected in 3-D
            row.update(slices=len(axial_slices(volume)[0]), lesions=lesions, lesion_px=result.lesion_voxels,
                       lesion_mm3=round(result.lesion_volume_mm3, 3))
            payload = result.nifti_gz()
        else:
            image = read_slice(data)
            result = predictor.predict(image.pixels, image.spacing, tta)
            mm2 = result.lesion_area_mm2
            row.update(slices=1, lesions=len(result.lesions), lesion_px=result.lesion_area_px,
                       lesion_mm2="" if mm2 is None else round(mm2, 3))
            payload = result.mask_png()
        row["inference_ms"] = round(result.seconds * 1000, 1)
        write_atomic(out / job.mask, payload)  # a reader, or a restart, sees the whole mask or none of it
    except Exception as e:  # one bad file must not stop a batch of thousands: its row says what went wrong
        expected = isinstance(e, (ValueError, OSError))
        row.update(slices="", lesions="", lesion_px="", lesion_mm2="", lesion_mm3="", inference_ms="",
                   status="error", error=str(e) if expected else f"{type(e).__name__}: {e}")
    return row


def _segment_study(predictor: Predictor, job: Job, out: Path, tta: bool):
    """A study in one engine call; its lesion table, its SEG (DICOM input) and each numbered slice's mask are
    written here, the NIfTI mask by the caller, last, as the mark of a finished study."""
    source = _source(job.source)
    study = study_from_files(((key, source.read(key)) for key, _ in job.members), name=job.file)
    result = segment_study(predictor, study, tta)
    write_atomic(out / f"{job.file}_lesions.csv", result.lesions_csv())
    if study.kind == "dicom":
        write_atomic(out / f"{job.file}.seg.dcm", result.dicom_seg())
    file_of = dict(job.members)
    for key, mask in zip(study.files, result.mask):
        write_atomic(out / mask_path(file_of[key], "slice"), encode_png(mask.astype(np.uint8) * 255))
    return result


@functools.lru_cache(maxsize=None)
def _source(path: Path) -> Source:
    """One Source per folder or zip and process: a zip's index is read once."""
    return Source(path)


def _row(job: Job, **values) -> dict:
    return {"file": job.file, "mask": job.mask, "kind": job.kind, **values}


def _read_rows(path: Path) -> dict[str, dict]:
    """An earlier run's rows by file, the last one winning (a restart appends a file's new row)."""
    if not path.exists():
        return {}
    with path.open(newline="") as f:
        return {row["file"]: row for row in csv.DictReader(f) if row.get("file")}


def _write_rows(path: Path, rows: list[dict | None]) -> None:
    with replacing(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(r for r in rows if r is not None)


def _counts(counter: Counter) -> str:
    return ", ".join(f"{n} {what}" for what, n in counter.items())


def _cores() -> int:
    """The cores this process may run on (all of them where the OS cannot say)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def report(summary: Summary, passed: Counter, out: Path) -> list[str]:
    """What the run did, in a few lines for the terminal."""
    lines = [f"{_n(summary.done, 'file')} segmented ({_n(summary.slices, 'slice')}) in {summary.seconds:.1f} s: "
             f"{summary.files_per_s:.2f} files/s, {summary.slices_per_s:.1f} slices/s"]
    if summary.skipped:
        lines.append(f"{summary.skipped} done by an earlier run, skipped")
    if passed:
        lines.append(f"passed over: {_counts(passed)}")
    ok = [r for r in summary.rows if r.get("status") == "ok"]
    with_lesions = [r for r in ok if int(r.get("lesions") or 0) > 0]
    stacks = [r for r in ok if r.get("kind") in ("volume", "study") and r.get("lesion_mm3") not in ("", None)]
    mm3 = sum(float(r.get("lesion_mm3") or 0) for r in stacks)
    lines.append(f"lesions found in {len(with_lesions)} of {_n(len(ok), 'file')}"
                 + (f"; {mm3:.1f} mm³ of lesion in {_n(len(stacks), 'volume')} or stud{'y' if len(stacks) == 1 else 'ies'}"
                    if stacks else ""))
    lines.append(f"masks and {SUMMARY} in {out}")
    return lines
