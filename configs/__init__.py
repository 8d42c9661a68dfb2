"""Experiment configs (ml_collections): `python experiment.py --config=configs/<name>.py`."""
