"""Everything experiment.py's jaxline Experiment relies on: launching the modes, up-front checks,
inputs, checkpoints, evaluation, export, optimizer, logging and jaxline fixes."""
