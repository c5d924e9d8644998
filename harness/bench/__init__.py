"""Micro-benchmarks of the harness's pure models (``python -m harness bench ...``).

Modules:
  harness.bench.iotlb   cost of the IOTLB reference model's operations versus its size
"""
