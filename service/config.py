"""Service settings from SPECTDOSE_* environment variables or a dotenv file.

One :class:`Settings` object configures the gateway, the DICOM node and the worker, so a
deployment sets each value once. Validators refuse unsafe values outside development
(no API tokens, authentication off, a visibility timeout shorter than the longest job).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Settings", "DicomPeer", "load_settings", "SENDER"]

SENDER = "sender"  # export destination meaning "the AE that sent the study"
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2 AE: 16 chars, no backslash
_MIN_TOKEN_CHARS = 16
_WEAK_TOKENS = {"changeme", "secret", "token", "password", "test", "dev"}


@dataclasses.dataclass(frozen=True)
class DicomPeer:
    """A DICOM application entity we can connect to: ``AET@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> DicomPeer:
        """Parse ``AET@HOST:PORT`` (host may be a name, IPv4 or [IPv6])."""
        m = re.fullmatch(r"(?P<aet>[^@]{1,16})@(?P<host>\[[0-9A-Fa-f:.]+\]|[^:@\s]+):(?P<port>\d{1,5})", text.strip())
        if not m:
            raise ValueError(f"not a DICOM peer of the form AET@HOST:PORT: {text!r}")
        aet = m["aet"].strip()
        if not _AE_TITLE.match(aet):
            raise ValueError(f"invalid AE title {aet!r} (1-16 printable characters, no backslash)")
        port = int(m["port"])
        if not 0 < port < 65536:
            raise ValueError(f"port out of range in {text!r}")
        return cls(aet, m["host"].strip("[]"), port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


def _split_list(value):
    """Comma-separated text (how operators write lists in env vars) or a list."""
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return list(value)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Everything the service reads from its environment; see docs/service.md for each."""

    model_config = SettingsConfigDict(env_prefix="SPECTDOSE_", extra="ignore", validate_default=True)

    environment: Literal["production", "development"] = "production"
    data_dir: Path = Path("/var/lib/spectdose")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite under data_dir")
    redis_url: str = "redis://127.0.0.1:6379/0"

    # gateway
    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, gt=0, lt=65536)
    api_tokens: CommaList = Field(default_factory=list, description="accepted Bearer tokens")
    auth_enabled: bool = True
    max_upload_mb: float = Field(2048, gt=0, description="largest request body accepted")
    max_unzipped_mb: float = Field(8192, gt=0, description="largest total size unpacked from uploads")
    max_upload_files: int = Field(20000, gt=0)
    public_url: str | None = Field(None, description="base URL put in Location headers (default: relative)")
    # Host names (Host header, Origin of a posting page) the gateway answers to: a DNS-rebinding page
    # or a cross-site form must not reach an open (no token) gateway on loopback. "*" = any.
    allowed_hosts: CommaList = Field(
        default_factory=list, description="host names the gateway answers to besides localhost, IP addresses, the "
        "listen address and PUBLIC_URL's host ('.example.org' = a domain and its subdomains, '*' = any); checked "
        "whenever authentication is off, and always once set",
    )
    # Only `serve --no-auth`: the operator's explicit choice of an open gateway beyond loopback.
    no_auth_beyond_loopback: bool = Field(
        False, description="authentication off on a non-loopback address (serve --no-auth; development only)")

    # DICOM node
    ae_title: str = "SPECTDOSE"
    dicom_host: str = "127.0.0.1"
    dicom_port: int = Field(11112, gt=0, lt=65536)
    allowed_calling_aets: CommaList = Field(
        default_factory=list,
        description="calling AEs accepted besides the PEERS: AET or AET@HOST; '*' = any (empty: peers only)",
    )
    check_peer_host: bool = Field(False, description="a peer's associations must come from its configured host")
    peers: CommaList = Field(default_factory=list, description="known AEs as AET@HOST:PORT (resolve 'sender')")
    export: CommaList = Field(default_factory=lambda: [SENDER], description="'sender' and/or AET@HOST:PORT")
    stow_url: str | None = Field(None, description="optional DICOMweb STOW-RS endpoint for results")
    stow_token: str | None = None
    study_quiet_s: float = Field(30.0, gt=0, description="a study is complete after this long without instances")
    min_free_disk_mb: float = Field(1024, ge=0, description="refuse associations below this free space")
    dicom_network_timeout_s: float = Field(60.0, gt=0)
    disk_retry_after_s: int = Field(300, gt=0, description="Retry-After of a 507 when the disk is (nearly) full")

    # client faults and exposure (gateway)
    body_timeout_s: float = Field(60.0, gt=0, description="an upload that sends nothing for this long is dropped")
    upload_deadline_s: float = Field(3600.0, gt=0, description="a request body must arrive whole within this")
    upload_min_bytes_per_s: float = Field(
        10240.0, ge=0, description="a request body slower than this on average (measured once it is older than "
        "BODY_TIMEOUT_S) is dropped; 0 = no minimum")
    auth_max_failures: int = Field(10, gt=0, description="failed logins per client and window before 429")
    auth_failure_window_s: float = Field(300.0, gt=0)
    api_docs: Literal["public", "token", "off"] | None = Field(
        None, description="/docs and /openapi.json: public, behind a token, or off (default: public in "
        "development, token in production)"
    )
    tls_certfile: Path | None = Field(None, description="serve HTTPS (uvicorn's TLS) with this certificate")
    tls_keyfile: Path | None = None

    # retention of job folders (inputs hold PHI); 0 = keep
    retain_inputs_days: float = Field(7.0, ge=0, description="input DICOM of finished jobs removed after this")
    retain_jobs_days: float = Field(0.0, ge=0, description="whole folders of finished jobs removed after this")
    retain_max_jobs: int = Field(0, ge=0, description="at most this many finished job folders (oldest go first)")
    retain_max_gb: float = Field(0.0, ge=0, description="finished job folders above this total: oldest go first")
    retention_interval_s: float = Field(3600.0, gt=0)

    # queue and worker
    job_queue: Literal["cpu", "gpu"] = "cpu"
    # Jobs at once in one worker process (Celery prefork children). A clinical DVK job holds
    # ~1.8 GB and a CNN job ~2.4 GB (docs/performance.md), so two fit any host that runs one.
    worker_concurrency: int = Field(1, ge=1, le=64, description="jobs computed at once by serve's worker")
    task_soft_time_limit_s: int = Field(3600, gt=0)
    task_time_limit_s: int = Field(3900, gt=0)
    visibility_timeout_s: int = Field(4 * 3600, gt=0, description="Redis redelivers unacked tasks after this")
    max_retries: int = Field(3, ge=0, description="transient failures retried this many times")
    retry_backoff_s: float = Field(20.0, ge=0, description="first retry delay, doubled each retry")
    heartbeat_s: float = Field(10.0, gt=0)
    lease_s: float = Field(120.0, gt=0, description="a running job without heartbeat this long is requeued")
    max_attempts: int = Field(5, gt=0, description="claims of one job (incl. lost workers) before it fails")
    sweep_interval_s: float = Field(10.0, gt=0)
    reconcile_interval_s: float = Field(
        30.0, gt=0, description="queued jobs without a broker message are republished this often (and at start)"
    )
    export_retries: int = Field(3, ge=1)
    export_backoff_s: float = Field(2.0, ge=0)
    export_timeout_s: float = Field(30.0, gt=0, description="C-STORE (DIMSE) and STOW-RS answers")
    # A destination that accepts TCP and never answers must not hold the worker that computes doses:
    # connecting and association negotiation get short limits, and a failed association is retried by
    # the task later (the worker computes other jobs meanwhile), not in the task.
    export_connect_timeout_s: float = Field(5.0, gt=0, description="TCP connect to an export destination")
    export_associate_timeout_s: float = Field(10.0, gt=0, description="A-ASSOCIATE answer of an export destination")

    # dose options shared by every job
    default_method: Literal["auto", "dvk", "cnn", "dvk-rr"] = Field(
        "dvk", description="engine for jobs that name none: dvk like the CLI (the shipped CNN does not yet beat "
        "DVK in every tissue, models/dblurdosenet.md); auto (an explicit choice): the CNN once weights are installed"
    )
    # A site that images every cycle at several time points asks for "none": each study gives its
    # dose-rate map, the absorbed dose comes from the cycle (no single-time-point dose to misread).
    default_time_model: Literal["hanscheid", "physical", "none"] = Field(
        "hanscheid", description="time model for jobs that name none: hanscheid (single time point, 48-168 h), "
        "physical, or none (dose-rate maps only; cycles give the absorbed dose)"
    )
    # The calibrated 1-sigma map of a CNN dose rate needs the deep ensemble beside the weights
    # (<weights stem>_ensemble.pt); DVK has none, so a DVK job never gets one by default.
    default_uncertainty: Literal["auto", "on", "off"] = Field(
        "auto", description="uncertainty map for jobs that do not ask: auto = for CNN jobs once the ensemble "
        "beside the weights is installed; on = every CNN job (a missing ensemble fails the job); off = never"
    )
    # Assumptions the site allows (spectdose.pipeline.ASSUMPTIONS; each refused by default):
    # for every job, or per calling AE as AET:assumption. Never on unless configured here.
    accept: CommaList = Field(default_factory=list, description="assumptions allowed for every job")
    accept_by_ae: CommaList = Field(default_factory=list, description="AET:assumption, for DICOM jobs of that AE")
    kernel_cache_dir: Path | None = None
    calibrations_file: Path | None = None
    sensitivity_cps_per_mbq: float | None = Field(None, gt=0)
    device: str | None = None

    log_level: str = "INFO"
    # Who `serve` runs as when started as root (it drops root before anything else starts).
    run_as_user: str | None = Field(
        None, description="user `serve` switches to when started as root (default: spectdose if it exists, else "
        "nobody); the data directory is given to it")

    @property
    def resolved_method(self) -> Literal["dvk", "cnn", "dvk-rr"]:
        """The engine of a job that names none: "auto" looks at the installed weights."""
        if self.default_method != "auto":
            return self.default_method
        from spectdose.paths import installed_models

        weights_installed, _ = installed_models()
        return "cnn" if weights_installed else "dvk"

    def resolved_uncertainty(self, method: str) -> bool:
        """Whether a job of ``method`` that does not ask gets the uncertainty map.

        Only a CNN job can (the ensemble is the CNN's): "auto" asks when the ensemble is
        installed, the same look at the files as the "auto" engine; "on" always asks, so a
        missing ensemble fails the job with the core's message instead of silently giving none.
        """
        if method != "cnn" or self.default_uncertainty == "off":
            return False
        if self.default_uncertainty == "on":
            return True
        from spectdose.paths import installed_models

        _, ensemble_installed = installed_models()
        return ensemble_installed

    def accepted_assumptions(self, calling_aet: str | None = None) -> list[str]:
        """The site's accepted assumptions for a job (global, plus the calling AE's own)."""
        names = set(self.accept)
        for entry in self.accept_by_ae:
            aet, _, name = entry.rpartition(":")
            if calling_aet is not None and aet.strip() == calling_aet:
                names.add(name.strip())
        return sorted(names)

    @field_validator("accept", "accept_by_ae")
    @classmethod
    def _check_assumptions(cls, value: list[str], info) -> list[str]:
        from spectdose.pipeline import ASSUMPTIONS

        for entry in value:
            aet, sep, name = entry.rpartition(":")
            if info.field_name == "accept_by_ae" and not (sep and _AE_TITLE.match(aet.strip())):
                raise ValueError(f"accept_by_ae entries are AET:assumption, got {entry!r}")
            if (name if info.field_name == "accept_by_ae" else entry).strip() not in ASSUMPTIONS:
                raise ValueError(f"unknown assumption in {entry!r}; known: {sorted(ASSUMPTIONS)}")
        return value

    @field_validator("api_tokens", "allowed_calling_aets", "peers", "export", "accept", "accept_by_ae", "allowed_hosts",
                     mode="before")
    @classmethod
    def _comma_list(cls, value):
        return _split_list(value)

    @field_validator("ae_title")
    @classmethod
    def _check_ae_title(cls, value: str) -> str:
        if not _AE_TITLE.match(value) or not value.strip():
            raise ValueError(f"invalid AE title {value!r} (1-16 printable characters, no backslash)")
        return value.strip()

    @field_validator("allowed_calling_aets")
    @classmethod
    def _check_allowed(cls, value: list[str]) -> list[str]:
        for item in value:
            aet = item.split("@", 1)[0].strip()
            if item != "*" and not _AE_TITLE.match(aet):
                raise ValueError(f"allowed calling AE {item!r} is not AET, AET@HOST or '*'")
        return value

    @field_validator("peers")
    @classmethod
    def _check_peers(cls, value: list[str]) -> list[str]:
        for item in value:
            DicomPeer.parse(item)
        return value

    @field_validator("export")
    @classmethod
    def _check_export(cls, value: list[str]) -> list[str]:
        for item in value:
            if item.lower() != SENDER:
                DicomPeer.parse(item)
        return [SENDER if v.lower() == SENDER else v for v in value]

    @field_validator("redis_url")
    @classmethod
    def _check_redis(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("redis", "rediss", "redis+socket"):
            raise ValueError(f"redis_url must be redis://, rediss:// or redis+socket://, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if not self.task_soft_time_limit_s < self.task_time_limit_s:
            raise ValueError("task_soft_time_limit_s must be below task_time_limit_s")
        if not self.visibility_timeout_s > self.task_time_limit_s:
            raise ValueError(
                f"visibility_timeout_s ({self.visibility_timeout_s}) must exceed task_time_limit_s "
                f"({self.task_time_limit_s}), or Redis redelivers jobs that are still running"
            )
        if not self.lease_s > 2 * self.heartbeat_s:
            raise ValueError("lease_s must be more than twice heartbeat_s")
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("tls_certfile and tls_keyfile go together")
        if self.environment == "production":
            if not self.auth_enabled:
                raise ValueError("auth_enabled=false is only allowed with environment=development")
            if not self.api_tokens:
                raise ValueError("SPECTDOSE_API_TOKENS is empty: set at least one token (comma-separated)")
            for token in self.api_tokens:
                if len(token) < _MIN_TOKEN_CHARS or token.lower() in _WEAK_TOKENS:
                    raise ValueError(f"API tokens must be at least {_MIN_TOKEN_CHARS} characters and not a common word")
        elif not self.auth_enabled and not _is_loopback(self.http_host) and not self.no_auth_beyond_loopback:
            raise ValueError(
                f"authentication is off: the gateway may only listen on loopback, not {self.http_host!r} (set "
                "SPECTDOSE_API_TOKENS, or run `spectdose serve --no-auth` to open it to the network knowingly)"
            )
        return self

    # ---------------------------------------------------------------- derived values

    @property
    def db_url(self) -> str:
        if self.database_url:
            url = self.database_url
            if url.startswith("postgresql://") or url.startswith("postgres://"):
                url = "postgresql+psycopg://" + url.split("://", 1)[1]
            return url
        return f"sqlite:///{(self.data_dir / 'jobs.sqlite').resolve()}"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def max_unzipped_bytes(self) -> int:
        return int(self.max_unzipped_mb * 2**20)

    @property
    def min_free_disk_bytes(self) -> int:
        return int(self.min_free_disk_mb * 2**20)

    @property
    def docs_mode(self) -> str:
        """/docs, /redoc, /openapi.json: API_DOCS, else behind the token whenever there is one."""
        return self.api_docs or ("token" if self.auth_enabled else "public")

    @property
    def checks_host(self) -> bool:
        """Whether the Host header is checked: always without authentication (DNS rebinding would
        otherwise read results), and once ALLOWED_HOSTS is set."""
        return not self.auth_enabled or bool(self.allowed_hosts)

    def host_allowed(self, host: str) -> bool:
        """Whether ``host`` (a Host header or an Origin's host, port left out) is one we answer to."""
        name = host.strip().lower().rstrip(".")
        if name.startswith("["):
            name = name[1:].split("]", 1)[0]
        if not name:
            return False
        if name == "localhost" or "*" in self.allowed_hosts:
            return True
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(name)
            return True  # an address literal cannot be a rebound name
        names = {h.lower().rstrip(".") for h in self.allowed_hosts}
        names.add(self.http_host.lower())
        if self.public_url:
            names.add((urlsplit(self.public_url).hostname or "").lower())
        return name in names or any(n.startswith(".") and (name.endswith(n) or name == n[1:]) for n in names)

    @property
    def peer_map(self) -> dict[str, DicomPeer]:
        return {p.ae_title: p for p in (DicomPeer.parse(x) for x in self.peers)}

    @property
    def kernel_dir(self) -> Path:
        if self.kernel_cache_dir:
            return self.kernel_cache_dir
        from spectdose.paths import default_cache_dir

        return default_cache_dir() / "kernels"

    def to_env(self) -> dict[str, str]:
        """The settings as SPECTDOSE_* variables, to hand to a child process."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, list):
                value = ",".join(value)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            env[f"SPECTDOSE_{name.upper()}"] = str(value)
        return env


def load_settings(env_file: str | os.PathLike | None = None, **overrides) -> Settings:
    """Settings from the environment, an optional dotenv file ($SPECTDOSE_CONFIG) and overrides."""
    env_file = env_file or os.environ.get("SPECTDOSE_CONFIG")
    if env_file is not None and not Path(env_file).is_file():
        raise FileNotFoundError(f"settings file {env_file} does not exist")
    return Settings(_env_file=env_file, **overrides)
