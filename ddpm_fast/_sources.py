"""The digest of the sources the extension is built from: setup.py compiles it into ddpm_fast._C
(build_info()["sources"]), and ddpm_fast._ext compares it with the checkout's, so an extension
that no longer matches csrc/ is noticed instead of tested.  Standard library only: setup.py
loads this file by path, before torch or the package can be imported."""

from __future__ import annotations

import hashlib
import os
from typing import Optional

# What setup.py compiles and how: every file under csrc/ but the C++ tests (CMake's alone), and setup.py.
_SKIP = ("csrc/tests/",)


def digest(root: str) -> Optional[str]:
    """16 hex digits over the paths and bytes of the extension's sources under root; None when root
    holds no csrc/ and setup.py (an installed package, not a checkout)."""
    csrc = os.path.join(root, "csrc")
    if not (os.path.isdir(csrc) and os.path.isfile(os.path.join(root, "setup.py"))):
        return None
    files = [os.path.join(root, "setup.py")]
    for top, dirs, names in os.walk(csrc):
        dirs.sort()
        files += [os.path.join(top, n) for n in sorted(names)]
    h = hashlib.sha256()
    for path in files:
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        if rel.startswith(_SKIP) or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:16]
