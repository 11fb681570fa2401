"""Triton kernels for the fused MAE ops, installed as ``mae_fast.kernels``.

Each module holds only ``@triton.jit`` kernels and thin launchers that take and return tensors;
the registration as custom ops, the references and the dispatch live in :mod:`mae_fast.ops`.
"""
