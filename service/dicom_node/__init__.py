"""The DICOM node: C-ECHO and C-STORE SCP (pynetdicom) that turns pushed studies into jobs."""

from .dispatch import Completer, dispatch_quiet_studies, job_id_for
from .handlers import NodeContext
from .server import DicomNode, build_ae

__all__ = ["DicomNode", "NodeContext", "Completer", "build_ae", "dispatch_quiet_studies", "job_id_for"]
