"""The results page (/ui) and the PDF report route, with a finished job of the session's virtual patient.

The browser test drives Debian's headless Chromium through selenium against a real uvicorn
server: log in with the API token, open the job's page, see the dose drawn over the CT,
change the slice and see the picture change. Its screenshot is kept in the test's tmp dir
(``results_page.png``) and, when ``SPECTDOSE_TEST_ARTEFACTS`` names a folder, copied there.
"""

from __future__ import annotations

import html
import io
import json
import os
import shutil
import threading
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.jobs import JobStore
from service.localredis import free_port
from service.main import create_app
from service.storage import Storage
from worker.execute import build_manifest, dose_options, run_job

from .support import AUTH, TOKEN, make_settings, wait_for

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture()
def settings(tmp_path):
    # No broker is needed: the job below is finished before the gateway starts.
    return make_settings(tmp_path / "data")


def _finished_job(settings, phantom_files, computed_output: Path, without: tuple[str, ...] = ()) -> str:
    """A job of the virtual patient, done through the worker with the pipeline's real outputs."""
    store, storage = JobStore(settings.db_url), Storage(settings.data_dir)
    job_id = uuid.uuid4().hex
    storage.publish_input(job_id, list(phantom_files))
    store.create_job(job_id, source="rest", submitted_by="token:test", options={"method": "dvk"}, export=[],
                     queue="cpu", n_files=len(phantom_files))
    store.mark_queued(job_id)
    work = storage.new_work_dir(job_id, 1)
    summary = json.loads((computed_output / "summary.json").read_text())
    outputs = {}
    for kind, name in summary["outputs"].items():
        if kind in without:
            continue
        shutil.copy(computed_output / name, work / name)
        outputs[kind] = work / name
    storage.publish_output(job_id, work, build_manifest(outputs, dose_options(store.get(job_id).options, settings).key(), 1))
    assert run_job(store, storage, settings, job_id, worker="w1")["state"] == "done"
    store.close()
    return job_id


@pytest.fixture()
def job_id(settings, phantom_files, computed_output) -> str:
    return _finished_job(settings, phantom_files, computed_output)


def _login(client: TestClient, token: str = TOKEN):
    return client.post("/ui/login", data={"token": token, "next": "/ui/jobs"}, follow_redirects=False)


def test_pipeline_writes_the_report_and_the_route_serves_it(client, job_id, computed_output):
    summary = json.loads((computed_output / "summary.json").read_text())
    assert {"report", "report_pdf", "view"} <= set(summary["outputs"])
    r = client.get(f"/jobs/{job_id}/report", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"] == "application/pdf"
    assert r.content == (computed_output / "report.pdf").read_bytes()
    assert client.get(f"/jobs/{job_id}/report").status_code == 401
    assert client.get(f"/jobs/{uuid.uuid4().hex}/report", headers=AUTH).status_code == 404
    # A job still waiting for a worker: 409, as for the other results.
    store = client.app.state.ctx.store
    waiting = uuid.uuid4().hex
    store.create_job(waiting, source="rest", submitted_by="token:test", options={"method": "dvk"}, export=[],
                     queue="cpu", n_files=1)
    store.mark_queued(waiting)
    r = client.get(f"/jobs/{waiting}/report", headers=AUTH)
    assert r.status_code == 409 and "not ready" in r.json()["detail"]


def test_nothing_under_ui_without_a_session(client, job_id, settings):
    pages = ["/ui/jobs", f"/ui/jobs/{job_id}"]
    data = [f"/ui/jobs/{job_id}/slice/axial/10.png", f"/ui/jobs/{job_id}/dvh.png", f"/ui/jobs/{job_id}/summary.json",
            f"/ui/jobs/{job_id}/report.pdf", "/ui/static/app.js", "/ui/static/style.css"]
    for path in pages:
        r = client.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/ui/login?next="), path
    for path in data:
        assert client.get(path).status_code == 401, path
        # Neither a token in the URL nor the raw token as the cookie opens anything.
        assert client.get(f"{path}?token={TOKEN}").status_code == 401, path
        assert client.get(path, headers={"cookie": f"spectdose_session={TOKEN}"}).status_code == 401, path
    r = _login(client, "wrong-token-0123456789")
    assert r.status_code == 401 and "wrong token" in r.text and "set-cookie" not in r.headers
    r = _login(client)
    assert r.status_code == 303 and r.headers["location"] == "/ui/jobs"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie and TOKEN not in cookie
    assert client.get(data[0]).headers["content-type"] == "image/png"
    value = client.cookies["spectdose_session"]
    tampered = value[:-2] + ("AA" if not value.endswith("AA") else "BB")
    # A restart keeps the session (the key lives in the data directory); removing the token ends it.
    with TestClient(create_app(settings, sweeper=False)) as again:
        assert again.get(data[0], headers={"cookie": f"spectdose_session={tampered}"}).status_code == 401
        assert again.get(data[0], headers={"cookie": f"spectdose_session={value}"}).status_code == 200
    revoked = make_settings(settings.data_dir, api_tokens=["another-token-0123456789"])
    with TestClient(create_app(revoked, sweeper=False)) as other:
        assert other.get(data[0], headers={"cookie": f"spectdose_session={value}"}).status_code == 401
    r = client.post("/ui/logout", follow_redirects=False)
    assert r.status_code == 303 and 'spectdose_session=""' in r.headers["set-cookie"]


def test_slice_pictures_follow_the_controls_and_refuse_bad_values(client, job_id):
    from PIL import Image

    assert _login(client).status_code == 303
    base = f"/ui/jobs/{job_id}/slice"
    page = client.get(f"/ui/jobs/{job_id}").text
    config = json.loads(page.split('<script id="view-config" type="application/json">')[1].split("</script>")[0])
    k = config["start"]["axial"]
    washed = client.get(f"{base}/axial/{k}.png?opacity=0.8")
    plain = client.get(f"{base}/axial/{k}.png?opacity=0&iso=&regions=0")
    assert washed.status_code == plain.status_code == 200 and washed.content != plain.content
    image = Image.open(io.BytesIO(washed.content)).convert("RGB")
    assert image.size[0] >= 256
    assert _coloured_pixels(image) > 100 and _coloured_pixels(Image.open(io.BytesIO(plain.content)).convert("RGB")) == 0
    assert client.get(f"{base}/axial/{config['planes']['axial']}.png").status_code == 404
    assert client.get(f"{base}/oblique/0.png").status_code == 404
    assert client.get(f"{base}/axial/{k}.png?lo=5&hi=1").status_code == 422
    assert client.get(f"{base}/axial/{k}.png?iso=2,abc").status_code == 422
    assert client.get(f"{base}/axial/{k}.png?opacity=3").status_code == 422


def test_jobs_list_names_the_patient_and_the_page_says_where_the_maximum_lies(client, job_id, computed_output):
    import pydicom

    header = pydicom.dcmread(computed_output / "rtdose.dcm", stop_before_pixels=True)
    summary = json.loads((computed_output / "summary.json").read_text())
    assert _login(client).status_code == 303
    jobs = client.get("/ui/jobs").text
    name = str(header.PatientName).replace("^", " ").strip()
    date = f"{header.StudyDate[:4]}-{header.StudyDate[4:6]}-{header.StudyDate[6:8]}"
    assert "<th>patient</th>" in jobs and name and name in jobs and header.PatientID in jobs and date in jobs
    page = client.get(f"/ui/jobs/{job_id}").text
    maximum = page.split('<section id="maximum">')[1].split("</section>")[0]
    assert "Maximum absorbed dose in soft tissue (density &gt;= 0.9 g/cm3)" in maximum
    assert html.escape(summary["maxima"]["max_location_text"], quote=True) in maximum
    for plane, letters in (("axial", "APRL"), ("coronal", "SIRL"), ("sagittal", "SIAP")):
        for edge, letter in zip(("top", "bottom", "left", "right"), letters, strict=True):
            assert f'id="{plane}-orient-{edge}">{letter}</span>' in page
    # The dose under the cursor: the value of the view's voxel under the point.
    from spectdose.report import ViewVolumes

    view = ViewVolumes.load(computed_output / "view.npz")
    k = view.n_slices("axial") // 2
    r = client.get(f"/ui/jobs/{job_id}/point/axial/{k}?u=0.5&v=0.5")
    assert r.status_code == 200, r.text
    point = r.json()
    rows, cols = view.dose.shape[1:]
    assert point["unit"] == "Gy" and point["value"] == pytest.approx(float(view.dose[k, rows // 2, cols // 2]), abs=1e-4)
    assert point["ct_hu"] == int(view.ct_hu[k, rows // 2, cols // 2])
    assert client.get(f"/ui/jobs/{job_id}/point/axial/{k}?u=1.5&v=0.5").status_code == 422
    assert client.get(f"/ui/jobs/{job_id}/point/oblique/{k}?u=0.5&v=0.5").status_code == 404


def test_a_result_from_before_the_results_page_shows_its_numbers_and_says_why_no_images(
        client, settings, phantom_files, computed_output):
    old = _finished_job(settings, phantom_files, computed_output, without=("view", "report", "report_pdf"))
    assert _login(client).status_code == 303
    page = client.get(f"/ui/jobs/{old}")
    assert page.status_code == 200 and "has no view.npz" in page.text and 'id="regions"' in page.text
    r = client.get(f"/ui/jobs/{old}/slice/axial/0.png")
    assert r.status_code == 404 and "has no view" in r.json()["detail"]
    assert client.get(f"/jobs/{old}/report", headers=AUTH).status_code == 404


def _coloured_pixels(image) -> int:
    """Pixels of the dose colour wash or the coloured lines: far from grey."""
    import numpy as np

    rgb = np.asarray(image, dtype=int)
    return int(((rgb.max(axis=2) - rgb.min(axis=2)) > 80).sum())


@pytest.fixture()
def live_gateway(settings, job_id):
    """The gateway on a real port (uvicorn in a thread), for the browser."""
    import uvicorn

    app = create_app(settings, sweeper=False)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, what="uvicorn to start")
    yield f"http://127.0.0.1:{port}", job_id
    server.should_exit = True
    thread.join(10)


@pytest.fixture()
def browser(tmp_path):
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip("Debian's chromium and chromium-driver are not installed (scripts/bootstrap.sh --test-tools)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1500,1300",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    # The Debian driver, given explicitly: selenium must not look for (or download) another.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_results_page_in_headless_chromium(live_gateway, browser, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    base, job_id = live_gateway
    wait = WebDriverWait(browser, 60)
    browser.get(f"{base}/ui/jobs/{job_id}")
    assert "/ui/login" in browser.current_url, "the page must ask for the token first"
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "login-submit").click()
    wait.until(lambda d: d.current_url.endswith(f"/ui/jobs/{job_id}"))
    cookie = browser.get_cookie("spectdose_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and TOKEN not in cookie["value"]

    def loaded(plane: str) -> bool:
        return browser.execute_script(
            "const i = document.getElementById(arguments[0] + '-img');"
            "return i.complete && i.naturalWidth > 0 && i.src.length > 0;", plane)

    wait.until(lambda d: all(loaded(p) for p in ("axial", "coronal", "sagittal")))
    axial = browser.find_element(By.ID, "axial-img")
    before_src, before = axial.get_attribute("src"), axial.screenshot_as_png
    assert _coloured_pixels(Image.open(io.BytesIO(before)).convert("RGB")) > 100, "no dose drawn over the CT"
    label = browser.find_element(By.ID, "axial-label").text

    slider = browser.find_element(By.ID, "axial-slider")
    for _ in range(6):
        slider.send_keys(Keys.ARROW_LEFT)
    wait.until(lambda d: axial.get_attribute("src") != before_src and loaded("axial"))
    after = axial.screenshot_as_png
    assert browser.find_element(By.ID, "axial-label").text != label
    assert Image.open(io.BytesIO(after)).tobytes() != Image.open(io.BytesIO(before)).tobytes(), "the slice did not change"

    # The dose under the cursor and the orientation letters.
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(browser).move_to_element(axial).move_by_offset(3, 3).perform()
    wait.until(lambda d: " Gy" in d.find_element(By.ID, "cursor-value").text)
    assert "HU" in browser.find_element(By.ID, "cursor-value").text
    assert browser.find_element(By.ID, "axial-orient-left").text == "R"
    assert browser.find_element(By.ID, "sagittal-orient-right").text == "P"
    assert "soft tissue" in browser.find_element(By.ID, "maximum").text

    # The rest of the page: the DVH, the region table and the provenance.
    wait.until(lambda d: d.execute_script("const i = document.getElementById('dvh-img');"
                                          "return i.complete && i.naturalWidth > 0;"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#regions tbody tr")) >= 1
    assert "DVK" in browser.find_element(By.ID, "provenance").text
    shot = tmp_path / "results_page.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 20_000
    if os.environ.get("SPECTDOSE_TEST_ARTEFACTS"):
        folder = Path(os.environ["SPECTDOSE_TEST_ARTEFACTS"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, folder / "results_page.png")

    browser.find_element(By.CSS_SELECTOR, "form.logout button").click()
    wait.until(lambda d: "/ui/login" in d.current_url)
    browser.get(f"{base}/ui/jobs/{job_id}")
    assert "/ui/login" in browser.current_url, "logged out, the page must be closed again"


def test_the_session_cookie_is_secure_behind_https(tmp_path):
    settings = make_settings(tmp_path / "data", public_url="https://dosimetry.example.org")
    with TestClient(create_app(settings, sweeper=False)) as client:
        r = _login(client)
        assert r.status_code == 303 and "Secure" in r.headers["set-cookie"]
        assert client.get("/ui", follow_redirects=False).headers["location"] == "/ui/jobs"
