"""`spectdose serve` closed unless told (issue 19, cases 5, 12, 14 and item 4).

- Without tokens it listens on loopback only; a network address needs tokens or an explicit
  ``--no-auth``, which the banner shouts about.
- ``--config FILE`` takes every setting in FILE, tokens included (case 5: it said "authentication
  OFF" and answered GET /jobs without a token), and /docs, /redoc, /openapi.json follow the token
  (case 12: serve forced them public).
- Patient data is the service's alone (case 14): files 0640 and folders 0750 at most under the data
  directory, the SQLite job store included; started as root, serve (gateway, node and worker) runs
  as an unprivileged user that owns the data directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from service.localredis import free_port

from .support import AUTH, TOKEN, running, wait_for

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECTDOSE_") or k == "SPECTDOSE_CACHE_DIR"}
    return {**env, "PYTHONPATH": str(ROOT)}


def _serve(*args: str) -> list[str]:
    return [sys.executable, "-m", "service.cli", "serve", *args]


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def _python_reachable_by_nobody() -> bool:
    import pwd

    from service.cli import _reaches

    pw = pwd.getpwnam("nobody")
    return all(_reaches(p, pw.pw_uid, pw.pw_gid) for p in (Path(sys.executable).resolve(),
                                                           Path(sys.base_prefix) / "lib" / "_", ROOT / "_"))


@pytest.fixture()
def open_dir():
    """A data directory every user can reach (serve started as root hands it to its own user)."""
    top = Path(tempfile.mkdtemp(prefix="spectdose-i19-", dir="/tmp"))
    top.chmod(0o755)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def test_a_network_address_needs_tokens(tmp_path):
    r = subprocess.run(_serve("--host", "0.0.0.0", "--data-dir", str(tmp_path / "d"), "--http-port",
                              str(free_port())), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "authentication is off" in r.stderr and "--no-auth" in r.stderr and "Traceback" not in r.stderr


def test_no_auth_on_a_network_address_is_shouted(open_dir):
    http_port = free_port()
    cmd = _serve("--host", "0.0.0.0", "--no-auth", "--data-dir", str(open_dir / "data"), "--http-port",
                 str(http_port), "--dicom-port", str(free_port()), "--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    log = open_dir / "serve.log"
    with open(log, "w") as out, running(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT) as proc:
        wait_for(lambda: "results go to" in log.read_text() or proc.poll() is not None, 120, 0.5,
                 what="the banner")
        text = log.read_text()
        assert "!!! WARNING: API AUTHENTICATION IS OFF ON 0.0.0.0" in text and "PATIENT DATA" in text, text[-3000:]
        assert "API authentication OFF (--no-auth)" in text
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_serve_takes_every_setting_of_its_file_and_keeps_patient_data_private(open_dir, study_zip):
    data = open_dir / "data"
    http_port = free_port()
    config = open_dir / "spectdose.env"
    config.write_text(f"SPECTDOSE_API_TOKENS={TOKEN}\nSPECTDOSE_DATA_DIR={data}\nSPECTDOSE_HTTP_PORT={http_port}\n"
                      f"SPECTDOSE_DICOM_PORT={free_port()}\nSPECTDOSE_REDIS_URL=redis://127.0.0.1:{free_port()}/0\n"
                      "SPECTDOSE_STUDY_QUIET_S=2\nSPECTDOSE_EXPORT=\n")
    log = open_dir / "serve.log"
    url = f"http://127.0.0.1:{http_port}"
    with open(log, "w") as out, running(_serve("--config", str(config)), cwd=ROOT, env=_env(), stdout=out,
                                        stderr=subprocess.STDOUT) as proc, httpx.Client(base_url=url, timeout=30) as c:
        try:
            def up():
                try:
                    return c.get("/health").status_code == 200
                except httpx.HTTPError:
                    return proc.poll() is None and False
            wait_for(lambda: up() or proc.poll() is not None, 120, 0.5, what="serve to answer /health")
            assert proc.poll() is None, log.read_text()[-3000:]
            text = log.read_text()
            assert "API authentication ON (1 token(s))" in text and "authentication OFF" not in text, text[-3000:]
            # case 5: the file's token is required
            assert c.get("/jobs").status_code == 401
            assert c.get("/jobs", headers=AUTH).status_code == 200
            # case 12: the API's description follows the token too
            for path in ("/docs", "/redoc", "/openapi.json"):
                assert c.get(path).status_code == 401, path
                assert c.get(path, headers=AUTH).status_code == 200, path
            # case 14: who runs, and who can read
            wait_for(lambda: (data / "run" / "worker.pid").exists(), 60, 0.5, what="the worker")
            worker_pid = int((data / "run" / "worker.pid").read_text())
            if os.geteuid() == 0 and _python_reachable_by_nobody():
                assert "running as nobody" in text or "running as spectdose" in text, text[-3000:]
                assert _uid(proc.pid) != 0, "serve (gateway and node) dropped root"
                assert _uid(worker_pid) != 0, "the worker dropped root"
                assert data.stat().st_uid == _uid(proc.pid), "the data directory belongs to that user"
            elif os.geteuid() == 0:  # e.g. Python installed under /root: said loudly, never silently
                assert "!!! WARNING: STILL RUNNING AS ROOT: user nobody cannot reach Python" in text, text[-3000:]
            r = c.post("/studies", content=study_zip, headers={**AUTH, "Content-Type": "application/zip"},
                       params={"time_model": "physical"})
            assert r.status_code == 202, r.text[:500]
            job = wait_for(lambda: (j := c.get(r.headers["location"], headers=AUTH).json())["state"]
                           in ("done", "failed") and j, 400, 1.0, what="the job")
            assert job["state"] == "done", job
        except BaseException:
            print(log.read_text()[-6000:])
            raise
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    time.sleep(0.5)
    loose = []
    for dirpath, dirs, files in os.walk(data):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirs + files)]:
            st = os.lstat(name)
            if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o027:
                loose.append(f"{oct(stat.S_IMODE(st.st_mode))} {os.path.relpath(name, data)}")
    assert not loose, "readable by other local users:\n" + "\n".join(loose[:30])
    assert (data / "jobs.sqlite").exists() and list((data / "jobs").glob("*/output/rtdose.dcm"))


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping root needs root")
def test_dropping_root_hands_the_data_directory_to_the_user(open_dir):
    """The switch itself, in a child process (the interpreter's own reachability is checked by serve
    and may keep root on a machine whose Python lives in root's home, as the test above shows)."""
    data = open_dir / "data"
    (data / "jobs" / "j1").mkdir(parents=True)
    (data / "jobs" / "j1" / "input.dcm").write_bytes(b"patient data")
    kernels = open_dir / "kernels"
    kernels.mkdir()
    (kernels / "lu177.npy").write_bytes(b"kernel")
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "import service.cli as cli\n"
        "from service.config import Settings\n"
        "cli._reaches = lambda *a: True  # this machine's Python may live in root's home\n"
        "s = Settings(environment='development', auth_enabled=False, data_dir=Path(sys.argv[1]),\n"
        "             kernel_cache_dir=None)\n"
        "s2, user, warning = cli._drop_root(s)\n"
        "print(user, warning, os.getuid(), os.getgid(), s2.kernel_cache_dir, os.environ['HOME'])\n"
        "open(Path(sys.argv[1]) / 'jobs' / 'j1' / 'written-after.txt', 'w').write('ok')\n"
    )
    env = {**_env(), "SPECTDOSE_CACHE_DIR": str(open_dir)}  # kernels under <cache>/kernels
    r = subprocess.run([sys.executable, "-c", code, str(data)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    import pwd

    nobody = pwd.getpwnam("nobody")
    user, warning, uid, gid, kernel_dir, home = r.stdout.split()
    assert (user, warning, int(uid), int(gid)) == ("nobody", "None", nobody.pw_uid, nobody.pw_gid)
    assert Path(kernel_dir) == data / "kernel-cache" and (data / "kernel-cache" / "lu177.npy").read_bytes() == b"kernel"
    assert home == str(data)
    for p in (data, data / "jobs" / "j1" / "input.dcm", data / "jobs" / "j1" / "written-after.txt"):
        assert p.stat().st_uid == nobody.pw_uid, p
