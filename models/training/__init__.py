"""Training: data synthesis, losses, the training loop, export, evaluation, inference."""
