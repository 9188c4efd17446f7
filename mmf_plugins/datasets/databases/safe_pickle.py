"""Load pickled numpy containers (MMF ``_info.npy``, ``imdb_*.npy``, MMF LMDB values) without running code.

MMF stores per-image box info as ``np.save(path, dict)`` and VQA annotations as pickled object
arrays, and its LMDB feature stores hold ``pickle.dumps(dict)``; MMF reads them with
``np.load(..., allow_pickle=True)`` / ``pickle.loads``, which executes whatever the file names.
Deliberate difference: we parse the ``.npy`` header ourselves and unpickle object payloads with an
unpickler that only resolves the handful of globals numpy's own pickles use (array/dtype/scalar
reconstruction, ``OrderedDict``, ``set``...). Plain dicts, lists, strings and numbers need no globals.
A file naming anything else raises ``pickle.UnpicklingError`` with the offending name.

Numeric ``.npy`` files are read (or memory-mapped) straight from the header we parsed, so each file
is opened once and a truncated file is caught before any byte of it is used.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
from typing import Any, BinaryIO

import numpy as np

# (module, name) pairs a numpy pickle may reference. numpy 1.x writes ``numpy.core.*``,
# numpy 2.x writes ``numpy._core.*``; both resolve through ``numpy`` itself.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # python-2 era numpy pickles encode raw bytes through latin-1 strings
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
    ("builtins", "slice"),
    ("__builtin__", "set"),
    ("__builtin__", "frozenset"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only numpy's array/dtype/scalar constructors."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            if module.startswith("numpy"):
                # resolve through the installed numpy, whichever of core/_core it has
                if name in ("ndarray", "dtype"):
                    return getattr(np, name)
                sub = "multiarray" if name in ("_reconstruct", "scalar") else "numeric"
                core = getattr(np, "_core", None) or np.core
                return getattr(getattr(core, sub), name)
            if module == "__builtin__":
                module = "builtins"
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to unpickle global '{module}.{name}': only numpy arrays, dicts, lists, strings and "
            "numbers are accepted. Convert the file with a trusted script (np.load(allow_pickle=True) on a "
            "machine where you trust its origin) into .npy without objects, LMDB or TSV."
        )


def loads(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (latin-1 for python-2 pickles, as numpy advises)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


def _read_header(fp: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fp)
    raise ValueError(f"unsupported .npy format version {version}; expected 1.0 or 2.0 for object arrays")


def load_npy(path: str | os.PathLike, mmap_mode: str | None = None) -> Any:
    """Load a ``.npy`` file, opening it once.

    Object arrays are unpickled safely; a 0-d object array returns its item (``np.save(path, dict)``
    gives back the dict, like ``np.load(path, allow_pickle=True)[()]``). Numeric arrays are read, or
    memory-mapped read-only when ``mmap_mode="r"``. A file shorter than its header says raises
    ``ValueError`` ("truncated ...").
    """
    if mmap_mode not in (None, "r"):
        raise ValueError(f"mmap_mode must be None or 'r', got {mmap_mode!r}")
    with open(path, "rb") as fp:
        shape, fortran, dtype = _read_header(fp)
        if dtype.hasobject:
            obj = RestrictedUnpickler(fp, encoding="latin1").load()
            if isinstance(obj, np.ndarray) and obj.dtype.hasobject and obj.shape == ():
                return obj.item()
            return obj
        count = int(np.prod(shape, dtype=np.int64))
        offset = fp.tell()
        needed = offset + count * dtype.itemsize
        size = os.fstat(fp.fileno()).st_size
        if size < needed:
            raise ValueError(f"truncated .npy: {size} bytes, header {tuple(shape)} {dtype} needs {needed}")
        order = "F" if fortran else "C"
        if count == 0:
            return np.zeros(shape, dtype=dtype, order=order)
        if mmap_mode == "r":
            buf = mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ)
            arr = np.frombuffer(buf, dtype=dtype, count=count, offset=offset)
        else:
            arr = np.fromfile(fp, dtype=dtype, count=count)
        return arr.reshape(shape, order=order)
