"""DblurDoseNet: ``model`` (the network itself) and ``inference`` (weights, the learned
residual on the DVK map, the deep-ensemble uncertainty) -- what the pipeline calls."""
