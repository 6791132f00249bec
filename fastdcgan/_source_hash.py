"""The hash of the C++/CUDA sources that setup.py compiles into fastdcgan._C and that
fastdcgan._ext compares at import to catch a stale build. Standard library only: setup.py loads
this file before the package can be imported."""
import glob
import hashlib
import os

EXT_SOURCE_PATTERNS = ("*.cpp", "*.h", "*.cu", "*.cuh")


def csrc_source_hash(root):
    """sha256 over root/csrc/**/{*.cpp,*.h,*.cu,*.cuh} (sorted relative posix paths and bytes);
    None when there are no sources (an installed, non-editable package)."""
    csrc = os.path.join(root, "csrc")
    files = set()
    for pattern in EXT_SOURCE_PATTERNS:
        files.update(glob.glob(os.path.join(csrc, "**", pattern), recursive=True))
    if not files:
        return None
    h = hashlib.sha256()
    for path in sorted(os.path.relpath(f, csrc).replace(os.sep, "/") for f in files):
        h.update(path.encode() + b"\0")
        with open(os.path.join(csrc, path), "rb") as fh:
            h.update(fh.read())
        h.update(b"\0")
    return h.hexdigest()[:32]
