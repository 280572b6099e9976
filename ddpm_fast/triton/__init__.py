"""Triton kernels.  Imported lazily by ddpm_fast.ops: TRITON_INTERPRET must be set before import."""
