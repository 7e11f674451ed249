"""`brainmets pacs` against a real Orthanc (tests/orthanc.py): search, fetch, segment, store, watch, failures."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from brainmets.app.launch import free_port
from brainmets.dicomweb import AccessDenied, Pacs, PacsError, PacsUnreachable
from conftest import synthetic_slice
from dicom_studies import MRStudy, mr_study, to_bytes
from orthanc import orthanc, orthanc_with_auth, start_orthanc  # noqa: F401  (fixtures)

SLICES = 10


def study(seed: int, slices: int = SLICES, **kwargs) -> MRStudy:
    """Three MR series of `slices` synthetic 64x64 slices, lesions in the middle third (conftest's generator)."""
    rng = np.random.default_rng(seed)
    images = [synthetic_slice(rng, 64, lesion=slices // 3 <= k < 2 * slices // 3)[0] for k in range(slices)]
    return mr_study(images, **{"patient_id": f"P{seed:03d}", **kwargs})


def upload(server, *studies: MRStudy) -> None:
    server.upload([to_bytes(ds) for s in studies for ds in s.datasets])


@pytest.fixture
def credentials(monkeypatch):
    """No credentials from the developer's environment leak into a test."""
    for key in ("USER", "PASSWORD", "TOKEN", "URL"):
        monkeypatch.delenv(f"BRAINMETS_DICOMWEB_{key}", raising=False)
    return monkeypatch


def test_list_shows_each_study_with_its_tags(orthanc, credentials):
    a, b = study(1), study(2)
    upload(orthanc, a, b)
    rows = {r.uid: r for r in Pacs(orthanc.dicomweb_url).studies()}
    assert set(rows) == {a.study_uid, b.study_uid}
    row = rows[a.study_uid]
    assert (row.patient_id, row.date, row.series, row.instances) == ("P001", "20260101", 3, 3 * SLICES)
    assert row.description == "MRI BRAIN WITH AND WITHOUT CONTRAST"
    assert not row.has_seg()


def test_url_from_the_environment_and_none_at_all(orthanc, credentials):
    with pytest.raises(PacsError, match="BRAINMETS_DICOMWEB_URL"):
        Pacs()
    credentials.setenv("BRAINMETS_DICOMWEB_URL", orthanc.dicomweb_url)
    assert Pacs().studies() == []


def test_wrong_credentials_are_a_clear_error_that_never_shows_them(orthanc_with_auth, credentials):
    upload(orthanc_with_auth, study(1))
    credentials.setenv("BRAINMETS_DICOMWEB_USER", "radiology")
    credentials.setenv("BRAINMETS_DICOMWEB_PASSWORD", "wrong-guess")
    with pytest.raises(AccessDenied, match="401") as denied:
        Pacs(orthanc_with_auth.dicomweb_url).studies()
    assert "wrong-guess" not in str(denied.value) and orthanc_with_auth.dicomweb_url in str(denied.value)
    credentials.setenv("BRAINMETS_DICOMWEB_PASSWORD", "s3cret-pass")
    assert len(Pacs(orthanc_with_auth.dicomweb_url).studies()) == 1


def test_credentials_never_reach_the_log(orthanc_with_auth, credentials, caplog):
    import base64
    import logging

    caplog.set_level(logging.DEBUG)
    credentials.setenv("BRAINMETS_DICOMWEB_USER", "radiology")
    credentials.setenv("BRAINMETS_DICOMWEB_PASSWORD", "s3cret-pass")
    Pacs(orthanc_with_auth.dicomweb_url).studies()
    credentials.setenv("BRAINMETS_DICOMWEB_TOKEN", "tok-123")  # a bearer token wins over basic credentials
    with pytest.raises(AccessDenied):  # Orthanc knows no tokens
        Pacs(orthanc_with_auth.dicomweb_url).studies()
    assert "GET" in caplog.text  # the client did log its requests
    for secret in ("s3cret-pass", "tok-123", base64.b64encode(b"radiology:s3cret-pass").decode()):
        assert secret not in caplog.text


def test_unreachable_pacs_is_retried_then_named(credentials):
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    with pytest.raises(PacsUnreachable, match="not reachable") as unreachable:
        Pacs(url, retries=3, backoff_s=0.01).studies()
    assert url in str(unreachable.value) and "3 tries" in str(unreachable.value)


def test_a_study_without_mr_series_is_refused_with_what_it_holds(orthanc, credentials):
    ct = study(3, slices=2, sequences=[("HEAD CT", 0, {"Modality": "CT"})])
    upload(orthanc, ct)
    with pytest.raises(PacsError, match=r"no MR series.*CT"):
        Pacs(orthanc.dicomweb_url).image_series(ct.study_uid)
    with pytest.raises(PacsError, match="no study 1.2.3"):
        Pacs(orthanc.dicomweb_url).image_series("1.2.3")


@pytest.fixture(scope="module")
def predictor(models_root):
    from brainmets.inference import Predictor

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BRAINMETS_MODELS", str(models_root))
        return Predictor.load("attention-unet", threads=1)


def our_segs(server) -> dict[str, list[dict]]:
    """Study UID -> the SEG series Orthanc holds for it, each with its instance count (Orthanc's own view)."""
    segs: dict[str, list[dict]] = {}
    for s in server.series():
        if s["MainDicomTags"].get("Modality") == "SEG":
            study_uid = server.rest("GET", f"/studies/{s['ParentStudy']}").json()["MainDicomTags"]["StudyInstanceUID"]
            segs.setdefault(study_uid, []).append(s)
    return segs


def test_segment_stores_a_seg_that_references_the_flair_series_and_reads_back_to_the_mask(orthanc, credentials,
                                                                                         predictor):
    import highdicom as hd
    from pydicom import dcmread

    from brainmets.pacs import segment_in_pacs
    from brainmets.provenance import fingerprint
    from brainmets.study_results import seg_uids

    version = fingerprint(predictor, register="auto").version

    a, b = study(1), study(2)
    upload(orthanc, a, b)
    pacs = Pacs(orthanc.dicomweb_url)
    steps = []
    done = segment_in_pacs(pacs, predictor, a.study_uid, progress=steps.append)
    assert steps == ["fetching", "segmenting", "storing"]
    assert done.result.mask.shape == (SLICES, 64, 64) and done.result.mask.any()

    segs = our_segs(orthanc)
    assert list(segs) == [a.study_uid] and len(segs[a.study_uid]) == 1  # b untouched
    series = segs[a.study_uid][0]
    assert series["MainDicomTags"]["SeriesInstanceUID"] == done.seg_series_uid == seg_uids(a.study_uid, version)[0]
    [instance] = series["Instances"]
    seg = hd.seg.Segmentation.from_dataset(dcmread(io.BytesIO(orthanc.rest("GET", f"/instances/{instance}/file").content)))
    flair = a.series["AX T2 FLAIR"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == flair[0].SeriesInstanceUID
    assert seg.StudyInstanceUID == a.study_uid and seg.SeriesDescription.startswith("brainmets lesions")
    pixels = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in flair], segment_numbers=[1],
                                               ignore_spatial_locations=True)[..., 0]
    np.testing.assert_array_equal(pixels.astype(bool), done.result.mask)

    row = {r.uid: r for r in pacs.studies()}
    assert row[a.study_uid].has_seg(version) and not row[b.study_uid].has_seg()
    assert row[a.study_uid].series == 3  # our SEG is not counted as an image series

    segment_in_pacs(pacs, predictor, a.study_uid)  # again: the same instance, kept once
    assert [len(s["Instances"]) for s in our_segs(orthanc)[a.study_uid]] == [1]


def test_watch_takes_only_studies_without_our_seg_so_a_crash_after_stow_duplicates_nothing(orthanc, credentials,
                                                                                           predictor, tmp_path):
    from brainmets.pacs import segment_in_pacs, watch

    studies = [study(seed) for seed in (1, 2, 3)]
    upload(orthanc, *studies)
    pacs = Pacs(orthanc.dicomweb_url)
    segment_in_pacs(pacs, predictor, studies[0].study_uid)  # a run killed right after its STOW-RS
    first = watch(pacs, predictor, tmp_path / "state.json", once=True, say=pytest.fail)
    assert sorted(first.segmented) == sorted(s.study_uid for s in studies[1:]) and first.failed == []
    again = watch(pacs, predictor, tmp_path / "state.json", once=True, say=pytest.fail)
    assert again.segmented == []
    segs = our_segs(orthanc)
    assert {uid: [len(s["Instances"]) for s in found] for uid, found in segs.items()} == \
        {s.study_uid: [1] for s in studies}


def test_watch_records_a_study_it_cannot_segment_and_does_not_fetch_it_again(orthanc, credentials, predictor,
                                                                             tmp_path):
    import json

    from brainmets.pacs import watch

    good, ct = study(1), study(3, slices=2, sequences=[("HEAD CT", 0, {"Modality": "CT"})])
    upload(orthanc, good, ct)
    pacs, said = Pacs(orthanc.dicomweb_url), []
    first = watch(pacs, predictor, tmp_path / "state.json", once=True, say=said.append)
    assert first.segmented == [good.study_uid] and first.failed == [ct.study_uid]
    assert len(said) == 1 and "no MR series" in said[0] and ct.study_uid in said[0]
    recorded = json.loads((tmp_path / "state.json").read_text())["failed"]
    assert list(recorded) == [ct.study_uid] and "no MR series" in recorded[ct.study_uid]["error"]
    again = watch(pacs, predictor, tmp_path / "state.json", once=True, say=pytest.fail)
    assert (again.segmented, again.failed) == ([], [])


def test_a_stow_refused_by_the_server_is_a_clear_error(start_orthanc, credentials, predictor, tmp_path):
    from brainmets.pacs import watch

    read_only = tmp_path / "read-only.lua"  # Orthanc answers 403 to what this filter refuses
    read_only.write_text("function IncomingHttpRequestFilter(method, uri, ip, username, headers)\n"
                         "  return method ~= 'POST' or uri:find('^/dicom%-web/') == nil\n"
                         "end\n")
    server = start_orthanc(LuaScripts=[str(read_only)])
    a = study(1)
    upload(server, a)
    with pytest.raises(AccessDenied, match=f"does not allow this user to store the SEG of study {a.study_uid}"):
        watch(Pacs(server.dicomweb_url), predictor, tmp_path / "state.json", once=True, say=pytest.fail)
    assert our_segs(server) == {}


def test_an_instance_the_server_cannot_understand_is_refused_with_its_reason(orthanc, credentials):
    from dicom_studies import mr_slice

    broken = mr_slice(np.zeros((8, 8)))
    del broken.SeriesInstanceUID  # Orthanc needs it to file the instance
    with pytest.raises(PacsError, match=r"answered 400 Bad Request .*failure reason 0xC000 \(cannot understand\)"):
        Pacs(orthanc.dicomweb_url).store(broken)


def test_a_second_watcher_on_the_same_state_is_refused(tmp_path):
    from brainmets.pacs import locked_state

    with locked_state(tmp_path / "state.json"):
        with pytest.raises(PacsError, match="another `brainmets pacs watch`"):
            with locked_state(tmp_path / "state.json"):
                pass


def test_watch_waits_for_a_study_to_stop_growing(orthanc, credentials, predictor, tmp_path):
    from brainmets.pacs import watch

    upload(orthanc, study(1))
    pacs = Pacs(orthanc.dicomweb_url)
    assert watch(pacs, predictor, tmp_path / "state.json", interval_s=0, max_polls=1).segmented == []
    assert len(watch(pacs, predictor, tmp_path / "state.json", interval_s=0, max_polls=2).segmented) == 1


# --- the command line, in-process and as a real process --------------------------------------------------


def pacs_cli(*args: str, code: int = 0):
    from typer.testing import CliRunner

    from brainmets.cli import app

    result = CliRunner().invoke(app, ["pacs", *map(str, args)], env={"COLUMNS": "200"})
    assert result.exit_code == code, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output
    return result


def test_cli_list_and_segment_print_tables(orthanc, credentials, models_root):
    a = study(1)
    upload(orthanc, a)
    credentials.setenv("BRAINMETS_MODELS", str(models_root))
    credentials.setenv("BRAINMETS_DICOMWEB_URL", orthanc.dicomweb_url)
    listed = pacs_cli("list").stdout
    assert a.study_uid in listed and "P001" in listed and "1 studies" in listed
    segmented = pacs_cli("segment", a.study_uid, "--model", "attention-unet")
    [seg] = our_segs(orthanc)[a.study_uid]
    assert f"SEG stored as series {seg['MainDicomTags']['SeriesInstanceUID']}" in segmented.stderr
    assert "volume mm³" in segmented.stdout  # the lesion table: the tiny model finds lesions in these slices
    assert "attention-unet-" in pacs_cli("list").stdout  # the SEG's model version


def test_watch_after_a_retune_segments_each_study_again_exactly_once(orthanc, credentials, models_root, tmp_path):
    """`make retune` rewrites the ensemble's post-processing (`brainmets select`): a new model version, whose
    SEG every study gets once, beside the old version's; the same version never segments a study twice."""
    import dataclasses
    import json
    import shutil

    from brainmets.inference import Predictor

    studies = [study(seed, slices=4) for seed in (1, 2, 3)]
    upload(orthanc, *studies)
    shutil.copytree(models_root, tmp_path / "models")
    credentials.setenv("BRAINMETS_MODELS", str(tmp_path / "models"))
    watch = ("watch", "--url", orthanc.dicomweb_url, "--model", "ensemble", "--once", "--state", tmp_path / "state.json")
    assert "3 studies segmented, 0 failed" in pacs_cli(*watch).stderr
    assert "0 studies segmented, 0 failed" in pacs_cli(*watch).stderr
    post = dataclasses.asdict(Predictor.load("ensemble", threads=1).post)
    (tmp_path / "models" / "ensemble").mkdir(exist_ok=True)
    (tmp_path / "models" / "ensemble" / "postprocess.json").write_text(json.dumps({**post, "threshold": 0.3}))
    assert "3 studies segmented, 0 failed" in pacs_cli(*watch).stderr
    assert "0 studies segmented, 0 failed" in pacs_cli(*watch).stderr
    assert seg_counts(orthanc) == {s.study_uid: [1, 1] for s in studies}
    versions = {tuple(sorted(r.brainmets_segs)) for r in Pacs(orthanc.dicomweb_url).studies()}
    assert len(versions) == 1 and len(versions.pop()) == 2


def test_cli_wrong_credentials_is_one_line_without_the_password(orthanc_with_auth, credentials):
    credentials.setenv("BRAINMETS_DICOMWEB_USER", "radiology")
    credentials.setenv("BRAINMETS_DICOMWEB_PASSWORD", "not-the-pass")
    result = pacs_cli("list", "--url", orthanc_with_auth.dicomweb_url, code=2)
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "401" in result.stderr and "not-the-pass" not in result.output


def test_cli_segment_of_a_study_without_mr_names_it(orthanc, credentials, models_root):
    ct = study(3, slices=2, sequences=[("HEAD CT", 0, {"Modality": "CT"})])
    upload(orthanc, ct)
    credentials.setenv("BRAINMETS_MODELS", str(models_root))
    result = pacs_cli("segment", ct.study_uid, "--url", orthanc.dicomweb_url, "--model", "attention-unet", code=2)
    assert "no MR series" in result.stderr and ct.study_uid in result.stderr


def watch_process(server, models_root, state, *args: str) -> subprocess.Popen:
    env = {**os.environ, "BRAINMETS_MODELS": str(models_root), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "brainmets", "pacs", "watch", "--url", server.dicomweb_url,
                             "--model", "attention-unet", "--state", str(state), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, timeout_s: float = 60.0, every_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every_s)
    return value


def seg_counts(server) -> dict[str, list[int]]:
    return {uid: [len(s["Instances"]) for s in found] for uid, found in our_segs(server).items()}


@pytest.mark.slow
def test_watch_killed_mid_run_then_restarted_leaves_exactly_one_seg_per_study(orthanc, credentials, models_root,
                                                                              tmp_path):
    studies = [study(seed, slices=4) for seed in range(1, 21)]  # the target: 20 studies
    upload(orthanc, *studies)
    watcher = watch_process(orthanc, models_root, tmp_path / "state.json", "--once")
    done_before_kill = wait_for(lambda: len(our_segs(orthanc)))
    os.kill(watcher.pid, signal.SIGKILL)
    watcher.wait()
    assert done_before_kill < len(studies), "the watcher finished before the kill: nothing was interrupted"
    restarted = watch_process(orthanc, models_root, tmp_path / "state.json", "--once")
    output = restarted.communicate(timeout=120)[0]
    assert restarted.returncode == 0, output
    assert seg_counts(orthanc) == {s.study_uid: [1] for s in studies}
    assert "studies segmented, 0 failed" in output


@pytest.mark.slow
def test_watch_rides_out_orthanc_stopping_mid_run(orthanc, credentials, models_root, tmp_path):
    studies = [study(seed) for seed in range(1, 4)]
    upload(orthanc, *studies)
    watcher = watch_process(orthanc, models_root, tmp_path / "state.json", "--interval", "0.3")
    try:
        wait_for(lambda: len(our_segs(orthanc)), every_s=0.01)
        orthanc.stop(graceful=False)
        time.sleep(8)  # longer than one request's retries: the watcher says so and keeps polling
        assert watcher.poll() is None
        orthanc.start()
        wait_for(lambda: seg_counts(orthanc) == {s.study_uid: [1] for s in studies}, every_s=0.2)
    finally:
        watcher.terminate()
        output = watcher.communicate(timeout=30)[0]
    assert f"the PACS at {orthanc.dicomweb_url} is not reachable" in output and "Traceback" not in output


@pytest.mark.slow
def test_cli_segment_with_orthanc_stopped_names_the_url(orthanc, credentials, models_root):
    a = study(1)
    upload(orthanc, a)
    orthanc.stop(graceful=False)
    credentials.setenv("BRAINMETS_MODELS", str(models_root))
    result = pacs_cli("segment", a.study_uid, "--url", orthanc.dicomweb_url, "--model", "attention-unet", code=2)
    assert f"the PACS at {orthanc.dicomweb_url} is not reachable" in result.stderr and "4 tries" in result.stderr


# --- the API's /v1/pacs, in-process ----------------------------------------------------------------------


@pytest.fixture
def pacs_api(orthanc, models_root, credentials):
    from conftest import api_client

    yield from api_client(models_root, dicomweb_url=orthanc.dicomweb_url, preload=False)


def test_api_lists_and_segments_a_study_and_the_seg_is_in_the_pacs(pacs_api, orthanc):
    a, b = study(1), study(2)
    upload(orthanc, a, b)
    listed = pacs_api.get("/v1/pacs/studies").json()
    assert listed["url"] == orthanc.dicomweb_url
    assert [(s["uid"], s["brainmets_segs"]) for s in listed["studies"]] == sorted(
        [(a.study_uid, []), (b.study_uid, [])])
    answer = pacs_api.post(f"/v1/pacs/studies/{a.study_uid}/segment", params={"model": "attention-unet"}).json()
    assert answer["study_uid"] == a.study_uid and answer["slices"] == SLICES and answer["model"] == "attention-unet"
    assert answer["stored_at"] == f"{orthanc.dicomweb_url}/studies/{a.study_uid}/series/{answer['seg_series_uid']}"
    assert sum(answer["slice_lesion_px"]) == answer["lesion_voxels"] > 0
    assert [s["MainDicomTags"]["SeriesInstanceUID"] for s in our_segs(orthanc)[a.study_uid]] == [answer["seg_series_uid"]]
    segs = {s["uid"]: s["brainmets_segs"] for s in pacs_api.get("/v1/pacs/studies").json()["studies"]}
    assert segs == {a.study_uid: [answer["model_version"]], b.study_uid: []}


@pytest.mark.parametrize("uid, status, detail", [
    ("1.2.3.4", 404, "has no study 1.2.3.4"),
    ("1.2.x", 422, "study_uid"),
])
def test_api_pacs_errors(pacs_api, uid, status, detail):
    response = pacs_api.post(f"/v1/pacs/studies/{uid}/segment")
    assert response.status_code == status and detail in response.json()["detail"]


def test_api_study_without_mr_is_422(pacs_api, orthanc):
    ct = study(3, slices=2, sequences=[("HEAD CT", 0, {"Modality": "CT"})])
    upload(orthanc, ct)
    response = pacs_api.post(f"/v1/pacs/studies/{ct.study_uid}/segment")
    assert response.status_code == 422 and "no MR series" in response.json()["detail"]


def test_api_without_a_pacs_says_how_to_configure_one(models_root, credentials):
    from conftest import api_client

    for client in api_client(models_root, preload=False):  # one client, closed when the loop ends
        response = client.get("/v1/pacs/studies")
    assert response.status_code == 404 and "BRAINMETS_DICOMWEB_URL" in response.json()["detail"]


@pytest.mark.slow
def test_api_health_answers_while_a_pacs_job_waits_on_a_dead_pacs(pacs_api, orthanc):
    from concurrent.futures import ThreadPoolExecutor

    a = study(1)
    upload(orthanc, a)
    orthanc.stop(graceful=False)
    with ThreadPoolExecutor(1) as executor:
        job = executor.submit(pacs_api.post, f"/v1/pacs/studies/{a.study_uid}/segment")
        time.sleep(0.5)
        for _ in range(3):
            t0 = time.perf_counter()
            assert pacs_api.get("/health").status_code == 200 and time.perf_counter() - t0 < 1.0
            assert not job.done()
        response = job.result(timeout=60)
    assert response.status_code == 502 and f"the PACS at {orthanc.dicomweb_url} is not reachable" in response.json()["detail"]


# --- the page's PACS view, against the real API and Orthanc ----------------------------------------------


@pytest.fixture
def pacs_api_server(orthanc, models_root, tmp_path):
    from brainmets.app.launch import serve_command, stop, wait_until_up

    port = free_port()
    env = {**os.environ, "BRAINMETS_MODELS": str(models_root), "BRAINMETS_THREADS": "1",
           "BRAINMETS_DICOMWEB_URL": orthanc.dicomweb_url}
    with (tmp_path / "api.log").open("w") as log:
        process = subprocess.Popen(serve_command("127.0.0.1", port), env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", process, "API", timeout_s=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop([process])


@pytest.mark.slow
def test_page_lists_the_pacs_studies_and_segments_one_on_click(pacs_api_server, orthanc, tmp_path, monkeypatch):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    import brainmets.app

    a, b = study(1), study(2)
    upload(orthanc, a, b)
    monkeypatch.setenv("BRAINMETS_API", pacs_api_server)
    monkeypatch.setenv("BRAINMETS_DOCS", str(tmp_path))
    st.cache_data.clear()
    page = AppTest.from_file(str(Path(brainmets.app.__file__).with_name("page.py")), default_timeout=60).run()
    view = next(tab for tab in page.tabs if tab.label == "PACS")
    assert f"PACS `{orthanc.dicomweb_url}`: 2 studies" in view.caption[0].value
    assert sorted(view.dataframe[0].value["study UID"]) == sorted([a.study_uid, b.study_uid])
    page.selectbox(key="pacs-study").set_value(b.study_uid)
    page.selectbox(key="pacs-model").set_value("Attention U-Net")
    page.button(key="pacs-segment").click().run()
    assert not page.exception and not page.error, [e.value for e in [*page.exception, *page.error]]
    [stored] = our_segs(orthanc)[b.study_uid]
    seg_uid = stored["MainDicomTags"]["SeriesInstanceUID"]
    assert f"as series {seg_uid} of study {b.study_uid}" in page.success[0].value
    assert a.study_uid not in our_segs(orthanc)
    assert [m.label for m in next(tab for tab in page.tabs if tab.label == "PACS").metric] == \
        ["Lesions", "Lesion volume", "Time"]
