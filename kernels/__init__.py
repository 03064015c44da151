"""Fast ops, each beside a readable reference implementation.

- :mod:`kernels.ms_deform_attn`: multi-scale deformable attention (reference: grid_sample).
- :mod:`kernels.cpu_gemm`: float32 CPU linear layers and 1x1 convolutions through oneDNN
  (reference: ``F.linear`` / ``F.conv2d``); :mod:`kernels.bench_gemm` compares them.
"""
