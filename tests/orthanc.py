"""A real PACS for the tests: Debian's Orthanc with its DICOMweb plugin, one process per test server.

`OrthancServer` owns a temporary storage/index folder and a free loopback HTTP port (the DICOM port is off);
it can be stopped and started again on the same port and storage, as a PACS that goes away mid-run and
comes back. `.ci/run` installs `orthanc orthanc-dicomweb`; without them the fixtures skip and say so.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from brainmets.app.launch import stop, wait_until_up
from brainmets.app.launch import free_port

ORTHANC = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
START_TIMEOUT_S = 30.0  # Orthanc answers in about a second; more on a busy machine


def missing() -> str | None:
    """Why Orthanc cannot run here, or None."""
    if not ORTHANC:
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb; .ci/run does it)"
    if not DICOMWEB_PLUGIN.exists():
        return f"the Orthanc DICOMweb plugin is not at {DICOMWEB_PLUGIN} (apt-get install orthanc-dicomweb)"
    return None


class OrthancServer:
    """Orthanc on 127.0.0.1:<free port> storing in `folder`; `users` {name: password} turns basic auth on;
    `settings` are added to its configuration."""

    def __init__(self, folder: Path, users: dict[str, str] | None = None, **settings):
        self.folder, self.users = Path(folder), users or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb_url = f"{self.url}/dicom-web"
        self.auth = next(iter(self.users.items()), None)  # for the tests' own REST calls
        self.process: subprocess.Popen | None = None
        self.config = self.folder / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "brainmets-test",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"),
            "HttpPort": self.port,
            "DicomServerEnabled": False,  # DICOMweb only: no second port to find and free
            "RemoteAccessAllowed": False,  # loopback only
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            **settings,
        }, indent=2))

    def start(self) -> OrthancServer:
        with (self.folder / "orthanc.log").open("a") as log:
            self.process = subprocess.Popen([ORTHANC, str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        userinfo = "{}:{}@".format(*self.auth) if self.auth else ""
        try:
            wait_until_up(f"http://{userinfo}127.0.0.1:{self.port}/system", self.process, "Orthanc", START_TIMEOUT_S)
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"{e}; log:\n{self.log()[-3000:]}") from None
        return self

    def stop(self, graceful: bool = True) -> None:
        """`graceful`: SIGTERM and wait (about 3 s, Orthanc closes its index); else SIGKILL, for throwaway servers."""
        if self.process is not None:
            stop([self.process], grace_s=10 if graceful else 0)
            self.process = None

    def log(self) -> str:
        return (self.folder / "orthanc.log").read_text(errors="replace")

    def rest(self, method: str, path: str, **kwargs) -> requests.Response:
        """Orthanc's own REST API (not DICOMweb): the tests' independent view of what the server holds."""
        response = requests.request(method, f"{self.url}{path}", auth=self.auth, timeout=30, **kwargs)
        response.raise_for_status()
        return response

    def upload(self, dicom_files: list[bytes]) -> None:
        for data in dicom_files:
            self.rest("POST", "/instances", data=data, headers={"Content-Type": "application/dicom"})

    def series(self) -> list[dict]:
        """Every series in the server with its main tags and parent study, as Orthanc indexes them."""
        return self.rest("GET", "/series", params={"expand": ""}).json()


@pytest.fixture
def start_orthanc(tmp_path_factory):
    """Start an empty Orthanc: `start_orthanc(users=None, **settings)`; each is killed after the test."""
    if reason := missing():
        pytest.skip(reason)
    servers = []

    def start(users: dict[str, str] | None = None, **settings) -> OrthancServer:
        servers.append(OrthancServer(tmp_path_factory.mktemp("orthanc"), users, **settings))
        return servers[-1].start()

    yield start
    for server in servers:
        server.stop(graceful=False)


@pytest.fixture
def orthanc(start_orthanc):
    """An empty Orthanc without authentication."""
    return start_orthanc()


@pytest.fixture
def orthanc_with_auth(start_orthanc):
    """An empty Orthanc that requires basic authentication as `radiology` / `s3cret-pass`."""
    return start_orthanc(users={"radiology": "s3cret-pass"})
