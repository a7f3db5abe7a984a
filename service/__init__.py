"""The service adapters: REST gateway, DICOM node, job store and export (no physics here)."""

__all__: list[str] = []
