"""Benchmarks of the training steps, the tokenizer and data loading (``tools/benchmark.py``, ``tools/benchmark_data.py``);
an application of the library, which never imports it."""
