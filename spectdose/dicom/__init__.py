"""DICOM in and out: the study read into volumes (``ingest``), the results written back.

In: ``archive`` (zips and folders, safely), ``_files`` (reading and sorting instances),
``_series`` (CT and NM series into volumes with their geometry), ``_activity``
(calibration and timing facts of the SPECT), ``ingest`` (the public ``load_study``),
``rtstruct`` (RT Structure Set contours into masks).
Out: ``rtdose`` (RT Dose), ``pmap`` (dose-rate Parametric Map), ``region_outputs`` (SEG,
RT Structure Set, TID 1500 SR, DVHs, CSVs), ``export`` (the writers' public names).
"""
