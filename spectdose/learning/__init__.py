"""Offline work above the pipeline: ``training`` (data sets, training, ensembles) and
``evaluation`` (methods against the virtual patients' reference dose). Nothing in the
dose pipeline imports this package."""
