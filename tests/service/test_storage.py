"""Data directory: hostile archives are refused whole; outputs are replaced atomically."""

from __future__ import annotations

import os
import stat
import zipfile

import pytest

from service.storage import Storage, UnsafeArchive, extract_zip, safe_component


def _zip(tmp_path, members: dict[str, bytes], name="a.zip", compression=zipfile.ZIP_DEFLATED):
    path = tmp_path / name
    with zipfile.ZipFile(path, "w", compression) as zf:
        for member, data in members.items():
            zf.writestr(member, data)
    return path


@pytest.mark.parametrize("member", ["../evil.dcm", "/etc/evil.dcm", "a/../../evil.dcm", "C:/evil.dcm", "..\\evil.dcm"])
def test_traversal_names_refuse_the_whole_archive(tmp_path, member):
    archive = _zip(tmp_path, {"ok.dcm": b"x" * 10, member: b"y" * 10})
    dest = tmp_path / "out"
    with pytest.raises(UnsafeArchive, match="outside the archive") as info:
        extract_zip(archive, dest, max_bytes=10**6, max_members=100)
    assert info.value.kind == "traversal"
    assert not (tmp_path / "evil.dcm").exists() and not dest.exists(), "nothing written"


def test_zip_bomb_is_refused_before_inflating(tmp_path):
    archive = _zip(tmp_path, {"bomb.dcm": b"\0" * (50 * 2**20)})
    assert archive.stat().st_size < 2**20
    with pytest.raises(UnsafeArchive, match="zip bomb") as info:
        extract_zip(archive, tmp_path / "out", max_bytes=2**30, max_members=100)
    assert info.value.kind == "bomb"


def test_unpacked_size_limit(tmp_path):
    archive = _zip(tmp_path, {"a.dcm": os.urandom(300_000), "b.dcm": os.urandom(300_000)}, compression=zipfile.ZIP_STORED)
    with pytest.raises(UnsafeArchive, match="exceeds the limit of 0.5 MiB") as info:
        extract_zip(archive, tmp_path / "out", max_bytes=500_000, max_members=100)
    assert info.value.kind == "too_large"


def test_member_count_limit(tmp_path):
    archive = _zip(tmp_path, {f"f{i}.dcm": b"x" for i in range(11)})
    with pytest.raises(UnsafeArchive, match="limit of 10"):
        extract_zip(archive, tmp_path / "out", max_bytes=10**6, max_members=10)


def test_members_get_generated_names_and_symlinks_are_skipped(tmp_path):
    path = tmp_path / "links.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("patient DOE^JOHN/ct 1.dcm", b"data-1")
        link = zipfile.ZipInfo("link.dcm")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    files = extract_zip(path, tmp_path / "out", max_bytes=10**6, max_members=100)
    assert [f.name for f in files] == ["z000000.dcm"]
    assert files[0].read_bytes() == b"data-1"


def test_corrupt_archive(tmp_path):
    path = tmp_path / "bad.zip"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 40)
    with pytest.raises(UnsafeArchive) as info:
        extract_zip(path, tmp_path / "out", max_bytes=10**6, max_members=10)
    assert info.value.kind == "corrupt"


def test_publish_output_replaces_whole_and_marks_complete(tmp_path):
    storage = Storage(tmp_path)
    job_id = "0" * 32
    first = storage.new_work_dir(job_id, 1)
    (first / "rtdose.dcm").write_bytes(b"one")
    (first / "stale.txt").write_bytes(b"only in the first run")
    storage.publish_output(job_id, first, {"attempt": 1})
    second = storage.new_work_dir(job_id, 2)
    (second / "rtdose.dcm").write_bytes(b"two")
    assert storage.output_manifest(job_id) == {"attempt": 1}
    storage.publish_output(job_id, second, {"attempt": 2})
    out = storage.job_output(job_id)
    assert (out / "rtdose.dcm").read_bytes() == b"two"
    assert not (out / "stale.txt").exists(), "a rerun replaces the output folder, never mixes runs"
    assert storage.output_manifest(job_id) == {"attempt": 2}
    assert sorted(p.name for p in storage.job_dir(job_id).iterdir()) == ["output"]


def test_publish_input_is_all_or_nothing(tmp_path):
    storage = Storage(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    files = []
    for i in range(3):
        (src / f"{i}.dcm").write_bytes(bytes([i]) * 10)
        files.append(src / f"{i}.dcm")
    job_id = "1" * 32
    assert storage.publish_input(job_id, files) == (3, 30)
    missing = [*files, src / "gone.dcm"]
    with pytest.raises(FileNotFoundError):
        storage.publish_input("2" * 32, missing)
    assert not storage.job_input("2" * 32).exists()
    assert not any(p.name.startswith(".input") for p in storage.job_dir("2" * 32).iterdir())


def test_safe_component_keeps_uids_and_hashes_anything_else():
    assert safe_component("1.2.840.113619.2.55") == "1.2.840.113619.2.55"
    hashed = safe_component("DOE^JOHN")
    assert hashed.startswith("h") and "DOE" not in hashed
    assert safe_component("../..") != "../.."
    with pytest.raises(ValueError):
        Storage.job_dir(Storage.__new__(Storage), "../etc")
