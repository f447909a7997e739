"""Triton backend of the cetnet ops (``torch.ops.cetnet.*_triton``).

Importing :mod:`cetnet_kernels.triton.fusion` registers the fusion ops and
:mod:`cetnet_kernels.triton.embedding` the multi-table embedding ops; both need ``triton``. Set
``TRITON_INTERPRET=1`` before that import to run the kernels on CPU tensors (tests only).
"""
