"""The parts of the prepared GPU check (``benchmarks/gpu_check.py``, its entry point and CLI)."""
