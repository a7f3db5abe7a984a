"""Virtual patients for tests, training and the demo: anatomy, SPECT simulation, DICOM study.

``anatomy`` draws the patient (truth activity, density, CT), ``spect_sim`` simulates and
reconstructs its SPECT, ``study_io`` writes both as a DICOM study with its truth (and reads
it back), ``cycle`` makes the several time points of one therapy cycle. :func:`generate`
does patient -> SPECT -> study in one call (`spectdose phantom`).
"""

from __future__ import annotations

from pathlib import Path

from spectdose.errors import InputError
from spectdose.phantoms.anatomy import make_virtual_patient
from spectdose.phantoms.spect_sim import simulate_spect
from spectdose.phantoms.study_io import write_phantom_study

__all__ = ["generate"]


def generate(
    out_dir: str | Path,
    seed: int,
    size: str = "small",
    *,
    total_counts: float | None = None,
    device: str | None = None,
    n_iters: int | None = None,
    n_subsets: int | None = None,
    spect_units: str = "Bq/ml",
    noise_seed: int | None = None,
    num_threads: int | None = None,
) -> dict:
    """Make patient ``seed``, simulate and reconstruct its SPECT, write DICOM + truth.

    Writes ``out_dir/dicom/CT/*.dcm``, ``out_dir/dicom/NM/*.dcm`` and
    ``out_dir/truth/{truth.npz, seg.dcm, phantom.json}``; returns the written paths
    (see :func:`spectdose.phantoms.study_io.write_phantom_study`). Keyword arguments are those
    of :func:`spectdose.phantoms.anatomy.make_virtual_patient`, :func:`spectdose.phantoms.spect_sim.simulate_spect` and
    ``write_phantom_study``.

    Raises
    ------
    InputError
        Unknown size or units, bad seed, counts or reconstruction settings.
    """
    if spect_units not in ("Bq/ml", "counts"):
        raise InputError(f"spect_units must be 'Bq/ml' or 'counts', got {spect_units!r}")
    patient = make_virtual_patient(seed, size, total_counts=total_counts)
    spect = simulate_spect(
        patient, device=device, n_iters=n_iters, n_subsets=n_subsets, num_threads=num_threads, seed=noise_seed
    )
    return write_phantom_study(out_dir, patient, spect, spect_units=spect_units)
