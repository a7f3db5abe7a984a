"""Lossless transfer syntaxes for sending results: what to propose, and each object in the one taken.

An RT Dose or dose-rate map on a clinical CT grid is 70-140 MB uncompressed; a PACS stores
and forwards it faster, and in less space, compressed. Only lossless syntaxes are used (a
dose changed by a codec would be another result), and a receiver that accepts none gets the
object uncompressed, as before (docs/rtdose.md, "Transfer syntaxes"):

* **JPEG-LS Lossless** (1.2.840.10008.1.2.4.80) for integer pixel data of at most 16 bits (the
  16-bit RT Dose): the smooth dose compresses well, and a viewer decodes it frame by frame.
  Encoded by pydicom with pyjpegls (CharLS), installed with highdicom.
* **Deflated Explicit VR Little Endian** (1.2.840.10008.1.2.1.99) for any object, the float
  dose-rate map and a 32-bit RT Dose included: zlib over the whole data set, written by pydicom.
* **Explicit / Implicit VR Little Endian**: the fall-backs every storage SCP accepts.

A C-STORE SCU proposes one presentation context per (SOP class, syntax group) with
:func:`presentation_contexts`, so the peer accepts or rejects each syntax on its own, then sends
each object with :func:`encode_for` in the first syntax that the peer accepted and that suits it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
)

__all__ = [
    "UNCOMPRESSED",
    "LOSSLESS_PREFERENCE",
    "syntaxes_for",
    "presentation_contexts",
    "choose_syntax",
    "encode_for",
    "jpegls_available",
]

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# Most preferred first; each object takes the first its pixels allow and the peer accepted.
LOSSLESS_PREFERENCE = (JPEGLSLossless, DeflatedExplicitVRLittleEndian)


def jpegls_available() -> bool:
    """Whether pydicom can encode JPEG-LS Lossless here (CharLS via pyjpegls)."""
    try:
        from pydicom.pixels.encoders import JPEGLSLosslessEncoder
    except ImportError:  # pragma: no cover - pydicom 3 has it
        return False
    return bool(JPEGLSLosslessEncoder.is_available)


def _jpegls_suits(header: Dataset) -> bool:
    """JPEG-LS takes 2-16 bit integer samples (not float pixels, not 1-bit SEG frames); ``header`` may
    be read without its pixels."""
    return (int(header.get("BitsAllocated", 0)) in (8, 16) and int(header.get("SamplesPerPixel", 1)) == 1
            and "FloatPixelData" not in header and "DoubleFloatPixelData" not in header)


def syntaxes_for(header: Dataset) -> list[str]:
    """The transfer syntaxes an object can be sent in, most preferred first (uncompressed last)."""
    out = []
    if _jpegls_suits(header) and jpegls_available():
        out.append(JPEGLSLossless)
    out.append(DeflatedExplicitVRLittleEndian)
    return [*out, *UNCOMPRESSED]


def presentation_contexts(headers: Iterable[Dataset]) -> list[tuple[str, list[str]]]:
    """(abstract syntax, transfer syntaxes) to propose for these objects: one context per SOP class
    and compressed syntax (so the peer can take or refuse each), and one uncompressed context."""
    wanted: dict[str, list[str]] = {}
    for header in headers:
        syntaxes = wanted.setdefault(str(header.SOPClassUID), [])
        for uid in syntaxes_for(header):
            if uid not in UNCOMPRESSED and uid not in syntaxes:
                syntaxes.append(uid)
    contexts = []
    for sop_class in sorted(wanted):
        ordered = [uid for uid in LOSSLESS_PREFERENCE if uid in wanted[sop_class]]
        contexts += [(sop_class, [uid]) for uid in ordered]
        contexts.append((sop_class, list(UNCOMPRESSED)))
    return contexts


def choose_syntax(header: Dataset, accepted: Sequence[str]) -> str | None:
    """The first syntax (preference order) that suits ``header`` and that the peer ``accepted``
    for its SOP class; None when it accepted none."""
    return next((uid for uid in syntaxes_for(header) if uid in set(map(str, accepted))), None)


def encode_for(ds: Dataset, transfer_syntax: str) -> Dataset:
    """``ds`` in ``transfer_syntax`` (lossless): the same instance (UIDs and values unchanged).

    Returns ``ds`` itself when it already is in that syntax, else a converted copy.
    """
    current = str(ds.file_meta.TransferSyntaxUID) if "TransferSyntaxUID" in getattr(ds, "file_meta", {}) else None
    if current == transfer_syntax:
        return ds
    out = Dataset()  # fresh top-level elements: converting the copy leaves ``ds`` as it was
    for elem in ds:
        out.add(DataElement(elem.tag, elem.VR, elem.value, is_undefined_length=elem.is_undefined_length))
    out.file_meta = copy.deepcopy(ds.file_meta) if hasattr(ds, "file_meta") else FileMetaDataset()
    if current is not None and current not in (*UNCOMPRESSED, DeflatedExplicitVRLittleEndian):
        out.decompress(generate_instance_uid=False)  # from an encapsulated syntax back to native pixels
    if transfer_syntax == JPEGLSLossless:
        out.compress(JPEGLSLossless, generate_instance_uid=False)
    else:
        out.file_meta.TransferSyntaxUID = transfer_syntax
    return out
