"""Training: the run context (models, data, devices), the epoch loop and its compiled step, checkpoints,
losses, input speed and evaluation."""
