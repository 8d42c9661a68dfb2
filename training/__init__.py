"""Training-loop support for experiment.py: jaxline fixes, checkpoints, logging, optimizer, evaluation."""
