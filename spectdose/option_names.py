"""How users spell the dose options: REST field names and CLI flags.

Apart from :mod:`spectdose.pipeline` (which holds ``DoseOptions``) so that the stages below it
(ingest, study, dose) can name the flag or field that fixes a refusal without importing upwards.
"""

from __future__ import annotations

__all__ = ["PUBLIC_NAMES", "public_name", "option_hint"]

# The public name of each DoseOptions field: the REST query field and, with "-" for "_",
# the CLI flag (``--spect-series``). Stored job options use these names too.
PUBLIC_NAMES: dict[str, str] = {
    "method": "method",
    "time_model": "time_model",
    "effective_half_life_h": "effective_half_life_h",
    "administration_datetime": "administration_time",
    "acquisition_datetime": "acquisition_time",
    "hours_after_administration": "hours_after_administration",
    "density_curve": "density_curve",
    "kernel_medium": "kernel_medium",
    "sensitivity_cps_per_mbq": "sensitivity_cps_per_mbq",
    "allow_normalised": "normalised",
    "spect_series_uid": "spect_series",
    "ct_series_uid": "ct_series",
    "energy_window_kev": "energy_window",
    "dose_grid": "dose_grid",
    "accepted_assumptions": "accept",
    "calling_ae_title": "calling_aet",
    "autocast_bf16": "bf16",
    "uncertainty": "uncertainty",
    "map_precision": "map_precision",
}


def public_name(field: str, *, cli: bool = False) -> str:
    """How users spell a DoseOptions field: ``spect_series`` (REST) or ``--spect-series`` (CLI)."""
    name = PUBLIC_NAMES.get(field, field)
    return "--" + name.replace("_", "-") if cli else name


def option_hint(field: str) -> str:
    """'--spect-series (CLI) / spect_series (REST)': for messages that tell the user what to supply."""
    return f"{public_name(field, cli=True)} (CLI) / {public_name(field)} (REST)"
