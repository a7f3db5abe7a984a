"""Helpers the writers of derived objects share (RT Dose, RT Structure Set, the phantom's files)."""

from __future__ import annotations

from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian


def file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    """The Part 10 file meta of an object we write: Explicit VR Little Endian, pydicom's implementation UID."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta
