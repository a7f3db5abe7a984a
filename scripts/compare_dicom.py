#!/usr/bin/env python3
"""Compare two DICOM files element by element (nested sequences too; Pixel Data by SHA-256).

Used to check that a change of code layout leaves the outputs as they were: apart from the
creation date-times, two runs on the same study must give the same UIDs and pixels.

    python scripts/compare_dicom.py A.dcm B.dcm [--ignore-times]
"""

from __future__ import annotations

import argparse
import hashlib

import pydicom

# Elements that record when an object was made, not what it holds.
_TIME_KEYWORDS = {
    "InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime", "SeriesDate", "SeriesTime",
    "StructureSetDate", "StructureSetTime", "ContributionDateTime",
}


def flatten(ds: pydicom.Dataset, prefix: str = "") -> dict[str, tuple[str, object]]:
    out: dict[str, tuple[str, object]] = {}
    for el in ds:
        key = prefix + str(el.tag)
        if el.VR == "SQ":
            for i, item in enumerate(el.value):
                out.update(flatten(item, f"{key}[{i}]."))
        elif el.tag == 0x7FE00010:
            out[key] = (el.keyword, "sha256:" + hashlib.sha256(el.value).hexdigest())
        else:
            out[key] = (el.keyword, el.value)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--ignore-times", action="store_true", help="skip creation/content dates and times")
    args = parser.parse_args()
    a, b = (flatten(pydicom.dcmread(p)) for p in (args.a, args.b))
    differences = 0
    for key in sorted(set(a) | set(b)):
        keyword = (a.get(key) or b.get(key))[0]
        if args.ignore_times and keyword in _TIME_KEYWORDS:
            continue
        if a.get(key) != b.get(key):
            differences += 1
            print(f"{key} {keyword}: {a.get(key, (None, None))[1]!s:.80} | {b.get(key, (None, None))[1]!s:.80}")
    print(f"{differences} differing elements")
    return 1 if differences else 0


if __name__ == "__main__":
    raise SystemExit(main())
