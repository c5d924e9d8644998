"""Micro-benchmarks of the harness's pure models (``python -m harness bench ...``).

Modules:
  harness.bench.iotlb     cost of the IOTLB reference model's operations versus its size
  harness.bench.pinning   cost of the pinning model's (iommufd IOAS) operations versus its size
  harness.bench.grant     cost of the grant table model's operations and its peak memory versus its size
  harness.bench.timing    what both share: timed blocks with the GC paused, log2 n normalisation, table
"""
