"""Fast ops, each beside a readable reference implementation.

- :mod:`kernels.ms_deform_attn`: multi-scale deformable attention (reference: grid_sample).
"""
