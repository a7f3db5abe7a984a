"""The DICOM node's wiring: the AE, its presentation contexts, handlers, and the completer."""

from __future__ import annotations

import logging

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt
from pynetdicom import sop_class as sc

from ..config import Settings
from ..context import ServiceContext
from ..jobs import JobStore
from ..queue import Enqueuer
from ..storage import Storage
from .dispatch import Completer
from .handlers import (
    NodeContext,
    handle_aborted,
    handle_conn_close,
    handle_echo,
    handle_released,
    handle_requested,
    handle_store,
)

__all__ = ["DicomNode", "build_ae", "STORAGE_CLASSES"]

log = logging.getLogger("spectdose.service.dicom")

# Inputs (CT, NM, PET, their enhanced forms), region sets (SEG, RT Structure Set: a job's
# regions), every class we send back (RT Dose, Parametric Map, SEG, RT Structure Set, SRs,
# Encapsulated PDF: recognised as ours when a PACS routes them back) and the secondary objects
# a PACS routes with a study (secondary captures, registrations, presentation states), accepted
# but not used, so a routing rule that sends "the whole study" does not fail.
STORAGE_CLASSES = (
    sc.CTImageStorage,
    sc.EnhancedCTImageStorage,
    sc.LegacyConvertedEnhancedCTImageStorage,
    sc.NuclearMedicineImageStorage,
    sc.PositronEmissionTomographyImageStorage,
    sc.EnhancedPETImageStorage,
    sc.LegacyConvertedEnhancedPETImageStorage,
    sc.SecondaryCaptureImageStorage,
    sc.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    sc.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    sc.MultiFrameTrueColorSecondaryCaptureImageStorage,
    sc.RTDoseStorage,
    sc.RTStructureSetStorage,
    sc.ParametricMapStorage,
    sc.SegmentationStorage,
    sc.SpatialRegistrationStorage,
    sc.DeformableSpatialRegistrationStorage,
    sc.BasicTextSRStorage,
    sc.EnhancedSRStorage,
    sc.ComprehensiveSRStorage,
    sc.Comprehensive3DSRStorage,
    sc.EncapsulatedPDFStorage,
    sc.GrayscaleSoftcopyPresentationStateStorage,
    sc.RawDataStorage,
)
# Uncompressed syntaxes only: the pipeline reads pixels with pydicom and no codec plugins,
# so a peer holding compressed images decompresses them for us during negotiation.
TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian)


def build_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.require_called_aet = True  # also enforced (with the calling AE) in handlers.handle_requested
    ae.add_supported_context(sc.Verification)
    for uid in STORAGE_CLASSES:
        ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))
    ae.network_timeout = settings.dicom_network_timeout_s
    ae.acse_timeout = 30
    ae.dimse_timeout = settings.dicom_network_timeout_s
    ae.maximum_associations = 16
    return ae


class DicomNode:
    """C-ECHO/C-STORE SCP plus the thread that turns quiet studies into jobs."""

    def __init__(self, settings: Settings, store: JobStore, storage: Storage, enqueuer: Enqueuer):
        self.ctx = NodeContext(settings, store, storage)
        self.enqueuer = enqueuer
        self.completer = Completer(self.ctx, enqueuer, interval_s=min(1.0, settings.study_quiet_s / 4))
        self.server = None

    @classmethod
    def for_context(cls, ctx: ServiceContext) -> DicomNode:
        """The node of a process's :class:`service.context.ServiceContext`."""
        return cls(ctx.settings, ctx.store, ctx.storage, ctx.enqueuer)

    def start(self) -> None:
        """Recover from a crash (staging cleared, half-dispatched bursts reopened), then listen."""
        settings = self.ctx.settings
        cleared = self.ctx.storage.clear_staging()
        reopened = self.ctx.store.reset_dispatching()
        if cleared or reopened:
            log.warning("start-up: %d unreleased association(s) discarded, %d study burst(s) reopened",
                        cleared, reopened)
        handlers = [
            (evt.EVT_REQUESTED, handle_requested, [self.ctx]),
            (evt.EVT_C_ECHO, handle_echo, [self.ctx]),
            (evt.EVT_C_STORE, handle_store, [self.ctx]),
            (evt.EVT_RELEASED, handle_released, [self.ctx]),
            (evt.EVT_ABORTED, handle_aborted, [self.ctx]),
            (evt.EVT_CONN_CLOSE, handle_conn_close, [self.ctx]),
        ]
        ae = build_ae(settings)
        self.server = ae.start_server((settings.dicom_host, settings.dicom_port), block=False, evt_handlers=handlers)
        self.completer.start()
        log.info("DICOM node %s listening on %s:%d", settings.ae_title, settings.dicom_host, settings.dicom_port)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def stop(self) -> None:
        self.completer.stop()
        if self.server is not None:
            self.server.shutdown()
            self.server = None
