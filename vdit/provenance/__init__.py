"""Provenance of generated video: an invisible watermark and an "AI-generated" record."""

from vdit.provenance.manifest import (
    DIGITAL_SOURCE_TYPE,
    mp4_metadata,
    provenance_record,
    read_sidecar,
    sign_c2pa,
    write_sidecar,
)
from vdit.provenance.watermark import (
    DEFAULT_KEY,
    MIN_FRAME_SIZE,
    PAYLOAD_BITS,
    Detection,
    detect,
    embed,
    is_weak,
    make_payload,
)

__all__ = [
    "DEFAULT_KEY",
    "DIGITAL_SOURCE_TYPE",
    "MIN_FRAME_SIZE",
    "PAYLOAD_BITS",
    "Detection",
    "detect",
    "embed",
    "is_weak",
    "make_payload",
    "mp4_metadata",
    "provenance_record",
    "read_sidecar",
    "sign_c2pa",
    "write_sidecar",
]
