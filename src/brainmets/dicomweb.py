"""A DICOMweb server as brainmets uses it: QIDO-RS to search, WADO-RS to fetch, STOW-RS to store.

`Pacs` wraps `dicomweb-client`: the address comes from the caller or $BRAINMETS_DICOMWEB_URL, credentials
only from the environment ($BRAINMETS_DICOMWEB_USER and _PASSWORD for basic authentication, or
$BRAINMETS_DICOMWEB_TOKEN for a bearer token), and they never appear in a message or a log line. Requests
are retried with backoff; every failure becomes a `PacsError` naming the server and what was being done.
It loads no model: the page lists studies with it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset
from pydicom.datadict import tag_for_keyword

URL_ENV, USER_ENV, PASSWORD_ENV, TOKEN_ENV = (f"BRAINMETS_DICOMWEB_{k}" for k in ("URL", "USER", "PASSWORD", "TOKEN"))
SEG_DESCRIPTION = "brainmets lesions"  # + the model version; how `list` tells our SEGs from others'
RETRIES = 4  # tries per request: 1 + 2 + 4 s of backoff ride out a PACS restart
BACKOFF_S = 0.5
TIMEOUT_S = 60.0  # per request; a 40-slice series is a few MB
UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"  # a DICOM UID: digits and dots, at most 64 characters
IMAGE_MODALITIES = ("MR",)  # the models were trained on MRI; SEG, SR, PR... are never inputs
# STOW-RS failure reasons (DICOM PS3.18 table I.2-1 and PS3.4 annex B)
FAILURE_REASONS = {0x0110: "processing failure", 0x0122: "SOP class not supported", 0x0124: "not authorized",
                   0xA700: "out of resources", 0xA900: "data set does not match SOP class",
                   0xC000: "cannot understand", 0xC122: "transfer syntax not supported"}


class PacsError(OSError):
    """A failure to show as is: what went wrong, with which server, and where it helps what to do. An
    OSError, as a failed read of a remote store: the command line prints it as one line."""


class PacsUnreachable(PacsError):
    """No answer after every retry: the server, not the study, is the problem."""


class AccessDenied(PacsError):
    """401 or 403: the credentials, not the study, are the problem."""


class NotConfigured(PacsError):
    """No DICOMweb address was given."""


class StudyNotFound(PacsError):
    """The server holds no study with this UID."""


class UnusableStudy(PacsError):
    """The study is there but cannot be segmented: no MR series, or series the study reader refuses."""


def _value(item: dict, keyword: str, default=None):
    """One attribute of a DICOM JSON search result (PatientName as its alphabetic string)."""
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
            raise NotConfigured(f"no DICOMweb address: set ${URL_ENV} (or pass --url), e.g. http://localhost:8042/dicom-web")
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
        return f"the PACS at {self.url} answered {status} {response.reason} ({what}): {_server_reason(response.text)}"

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

    def image_series(self, study_uid: str) -> list[str]:
        """The SeriesInstanceUIDs of the study's MR series."""
        if not re.match(UID_PATTERN, study_uid) or len(study_uid) > 64:
            raise StudyNotFound(f"{study_uid!r} is not a StudyInstanceUID: expected digits and dots, at most 64 "
                                f"characters (`brainmets pacs list` shows them)")
        found = self._call(f"search the series of study {study_uid}", self.client.search_for_series,
                           study_instance_uid=study_uid, get_remaining=True)
        if not found:
            raise StudyNotFound(f"the PACS at {self.url} has no study {study_uid}")
        series = [_value(s, "SeriesInstanceUID") for s in found if _value(s, "Modality") in IMAGE_MODALITIES]
        if not series:
            kinds = ", ".join(sorted({str(_value(s, "Modality", "?")) for s in found}))
            raise UnusableStudy(f"study {study_uid} has no MR series to segment (its series: {kinds})")
        return series

    def fetch_series(self, study_uid: str, series_uid: str) -> list[Dataset]:
        return self._call(f"retrieve series {series_uid}", self.client.retrieve_series, study_uid, series_uid)

    def store(self, seg: Dataset) -> None:
        """STOW-RS our SEG; a refusal (an HTTP error, or a 200 listing it as failed) is a PacsError with the
        server's reason."""
        answer = self._call(f"store the SEG of study {seg.StudyInstanceUID}", self.client.store_instances, [seg])
        if "FailedSOPSequence" in answer and len(answer.FailedSOPSequence):
            raise PacsError(f"the PACS at {self.url} refused to store the SEG of study {seg.StudyInstanceUID}: "
                            f"{_failure_reasons(answer)}")


def _failure_reasons(answer: Dataset) -> str:
    codes = [int(item.get("FailureReason", -1)) for item in answer.FailedSOPSequence]
    return "STOW-RS failure reason " + ", ".join(
        f"0x{c:04X} ({FAILURE_REASONS.get(c, 'see the server log')})" if c >= 0 else "not given" for c in codes)


def _server_reason(text: str) -> str:
    """The server's answer on one line: a STOW-RS response's failure reasons, or the start of its text."""
    try:
        answer = Dataset.from_json(text)
        if "FailedSOPSequence" in answer and len(answer.FailedSOPSequence):
            return _failure_reasons(answer)
    except (ValueError, TypeError, KeyError, AttributeError):
        pass
    return " ".join(text.split())[:200] or "no reason given"


