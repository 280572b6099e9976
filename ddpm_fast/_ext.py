"""The compiled extension, if built: importing it registers torch.ops.ddpm_fast.*."""

from __future__ import annotations

import os
import warnings

import torch

from . import _sources

_C = None
BUILD_INFO = None
if os.environ.get("DDPM_FAST_NO_EXT") == "1":
    IMPORT_ERROR = "DDPM_FAST_NO_EXT=1"
else:
    try:
        from . import _C  # noqa: F401

        BUILD_INFO = dict(_C.build_info())
        IMPORT_ERROR = None
    except ImportError as e:  # the package works without it, on the reference backend
        IMPORT_ERROR = str(e)

# The digest of the extension's sources in this source checkout; None in an installed package.
CHECKOUT_SOURCES = _sources.digest(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def stale_reason(info):
    """Why an extension with build_info() `info` was not built from the checkout's sources, or None
    when it was (or when there is no checkout to compare with)."""
    if CHECKOUT_SOURCES is None or info.get("sources") == CHECKOUT_SOURCES:
        return None
    return (f"ddpm_fast._C was built from other sources (digest {info.get('sources')}) than this checkout's "
            f"csrc/ and setup.py ({CHECKOUT_SOURCES}): rebuild it with `pip install --no-build-isolation -e .`")


if _C is not None:
    _stale = stale_reason(BUILD_INFO)
    if _stale:  # it would run the old kernels
        warnings.warn(_stale, stacklevel=2)
    from . import _ops_meta

    _ops_meta.register_extension_fakes()  # fake kernels for torch.compile


def cpu_status():
    return True if _C is not None else f"extension not built ({IMPORT_ERROR})"


def cuda_status():
    if _C is None:
        return f"extension not built ({IMPORT_ERROR})"
    if not BUILD_INFO["cuda"]:
        return "extension built without CUDA (no CUDA toolkit or a CPU build of torch at build time)"
    if not torch.cuda.is_available():
        return "no GPU"
    return True


def triton_status():
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton not installed"
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return "no GPU (set TRITON_INTERPRET=1 to run the kernels on the CPU interpreter)"
