"""Data layer: readers, transforms, multi-source pretraining batches, demo data and raw-format converters."""
