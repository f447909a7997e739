"""Triton backend of the cetnet ops (``torch.ops.cetnet.*_triton``).

Importing :mod:`cetnet_kernels.triton.fusion` registers the ops; it needs ``triton``. Set
``TRITON_INTERPRET=1`` before that import to run the kernels on CPU tensors (tests only).
"""
