"""Data layer: readers, transforms, multi-source pretraining batches, visual-token targets, held-out sets and
raw-format converters."""
