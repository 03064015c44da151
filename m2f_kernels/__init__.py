"""Fast ops, one file per op, each holding its readable reference, its fast path(s) and the one
dispatch on a backend name (a constructor argument of the modules that use it, set from the config):

- :mod:`m2f_kernels.ms_deform_attn`: multi-scale deformable attention (reference: grid_sample; pure
  PyTorch gather / levels / recompute formulations; Triton kernels).
- :mod:`m2f_kernels.mask_product`: the mask head's product (reference: einsum; an autograd function whose
  CPU backward skips queries without gradient).
- :mod:`m2f_kernels.cpu_gemm`: float32 CPU linear layers and 1x1 convolutions through oneDNN (reference:
  ``F.linear`` / ``F.conv2d``), and the ``Linear`` / ``Conv2d`` modules that take the backend.

m2f_kernels/ is a leaf: nothing here imports m2f (tests/test_layout.py checks it).  Benchmarks of these
ops live in :mod:`m2f.bench` (``python -m m2f.bench kernels`` / ``gemm``).
"""
