"""Segment a folder tree, a Data.zip or a list of files with N processes (`brainmets predict`).

    find_jobs  inputs -> one Job per file, its format sniffed from its first bytes and its mask's path
               mirroring the inputs' tree: <name>.png per slice, <name>_mask.nii.gz and <name>_lesions.csv
               per volume; and one Job per study: the DICOM files of one study (one folder, or its series'
               folders), one patient's numbered slices in a folder (<patient>_<n>.tif), or one NIfTI case
               (a sequence per file, named as BraTS or nnU-Net do: brainmets.inputs.cases),
               segmented as one stack into <folder>_mask.nii.gz (<case>_mask.nii.gz, on the FLAIR file's
               grid), <folder>_lesions.csv (3-D lesions), <folder>.seg.dcm (DICOM input) and, for numbered
               slices, the <name>.png of each slice. Volumes and studies go through the one study reader.
    run_batch  the jobs through the inference engine, in this process (1 worker), in N worker processes
               with a Predictor each, or on a Ray cluster (`brainmets.cluster`); every output is written
               atomically, and `summary.csv` and `provenance.json`

Restartable: a file whose mask exists and whose row in `summary.csv` says ok with this run's model version is
skipped, so the same command run again after Ctrl-C, a crash or a full disk continues where the first one
stopped, and a run with another model, post-processing, TTA, lesion mode, registration setting or precision
redoes what the earlier one made (`brainmets.provenance`). Rows are appended as files finish and the CSV is
rewritten, one row per input, at the end. `provenance.json` holds the run's model version and what it is made
of, as nnU-Net writes its prediction arguments beside its outputs.

summary.csv: file (relative to the inputs' common folder), mask (relative to --out), model (the model version
that made the mask: `brainmets.provenance`), kind (slice,
volume or study), slices, lesions (8-connected in a slice, 26-connected in a volume or study), lesion_px
(pixels of a slice, voxels of a volume or study), lesion_mm2 (slices with a known pixel spacing), lesion_mm3
(volumes, studies with a known voxel size), inference_ms
(preprocessing, network, postprocessing; not reading or writing), status (ok or error), error.
"""

from __future__ import annotations

import csv
import io
import functools
import json
import multiprocessing
import os
import posixpath
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np
import pydicom
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from brainmets.checkpoints import replacing, write_atomic
from brainmets.data import IMAGE_EXTS, MASK_SUFFIX, SLICE_NUMBER, DataError, Source, ignored
from brainmets.inference import Predictor, encode_png
from brainmets.inputs.cases import (LABEL_FILE, NNUNET, CaseError, CaseFiles, find_cases, is_case_file,
                                    read_dataset_json)
from brainmets.inputs.readers import ACCEPTED, UnsupportedFormat, read_slice, sniff
from brainmets.inputs.study import study_from_files
from brainmets.provenance import fingerprint
from brainmets.study_results import segment_study

SUMMARY = "summary.csv"
PROVENANCE = "provenance.json"
COLUMNS = ("file", "mask", "model", "kind", "slices", "lesions", "lesion_px", "lesion_mm2", "lesion_mm3", "inference_ms",
           "status", "error")
SNIFF_BYTES = 1 << 16  # more than any header `sniff` reads, gzip-compressed NIfTI included
NAME_EXTS = (".nii.gz", ".nii", ".dcm", ".dicom", *IMAGE_EXTS)  # cut from names; other dots are kept (DICOM UIDs)
DATASET_JSON = "dataset.json"  # nnU-Net's description of a dataset: its channel order


@dataclass(frozen=True)
class Job:
    source: Path  # the folder or zip the file is read from, through brainmets.data.Source
    key: str  # the file inside it (posix)
    file: str  # the input's path relative to the inputs' common folder, as --out mirrors it
    kind: str  # 'slice', 'volume' or 'study'; '' when the format is unknown
    mask: str  # the output, relative to --out
    error: str = ""  # why the file is refused without trying: unreadable, no accepted format, a clashing name
    members: tuple[tuple[str, str], ...] = ()  # a study's or volume's files: (key, file) each
    channels: tuple[str, ...] = ()  # an nnU-Net case's channel order from --channels (no dataset.json among members)


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


def find_jobs(inputs: Iterable[Path], out: Path, channels: Sequence[str] | None = None) -> tuple[list[Job], Counter]:
    """The files to segment under folders (at any depth), in zips, or named, and what was passed over.

    In folders and zips, the dataset's ground-truth masks (`<name>_mask.<ext>`), hidden files, __MACOSX
    and files of no accepted format are passed over (counted, not segmented), dataset.json files read with
    their nnU-Net cases; a named file is always tried, and named numbered slices one by one (a gap between
    them is no gap in a patient's stack). NIfTI case label files (BraTS `-seg`, nnU-Net `labelsTr/`), named
    or found, are never segmented (counted). `channels` is the nnU-Net channel order of cases with no
    dataset.json beside them or one level up.
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
    jobs, passed, seen, named_files = [], Counter(), set(), set()
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
            if named:
                named_files.add(file)
            elif _stem(PurePosixPath(key).name).endswith(MASK_SUFFIX):
                passed["ground-truth masks (*_mask)"] += 1
                continue
            elif PurePosixPath(key).name == DATASET_JSON:  # read with the nnU-Net cases beside or below it
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
            jobs.append(Job(source_path, key, file, kind, mask_path(file, kind),
                            members=((key, file),) if kind == "volume" else ()))
    jobs = _cases(jobs, channels, passed)
    if not jobs:
        raise ValueError(f"no slice or volume found in {', '.join(str(p) for p in inputs)}: expected {ACCEPTED}"
                         + (f" (passed over: {_counts(passed)})" if passed else ""))
    return _refuse_clashes(_studies(jobs, formats, base.name, named_files)), passed


def _cases(jobs: list[Job], channels: Sequence[str] | None, passed: Counter) -> list[Job]:
    """One study job, in the place of its first file, per NIfTI case of a folder (a sequence per file, named
    as BraTS or nnU-Net do); its label files and channels of no sequence read are passed over. A folder
    whose cases cannot be told (two files of one sequence, nnU-Net names and no channel order) makes each
    of its case files a job refused with the reason."""
    folders: dict[tuple[Path, str], list[Job]] = {}  # (source, folder) -> the case files in it, in job order
    for job in jobs:
        if job.kind == "volume" and is_case_file(job.key):
            folders.setdefault((job.source, posixpath.dirname(job.key)), []).append(job)
    placed: dict[str, Job | None] = {}  # file -> the study in its place, or None where it is dropped
    for (source_path, folder), group in folders.items():
        by_key = {job.key: job for job in group}
        try:
            cases, ignored_files, dataset_json = _find_cases(_source(source_path), folder, list(by_key), channels)
        except (CaseError, DataError) as e:
            placed.update((job.file, replace(job, kind="", mask="", members=(), error=str(e))) for job in group)
            continue
        for line in ignored_files:
            key, why = line.split(": ", 1)
            placed[by_key[key].file] = None
            passed["label files (segmentation)" if why == LABEL_FILE else "NIfTI channels of no sequence read"] += 1
        for case in cases:
            members = [job for job in group if job.key in case.files.values()]
            here = posixpath.dirname(members[0].file)
            file = _join(here, case.case)
            # The study reader takes the channel order from the dataset.json among its files, else from `channels`.
            described = dataset_json if case.naming == NNUNET else ""
            placed.update((job.file, None) for job in members)
            placed[members[0].file] = Job(
                source_path, "", file, "study", f"{file}_mask.nii.gz",
                members=tuple((job.key, job.file) for job in members)
                + (((_join(folder, described), _join(here, described)),) if described else ()),
                channels=tuple(channels or ()) if case.naming == NNUNET and not described else ())
    return [placed.get(job.file, job) for job in jobs if placed.get(job.file, job) is not None]


def _find_cases(source: Source, folder: str, keys: list[str],
                channels: Sequence[str] | None) -> tuple[list[CaseFiles], list[str], str]:
    """(cases, files passed over, the dataset.json that gave the nnU-Net channel order relative to `folder`
    or ''). nnU-Net keeps dataset.json in the dataset's folder, its cases in imagesTr/ and imagesTs/ below:
    it is looked for beside the files and one level up (above a walked folder too: `brainmets predict
    Dataset001/imagesTs`), and wins over `channels`."""
    for name in (DATASET_JSON, f"../{DATASET_JSON}"):
        key = _join(folder, name)
        if (key in source.keys()) if source.is_zip else (source.path / key).is_file():
            dataset = read_dataset_json(source.read(key), source.describe(key))
            return *find_cases(keys, list(dataset["channel_names"].values()), source.describe(key)), name
    return *find_cases(keys, channels, "--channels"), ""


def _join(folder: str, name: str) -> str:
    """`name` relative to `folder`, both posix and relative ('' for the top): 'a' + '../x' -> 'x'."""
    return posixpath.normpath(posixpath.join(folder, name))


def _studies(jobs: list[Job], formats: dict[str, str], root_name: str, named: set[str]) -> list[Job]:
    """One study job, in the place of its first file, for: the DICOM files of one study (2 or more, one
    StudyInstanceUID, in one folder or in its series' sibling folders), or 2 or more numbered slices of one
    patient in one folder (`<patient>_<n>.<ext>`), found there, not named one by one."""
    groups: dict[tuple, list[Job]] = {}  # (source, study UID or patient, patient's folder) -> its files
    for job in jobs:
        if job.kind != "slice" or job.error:
            continue
        folder = str(PurePosixPath(job.file).parent)
        if formats[job.file].startswith("dicom"):
            uid = formats[job.file].partition(":")[2]
            groups.setdefault((job.source, uid or folder, ""), []).append(job)
        elif SLICE_NUMBER.search(_stem(job.file)) and job.file not in named:
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


def run_batch(jobs: list[Job], out: Path, model: str, workers: int | None = 1, tta: bool = False, runtime: str = "auto",
              progress: bool = True, console: Console | None = None, lesion_mode: str | None = None,
              register: str = "auto", ray: str | None = None) -> Summary:
    """Segment the jobs not done yet with this model version into `out`; write `out/summary.csv` and
    `out/provenance.json`. `workers` 1 runs in this process with the runtime's default threads; N > 1 starts N
    processes with cores/N threads each. `ray` (an address, or `local` for a cluster started for the run) runs
    them on a Ray cluster instead, `workers` actors (None: one per CPU of the cluster). `lesion_mode` overrides
    the model's for studies and volumes; `register` (auto, on, off) is the study reader's rigid registration of
    each sequence onto FLAIR."""
    console = console or Console(stderr=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Loaded here even for workers: a wrong name or a broken checkpoint fails now, in one clear line, and the
    # workers run the precision chosen here, so that every mask of the run comes from one model version.
    predictor = Predictor.load(model, runtime, lesion_mode=lesion_mode)
    version = fingerprint(predictor, tta, register)
    summary_path = out / SUMMARY
    earlier = _read_rows(summary_path)
    _write_rows(summary_path, list(earlier.values()))  # an older run's columns become this run's, to append to
    rows: list[dict | None] = [None] * len(jobs)
    todo = []
    for i, job in enumerate(jobs):
        before = earlier.get(job.file, {})
        if job.error:
            rows[i] = _row(job, status="error", error=job.error)
            console.print(f"[red]failed:[/red] {escape(job.file + ': ' + job.error)}", soft_wrap=True)
        elif before.get("status") == "ok" and before.get("model") == version.version and (out / job.mask).exists():
            rows[i] = before
        else:
            todo.append(i)
    skipped = sum(1 for r in rows if r is not None and not r.get("error"))
    stale = sum(1 for i in todo if earlier.get(jobs[i].file, {}).get("status") == "ok")
    engine = Engine(model, runtime, tuple(n.precision for n in predictor.networks), lesion_mode, tta, register)
    _write_provenance(out, version, engine, ray, rows)
    if ray is not None:
        from brainmets.cluster import Cluster

        cluster = Cluster(ray, workers)
        where = cluster.describe()
    else:
        workers = max(1, min(workers or 1, len(todo)))
        threads = max(1, _cores() // workers) if workers > 1 else 0
        where = "in this process" if workers == 1 else f"{workers} workers of {_n(threads, 'thread')}"
    console.print(f"{_n(len(todo), 'file')} to segment with {version.version} "
                  f"({predictor.summary}), {where}"
                  + (f"; {skipped} done by an earlier run" if skipped else "")
                  + (f"; {stale} made by another model version, redone" if stale else ""), soft_wrap=True)
    columns = (TextColumn("segmenting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    done = failed = slices = 0
    started = time.perf_counter()
    with Progress(*columns, console=console, disable=not progress) as bar, summary_path.open("a", newline="") as f:
        # Rows are appended as files finish, so a killed run keeps what it did.
        log = csv.DictWriter(f, COLUMNS, restval="", extrasaction="ignore")
        task = bar.add_task("", total=len(todo), info="")
        if ray is not None:
            finished = cluster.run([(i, jobs[i]) for i in todo], out, engine)
        else:
            finished = _segment_all([(i, jobs[i]) for i in todo], out, engine, predictor, workers, threads)
        for i, row in finished:
            rows[i] = row
            log.writerow(row)
            f.flush()
            if row["status"] == "ok":
                done, slices = done + 1, slices + int(row["slices"])
                if row["model"] != version.version:
                    bar.console.print(f"[yellow]warning:[/yellow] {escape(row['file'])} made by {row['model']}, not "
                                      f"{version.version} (a worker ran another runtime or precision)", soft_wrap=True)
            else:
                failed += 1
                bar.console.print(f"[red]failed:[/red] {escape(row['file'] + ': ' + row['error'])}", soft_wrap=True)
            elapsed = time.perf_counter() - started
            bar.update(task, advance=1, info=f"{slices / elapsed:.1f} slices/s")
    seconds = time.perf_counter() - started
    _write_rows(summary_path, rows)
    _write_provenance(out, version, engine, ray, rows)
    failed += sum(1 for j in jobs if j.error)
    return Summary(rows, done, failed, skipped, slices, seconds)


@dataclass(frozen=True)
class Engine:
    """How every worker of a run loads and runs the model: the same model version everywhere."""

    model: str
    runtime: str
    precisions: tuple[str, ...]  # the driver's choice, per network
    lesion_mode: str | None
    tta: bool
    register: str

    def load(self, threads: int = 0) -> Predictor:
        return Predictor.load(self.model, self.runtime, threads, self.precisions, self.lesion_mode)


def _write_provenance(out: Path, version, engine: Engine, ray: str | None, rows: list[dict | None]) -> None:
    made_by = Counter(r["model"] for r in rows if r is not None and r.get("status") == "ok")
    write_atomic(out / PROVENANCE, json.dumps({
        "model_version": version.version, "fingerprint": version.record(),
        "arguments": {"model": engine.model, "runtime": engine.runtime, "lesion_mode": engine.lesion_mode,
                      "tta": engine.tta, "register": engine.register, "ray": ray},
        "masks_by_model_version": dict(made_by)}, indent=2) + "\n")


def _segment_all(jobs: list[tuple[int, Job]], out: Path, engine: Engine, predictor: Predictor, workers: int,
                 threads: int) -> Iterator[tuple[int, dict]]:
    """(index, row) pairs as the files finish: in this process with `predictor`, or in `workers` processes."""
    if workers == 1:
        for i, job in jobs:
            yield i, segment(predictor, job, out, engine.tta, engine.register)
        return
    # spawn, not fork: a forked copy of a process that has run OpenMP threads can deadlock in them.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, context, initializer=_start_worker, initargs=(engine, threads))
    try:
        futures = {pool.submit(_segment_in_worker, job, out, engine.tta, engine.register): i for i, job in jobs}
        for future in as_completed(futures):
            yield futures[future], future.result()
    except BrokenProcessPool as e:
        raise ChildProcessError(f"a worker process died ({e}); out of memory? Run the same command again "
                                f"to continue where it stopped") from e
    finally:  # on Ctrl-C or an error, the files not started yet are dropped, not waited for
        pool.shutdown(cancel_futures=True)


_worker_predictor: Predictor | None = None  # the Predictor of this worker process


def _start_worker(engine: Engine, threads: int) -> None:
    global _worker_predictor
    _worker_predictor = engine.load(threads)


def _segment_in_worker(job: Job, out: Path, tta: bool, register: str) -> dict:
    return segment(_worker_predictor, job, out, tta, register)


def segment(predictor: Predictor, job: Job, out: Path, tta: bool = False, register: str = "auto") -> dict:
    """One file through the engine, its outputs written atomically: its summary row. A failure becomes the
    row's error; it never stops the batch."""
    row, files = run_job(predictor, job, _source(job.source).read, tta, register)
    return write_outputs(out, row, files)


def run_job(predictor: Predictor, job: Job, read: Callable[[str], bytes], tta: bool = False,
            register: str = "auto") -> tuple[dict, dict[str, bytes]]:
    """One job through the engine, its inputs read with `read(key)`: its summary row and its files by path
    relative to --out, the mask last; nothing written. A failure becomes the row's error."""
    row = _row(job, model=fingerprint(predictor, tta, register).version, status="ok")
    try:
        if job.kind in ("study", "volume"):  # a volume is a study of one file: one reader, one lesion table
            result, files = _segment_study(predictor, job, read, tta, register)
            row.update(slices=len(result.study.slices), lesions=len(result.lesions), lesion_px=result.lesion_voxels,
                       lesion_mm3="" if result.lesion_volume_mm3 is None else round(result.lesion_volume_mm3, 3))
            files[job.mask] = result.nifti_gz()
        else:
            image = read_slice(read(job.key))
            result = predictor.predict(image.pixels, image.spacing, tta)
            mm2 = result.lesion_area_mm2
            row.update(slices=1, lesions=len(result.lesions), lesion_px=result.lesion_area_px,
                       lesion_mm2="" if mm2 is None else round(mm2, 3))
            files = {job.mask: result.mask_png()}
        row["inference_ms"] = round(result.seconds * 1000, 1)
        return row, files
    except Exception as e:  # one bad file must not stop a batch of thousands: its row says what went wrong
        return _failed(row, e), {}


def write_outputs(out: Path, row: dict, files: dict[str, bytes]) -> dict:
    """A job's files, each atomically and the mask last (the mark of a finished job): its row, or the row of
    the write's failure."""
    try:
        for path, data in files.items():
            write_atomic(out / path, data)  # a reader, or a restart, sees the whole file or none of it
    except OSError as e:
        return _failed(row, e)
    return row


def _failed(row: dict, e: Exception) -> dict:
    expected = isinstance(e, (ValueError, OSError))
    return {**row, "slices": "", "lesions": "", "lesion_px": "", "lesion_mm2": "", "lesion_mm3": "",
            "inference_ms": "", "status": "error", "error": str(e) if expected else f"{type(e).__name__}: {e}"}


def job_inputs(job: Job) -> dict[str, bytes]:
    """What a job reads (a study's or volume's files, or its one slice) by key: sent with the job to a worker
    that cannot see the inputs."""
    source = _source(job.source)
    return {key: source.read(key) for key in [key for key, _ in job.members] or [job.key]}


def failed_row(job: Job, e: Exception) -> dict:
    return _failed(_row(job), e)


def _segment_study(predictor: Predictor, job: Job, read: Callable[[str], bytes], tta: bool,
                   register: str = "auto"):
    """A study or volume in one engine call: the result, and its lesion table, its SEG (DICOM input) and each
    numbered slice's mask; the caller adds the NIfTI mask, last, as the mark of a finished study."""
    study = study_from_files(((key, read(key)) for key, _ in job.members), name=job.file,
                             register=register, channel_names=job.channels or None)
    result = segment_study(predictor, study, tta)
    stem = job.mask.removesuffix("_mask.nii.gz")  # a study's <folder> or <case>, a volume's <name>
    files = {f"{stem}_lesions.csv": result.lesions_csv().encode()}
    if study.kind == "dicom":
        files[f"{stem}.seg.dcm"] = result.dicom_seg()
    if study.kind == "slices":
        file_of = dict(job.members)
        for key, mask in zip(study.files, result.mask):
            files[mask_path(file_of[key], "slice")] = encode_png(mask.astype(np.uint8) * 255)
    return result, files


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
