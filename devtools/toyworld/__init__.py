"""Building the embedded Toy World model: ``train`` (the trainer), ``supervision`` (its attention losses and
probe) and ``calibrate`` (the stop-rule calibration on validation scenes). The model itself, its scenes and its
evaluation are runtime code in ``ice_ops.toyworld``."""
