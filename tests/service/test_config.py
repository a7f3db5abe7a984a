"""Settings: unsafe values are refused outside development; lists come comma-separated."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.config import DicomPeer, Settings, load_settings

from .support import TOKEN


def test_tokens_are_comma_separated_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECTDOSE_API_TOKENS", f"{TOKEN}, another-token-fedcba9876543210 ,")
    monkeypatch.setenv("SPECTDOSE_DATA_DIR", str(tmp_path))
    s = load_settings()
    assert s.api_tokens == [TOKEN, "another-token-fedcba9876543210"]
    assert s.auth_enabled and s.environment == "production"


def test_settings_file_is_read(tmp_path, monkeypatch):
    monkeypatch.delenv("SPECTDOSE_API_TOKENS", raising=False)
    env = tmp_path / "spectdose.env"
    env.write_text(f"SPECTDOSE_API_TOKENS={TOKEN}\nSPECTDOSE_AE_TITLE=DOSIMETRY\nSPECTDOSE_PEERS=PACS@10.0.0.5:104\n")
    s = load_settings(env)
    assert s.ae_title == "DOSIMETRY"
    assert s.peer_map["PACS"] == DicomPeer("PACS", "10.0.0.5", 104)


def test_production_refuses_no_tokens_and_disabled_auth(monkeypatch):
    monkeypatch.delenv("SPECTDOSE_API_TOKENS", raising=False)
    with pytest.raises(ValidationError, match="API_TOKENS is empty"):
        Settings(environment="production", api_tokens=[])
    with pytest.raises(ValidationError, match="only allowed with environment=development"):
        Settings(environment="production", api_tokens=[TOKEN], auth_enabled=False)
    with pytest.raises(ValidationError, match="at least 16 characters"):
        Settings(environment="production", api_tokens=["short"])


def test_development_without_auth_only_on_loopback():
    assert not Settings(environment="development", auth_enabled=False, http_host="127.0.0.1").auth_enabled
    with pytest.raises(ValidationError, match="loopback"):
        Settings(environment="development", auth_enabled=False, http_host="0.0.0.0")


def test_visibility_timeout_must_exceed_the_longest_job():
    with pytest.raises(ValidationError, match="visibility_timeout_s"):
        Settings(api_tokens=[TOKEN], task_soft_time_limit_s=3000, task_time_limit_s=3600, visibility_timeout_s=3600)


@pytest.mark.parametrize("bad", ["PACS@host", "@host:104", "PACS@host:0", "TOO_LONG_AE_TITLE_X@h:104", "P\\X@h:1"])
def test_bad_peers_are_refused(bad):
    with pytest.raises(ValidationError):
        Settings(api_tokens=[TOKEN], export=[bad])


def test_peer_round_trip_and_ipv6():
    peer = DicomPeer.parse("ORTHANC@[::1]:4242")
    assert (peer.host, peer.port) == ("::1", 4242)
    assert DicomPeer.parse(str(peer)) == peer


def test_child_process_environment_round_trips(tmp_path, monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("SPECTDOSE_"):
            monkeypatch.delenv(key)
    s = Settings(api_tokens=[TOKEN], data_dir=tmp_path, export=["sender", "PACS@10.1.2.3:11112"], study_quiet_s=2.5)
    for key, value in s.to_env().items():
        monkeypatch.setenv(key, value)
    again = load_settings()
    assert again.model_dump() == s.model_dump()


def test_no_auth_beyond_loopback_only_when_asked_and_docs_follow_the_token():
    with pytest.raises(ValidationError, match="--no-auth"):
        Settings(environment="development", auth_enabled=False, http_host="0.0.0.0")
    s = Settings(environment="development", auth_enabled=False, http_host="0.0.0.0", no_auth_beyond_loopback=True)
    assert not s.auth_enabled and s.checks_host and s.docs_mode == "public"
    assert Settings(environment="development", api_tokens=[TOKEN]).docs_mode == "token", "serve with tokens"
    assert Settings(environment="development", api_tokens=[TOKEN], api_docs="public").docs_mode == "public"


def test_allowed_hosts():
    s = Settings(environment="development", auth_enabled=False, allowed_hosts="dosimetry.example.org, .ward.example",
                 public_url="https://pacs-gw.example.net/dose")
    for host in ("localhost", "127.0.0.1", "::1", "[::1]", "10.1.2.3", "dosimetry.example.org", "DOSIMETRY.example.org.",
                 "a.ward.example", "ward.example", "pacs-gw.example.net"):
        assert s.host_allowed(host), host
    for host in ("", "evil.example", "dosimetry.example.org.evil.example", "xward.example", "localhost.evil.example"):
        assert not s.host_allowed(host), host
    assert Settings(api_tokens=[TOKEN]).checks_host is False, "tokens guard the API; Host checked once listed"
    assert Settings(api_tokens=[TOKEN], allowed_hosts=["x.example"]).checks_host is True


def test_serve_starts_its_worker_with_the_configured_concurrency(monkeypatch, tmp_path):
    """Two jobs at once on a 2-core host (issue 20's throughput) is a setting, and serve's worker obeys it."""
    from service.cli import WorkerProcess, build_parser

    monkeypatch.setenv("SPECTDOSE_WORKER_CONCURRENCY", "2")
    settings = Settings(environment="development", auth_enabled=False, data_dir=tmp_path)
    assert settings.to_env()["SPECTDOSE_WORKER_CONCURRENCY"] == "2"
    command = WorkerProcess(settings, "serve@host").command()
    args = build_parser().parse_args(command[command.index("worker"):])
    assert args.command == "worker" and args.concurrency == 2 and args.hostname == "serve@host"
    with pytest.raises(ValidationError):
        Settings(environment="development", auth_enabled=False, worker_concurrency=0)
