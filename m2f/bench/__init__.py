"""Benchmarks, on top of the library (nothing in m2f's model, loss or training code imports this):

- :mod:`m2f.bench.speed`: m2f vs HF transformers, interleaved in one process;
- :mod:`m2f.bench.memory`: training memory per image (paper Table 5), each config in a fresh process;
- :mod:`m2f.bench.profile`: a training step split by part;
- :mod:`m2f.bench.kernels`: deformable attention kernels and their end-to-end effect;
- :mod:`m2f.bench.gemm`: float32 CPU GEMMs, BLAS vs oneDNN;
- :mod:`m2f.bench.report`: result JSONs (each with a ``kind``) -> README tables, through one
  renderer per kind; :mod:`m2f.bench.cli`: ``python -m m2f.bench``.
"""
