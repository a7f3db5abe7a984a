"""The adapter shell's floor plan: no torch in the gateway, no adapter in the core, no circle.

Each check runs in a fresh interpreter, since the test process has imported everything.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ADAPTER_DEPENDENCIES = ("fastapi", "uvicorn", "starlette", "python_multipart", "pydantic_settings", "sqlalchemy",
                        "psycopg", "celery", "kombu", "redis", "pynetdicom", "httpx", "prometheus_client")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_the_gateway_process_never_imports_torch(tmp_path):
    """The gateway finds the weights and the kernel cache through spectdose.paths, not spectdose.cnn.inference."""
    r = _python(f"""
        import sys
        from pathlib import Path
        from service.config import Settings
        from service.main import create_app

        settings = Settings(environment="development", data_dir=Path({str(tmp_path)!r}),
                            redis_url="redis://127.0.0.1:1/0", default_method="auto")
        app = create_app(settings, sweeper=False)
        settings.resolved_method, settings.kernel_dir
        assert "torch" not in sys.modules, "the gateway imported torch"
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_the_core_cli_imports_no_adapter_dependency():
    r = _python(f"""
        import sys
        import spectdose.cli
        loaded = sorted(m for m in {ADAPTER_DEPENDENCIES!r} if m in sys.modules)
        assert not loaded, loaded
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_no_import_circle_and_no_upward_import():
    """No module circle anywhere; worker/ imports service/, never the reverse; in the core nothing
    imports a layer above it (the pipeline never imports learning/ or phantoms/). import_graph.py
    reads the source with ast."""
    r = subprocess.run([sys.executable, "scripts/import_graph.py"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout
    for line in ("cycles: 0", "core modules importing an adapter: 0", "upward imports in the core: 0",
                 "packages importing each other: 0"):
        assert line in r.stdout, r.stdout


def test_without_the_service_extra_the_core_runs_and_service_commands_say_what_is_missing():
    """The adapters' packages hidden, as in an install without `spectdose[service]`."""
    r = _python(f"""
        import importlib.abc
        import sys

        blocked = {(*ADAPTER_DEPENDENCIES, "pydantic")!r}

        class Hidden(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in blocked:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

        sys.meta_path.insert(0, Hidden())
        import spectdose.cli
        import spectdose.pipeline

        assert "dose" in spectdose.cli.build_parser().format_help()
        sys.exit(spectdose.cli.main(["gateway"]))
    """)
    assert r.returncode == 2, r.stderr
    assert "spectdose[service]" in r.stderr and "Traceback" not in r.stderr
