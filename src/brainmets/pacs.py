"""Segment the studies of a PACS over DICOMweb and store each result back beside its images as a DICOM SEG.

    Pacs            one DICOMweb server: QIDO-RS to search, WADO-RS to fetch, STOW-RS to store; connection
                    failures are retried with backoff, and every failure becomes a `PacsError` naming the URL
    segment_in_pacs fetch a study's MR series, segment them with the study pipeline, store the SEG
    watch           poll for studies without our SEG of the current model version and segment each once

The address comes from the caller or $BRAINMETS_DICOMWEB_URL; credentials only from the environment
($BRAINMETS_DICOMWEB_USER and _PASSWORD for basic authentication, or $BRAINMETS_DICOMWEB_TOKEN for a bearer
token) and they never appear in a message or a log line.

Exactly once, across crashes: our SEG's SeriesInstanceUID and SOPInstanceUID are derived from the study UID
and the model version, so "is this study done?" is a question to the server (one QIDO query), and a SEG
stored again after a crash between STOW-RS and the local state write is the same instance, which the server
keeps once. The local state file (written atomically) only remembers studies that failed, so that a study
the model cannot read is not fetched again every poll, and a lock on it keeps a second watcher out.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from brainmets.inference import Predictor, file_sha256
from brainmets.study import study_from_datasets
from brainmets.study_results import StudyResult, segment_study

URL_ENV, USER_ENV, PASSWORD_ENV, TOKEN_ENV = (f"BRAINMETS_DICOMWEB_{k}" for k in ("URL", "USER", "PASSWORD", "TOKEN"))
MANUFACTURER = "brainmets"
SEG_DESCRIPTION = "brainmets lesions"  # + the model version; how `list` tells our SEGs from others'
RETRIES = 4  # tries per request: 1 + 2 + 4 s of backoff ride out a PACS restart
BACKOFF_S = 0.5
TIMEOUT_S = 60.0  # per request; a 40-slice series is a few MB
IMAGE_MODALITIES = ("MR",)  # the models were trained on MRI; SEG, SR, PR... are never inputs


class PacsError(OSError):
    """A failure to show as is: what went wrong, with which server, and where it helps what to do. An
    OSError, as a failed read of a remote store: the command line prints it as one line."""


class PacsUnreachable(PacsError):
    """No answer after every retry: the server, not the study, is the problem."""


class AccessDenied(PacsError):
    """401 or 403: the credentials, not the study, are the problem."""


def model_version(predictor: Predictor) -> str:
    """The model's name and a digest of its checkpoint(s): a retrained model is a new version."""
    digest = hashlib.sha256("".join(file_sha256(n.checkpoint) for n in predictor.networks).encode())
    return f"{predictor.name}-{digest.hexdigest()[:12]}"


def seg_uids(study_uid: str, version: str) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of our SEG for this study and model version: the same on every run."""
    return (generate_uid(entropy_srcs=[study_uid, version, "series"]),
            generate_uid(entropy_srcs=[study_uid, version, "instance"]))


def _value(item: dict, keyword: str, default=None):
    """One attribute of a DICOM JSON search result (PatientName as its alphabetic string)."""
    from pydicom.datadict import tag_for_keyword

    values = item.get(f"{tag_for_keyword(keyword):08X}", {}).get("Value") or [default]
    return values[0].get("Alphabetic", default) if isinstance(values[0], dict) else values[0]


@dataclass
class StudyRow:
    uid: str
    patient_id: str
    date: str
    description: str
    series: int  # image series, our SEGs not counted
    instances: int
    brainmets_segs: list[str] = field(default_factory=list)  # model versions with a SEG in this study

    def has_seg(self, version: str | None = None) -> bool:
        return bool(self.brainmets_segs) if version is None else version in self.brainmets_segs


class Pacs:
    """One DICOMweb service. `url` is its base (Orthanc: http://host:8042/dicom-web)."""

    def __init__(self, url: str | None = None, retries: int = RETRIES, backoff_s: float = BACKOFF_S,
                 timeout_s: float = TIMEOUT_S):
        url = url or os.environ.get(URL_ENV)
        if not url:
            raise PacsError(f"no DICOMweb address: pass --url or set ${URL_ENV} (e.g. http://localhost:8042/dicom-web)")
        self.url, self.retries, self.backoff_s = url.rstrip("/"), max(1, retries), backoff_s
        session = requests.Session()
        if token := os.environ.get(TOKEN_ENV):
            session.headers["Authorization"] = f"Bearer {token}"
        elif user := os.environ.get(USER_ENV):
            session.auth = (user, os.environ.get(PASSWORD_ENV, ""))
        self.client = DICOMwebClient(self.url, session=session, timeout=timeout_s)
        # The client retries a failed connection, a timeout and a busy answer (429, 503...) itself, waiting
        # backoff_s * 2, * 4, * 8... between tries.
        self.client.set_http_retry_params(max_attempts=self.retries, wait_exponential_multiplier=int(backoff_s * 1000))

    def _call(self, what: str, fn: Callable, *args, **kwargs):
        """`fn`, with its failures turned into PacsErrors that name the server and what was being done."""
        try:
            return fn(*args, **kwargs)
        except (requests.ConnectionError, requests.Timeout) as e:
            kind = "did not answer in time" if isinstance(e, requests.Timeout) else "is not reachable"
            waited = sum(self.backoff_s * 2 ** k for k in range(1, self.retries))
            raise PacsUnreachable(f"the PACS at {self.url} {kind} ({what}; {self.retries} tries over {waited:.1f} s)") from None
        except requests.HTTPError as e:
            status = e.response.status_code
            error = AccessDenied if status in (401, 403) else PacsUnreachable if status in (502, 503, 504) else PacsError
            raise error(self._http_message(what, e.response)) from None

    def _http_message(self, what: str, response: requests.Response) -> str:
        status = response.status_code
        if status == 401:
            return (f"the PACS at {self.url} refused the credentials (401 Unauthorized, {what}): set "
                    f"${USER_ENV} and ${PASSWORD_ENV}, or ${TOKEN_ENV}")
        if status == 403:
            return f"the PACS at {self.url} does not allow this user to {what} (403 Forbidden)"
        if status == 404:
            return f"the PACS at {self.url} has no such resource ({what}: 404 Not Found); is this its DICOMweb root?"
        return f"the PACS at {self.url} answered {status} {response.reason} ({what}): {response.text[:300]}"

    def studies(self) -> list[StudyRow]:
        """Every study, oldest first, with our SEGs found by their SeriesDescription (one query for all)."""
        found = self._call("search studies", self.client.search_for_studies, get_remaining=True, fields=[
            "PatientID", "StudyDate", "StudyDescription", "NumberOfStudyRelatedSeries",
            "NumberOfStudyRelatedInstances"])
        ours: dict[str, list[str]] = {}
        for s in self._call("search SEG series", self.client.search_for_series, get_remaining=True,
                            search_filters={"Modality": "SEG"}, fields=["SeriesDescription"]):
            description = _value(s, "SeriesDescription", "")
            if description.startswith(SEG_DESCRIPTION):
                ours.setdefault(_value(s, "StudyInstanceUID"), []).append(description[len(SEG_DESCRIPTION):].strip())
        rows = [StudyRow(uid, _value(s, "PatientID", ""), _value(s, "StudyDate", ""), _value(s, "StudyDescription", ""),
                         int(_value(s, "NumberOfStudyRelatedSeries", 0)) - len(ours.get(uid, [])),
                         int(_value(s, "NumberOfStudyRelatedInstances", 0)), ours.get(uid, []))
                for s in found if (uid := _value(s, "StudyInstanceUID"))]
        return sorted(rows, key=lambda r: (r.date, r.uid))

    def image_series(self, study_uid: str) -> list[tuple[str, str]]:
        """(SeriesInstanceUID, SeriesDescription) of the study's MR series."""
        found = self._call(f"search the series of study {study_uid}", self.client.search_for_series,
                           study_instance_uid=study_uid, get_remaining=True, fields=["SeriesDescription"])
        if not found:
            raise PacsError(f"the PACS at {self.url} has no study {study_uid}")
        series = [(_value(s, "SeriesInstanceUID"), _value(s, "SeriesDescription", "")) for s in found
                  if _value(s, "Modality") in IMAGE_MODALITIES]
        if not series:
            kinds = ", ".join(sorted({str(_value(s, "Modality", "?")) for s in found}))
            raise PacsError(f"study {study_uid} has no MR series to segment (its series: {kinds})")
        return series

    def fetch_series(self, study_uid: str, series_uid: str) -> list[Dataset]:
        return self._call(f"retrieve series {series_uid}", self.client.retrieve_series, study_uid, series_uid)

    def has_series(self, study_uid: str, series_uid: str) -> bool:
        return bool(self._call(f"search study {study_uid}", self.client.search_for_series,
                               study_instance_uid=study_uid, search_filters={"SeriesInstanceUID": series_uid}))

    def store(self, dataset: Dataset) -> None:
        """STOW-RS one instance; a refusal, whole or partial, is a PacsError with the server's reason."""
        answer = self._call(f"store {dataset.SOPInstanceUID}", self.client.store_instances, [dataset])
        if failed := list(getattr(answer, "FailedSOPSequence", [])):
            reasons = ", ".join(f"0x{int(f.FailureReason):04X}" if "FailureReason" in f else "not given" for f in failed)
            raise PacsError(f"the PACS at {self.url} refused to store the SEG of study {dataset.StudyInstanceUID} "
                            f"(STOW-RS failure reason {reasons})")


@dataclass
class Segmented:
    study_uid: str
    seg_series_uid: str
    result: StudyResult
    seconds: dict[str, float]  # fetch, segment, store


def segment_in_pacs(pacs: Pacs, predictor: Predictor, study_uid: str, version: str | None = None,
                    tta: bool = False, progress: Callable[[str], None] = lambda step: None) -> Segmented:
    """Fetch the study's MR series, segment them as one study, store the SEG beside them.

    Storing again (the same study and model version) sends the same SOP instance, which the server keeps once.
    """
    version = version or model_version(predictor)
    seconds, t0 = {}, time.perf_counter()
    progress("fetching")
    datasets = [ds for uid, _ in pacs.image_series(study_uid) for ds in pacs.fetch_series(study_uid, uid)]
    seconds["fetch"], t0 = time.perf_counter() - t0, time.perf_counter()
    progress("segmenting")
    try:
        result = segment_study(predictor, study_from_datasets(datasets, name=study_uid), tta)
        seg = dcmread(io.BytesIO(result.dicom_seg()))
    except ValueError as e:  # the study's fault: StudyError, ImageReadError, InputError
        raise PacsError(f"study {study_uid} cannot be segmented: {e}") from None
    seg.SeriesInstanceUID, seg.SOPInstanceUID = seg_uids(study_uid, version)
    seg.file_meta.MediaStorageSOPInstanceUID = seg.SOPInstanceUID
    seg.SeriesDescription = f"{SEG_DESCRIPTION} {version}"
    seconds["segment"], t0 = time.perf_counter() - t0, time.perf_counter()
    progress("storing")
    pacs.store(seg)
    seconds["store"] = time.perf_counter() - t0
    return Segmented(study_uid, seg.SeriesInstanceUID, result, seconds)


# --- watch ------------------------------------------------------------------------------------------------


class WatchState:
    """The studies that failed, per model version, in a JSON file replaced atomically (a kill -9 leaves the old
    or the new file, never half of one); held under an exclusive lock so two watchers never share it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.failed: dict[str, dict] = {}
        if self.path.exists():
            try:
                self.failed = json.loads(self.path.read_text())["failed"]
            except (ValueError, KeyError, TypeError) as e:
                raise PacsError(f"{self.path} is not a watch state file ({e}); move it away to start afresh") from None

    def failed_before(self, study_uid: str, version: str) -> bool:
        return self.failed.get(study_uid, {}).get("version") == version

    def record_failure(self, study_uid: str, version: str, error: str) -> None:
        self.failed[study_uid] = {"version": version, "error": error, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps({"failed": self.failed}, indent=1))
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


@contextmanager
def locked_state(path: Path) -> Iterator[WatchState]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_name(f".{path.name}.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the kernel even after kill -9
        except BlockingIOError:
            raise PacsError(f"another `brainmets pacs watch` is using {path}; stop it first") from None
        yield WatchState(path)


@dataclass
class WatchSummary:
    segmented: list[str] = field(default_factory=list)  # study UIDs this run stored a SEG for
    failed: list[str] = field(default_factory=list)  # studies that failed this run (kept in the state file)
    polls: int = 0


def watch(pacs: Pacs, predictor: Predictor, state_path: Path, interval_s: float = 10.0, once: bool = False,
          say: Callable[[str], None] = print, on_segmented: Callable[[Segmented], None] | None = None,
          max_polls: int | None = None) -> WatchSummary:
    """Poll the PACS and segment every study without our SEG of this model version, each once.

    A study is taken once its instance count is the same on two polls in a row (its series have stopped
    arriving); `once` takes what is there now, then returns. A study that fails is recorded and not retried
    with this model version; an unreachable PACS is waited for (with `once`, it ends the run).
    """
    version = model_version(predictor)
    summary, previous = WatchSummary(), {}
    with locked_state(state_path) as state:
        while max_polls is None or summary.polls < max_polls:
            summary.polls += 1
            try:
                studies = [r for r in pacs.studies() if not r.has_seg(version)]
                counts, previous = previous, {r.uid: r.instances for r in studies}
                for row in studies:
                    if state.failed_before(row.uid, version) or not (once or counts.get(row.uid) == row.instances):
                        continue
                    try:
                        done = segment_in_pacs(pacs, predictor, row.uid, version)
                    except (PacsUnreachable, AccessDenied):
                        raise
                    except PacsError as e:
                        state.record_failure(row.uid, version, str(e))
                        summary.failed.append(row.uid)
                        say(f"failed: {e}")
                        continue
                    summary.segmented.append(row.uid)
                    if on_segmented:
                        on_segmented(done)
            except PacsUnreachable as e:
                if once:
                    raise
                say(f"{e}; trying again in {interval_s:g} s")
            if once:
                break
            time.sleep(interval_s)
    return summary
