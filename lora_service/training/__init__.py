"""Training: base models, run planning, the training child, checkpoints.

This package's `__init__` imports nothing heavy: the daemon imports `plan` and `split` (torch-free);
everything that needs torch (`base_model`, `data`, `trainer`, `checkpoint`, `run`) is imported
only inside the training child or the foreground `train-now`.
"""
