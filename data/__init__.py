"""ERA5 data side of GraphCast training.

sources: open WeatherBench2 / ARCO-ERA5 zarr (local or gs://) and DeepMind-style netCDF in one
normalized layout; validate: metadata checks with named errors before any heavy read; gcs: gs://
helpers (emulator endpoint, retries, URL-naming errors); prepare: write a training-ready zarr;
sample, stats: synthetic sample data, normalization statistics; examples: training/eval batches
(splits, windows, batches, train_iterator, eval_iterator).
"""
