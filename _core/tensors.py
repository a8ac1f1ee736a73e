"""What a tensor is on the wire: a dtype tag and a shape in the slot's
descriptor, and the conversions between numpy, torch and DLPack.

The tag is numpy's ``dtype.str`` (``"<f4"``, ``"|b1"``), plus two of our
own: ``"bfloat16"`` (numpy has no bfloat16: the data travels as uint16 and
``as_torch`` views it as ``torch.bfloat16``) and ``"bytes"`` (a plain
buffer: it is received as a memoryview, not an array). torch is imported
only when a torch tensor is actually seen.
"""

from __future__ import annotations

import sys

import numpy as np

__all__ = [
    "SUPPORTED_KINDS",
    "MAX_NDIM",
    "BYTES_TAG",
    "BF16_TAG",
    "numpy_dtype",
    "tag_of",
    "from_object",
    "loan_dtype",
    "to_torch",
]

SUPPORTED_KINDS = "biufc"  # bool, signed, unsigned, float, complex
MAX_NDIM = 8
BYTES_TAG = "bytes"
BF16_TAG = "bfloat16"

_DTYPES: dict[str, np.dtype] = {BYTES_TAG: np.dtype("u1"), BF16_TAG: np.dtype("<u2")}


def numpy_dtype(tag: str) -> np.dtype:
    """The numpy dtype data of ``tag`` is viewed as (cached)."""
    dt = _DTYPES.get(tag)
    if dt is None:
        dt = np.dtype(tag)
        if dt.kind not in SUPPORTED_KINDS:
            raise ValueError(f"unsupported dtype tag {tag!r}")
        _DTYPES[tag] = dt
    return dt


def tag_of(arr: np.ndarray) -> str:
    """The tag of a numpy array's dtype; TypeError with a sentence if
    tensorbus cannot carry it."""
    dt = arr.dtype
    if dt.kind not in SUPPORTED_KINDS or dt.fields is not None or dt.subdtype is not None:
        raise TypeError(
            f"cannot send arrays of dtype {dt}: tensorbus carries bool, integer, float "
            "and complex arrays (and torch.bfloat16)"
        )
    if arr.ndim > MAX_NDIM:
        raise ValueError(f"cannot send a {arr.ndim}-d array: at most {MAX_NDIM} dimensions")
    return dt.str


def _is_torch(obj) -> bool:
    mod = type(obj).__module__
    return mod.startswith("torch") and "torch" in sys.modules


def from_object(obj) -> tuple[np.ndarray | None, str | None]:
    """A numpy view of a torch tensor or a ``__dlpack__`` object, and its tag;
    ``(None, None)`` for anything else (send it as a buffer)."""
    if _is_torch(obj) and hasattr(obj, "numpy"):
        import torch

        if obj.device.type != "cpu":
            raise TypeError(
                f"cannot send a tensor on {obj.device}: this build carries host memory; "
                "move it with .cpu() first"
            )
        t = obj.detach()
        if t.is_conj():
            t = t.resolve_conj()
        if t.dtype == torch.bfloat16:
            return t.view(torch.uint16).numpy(), BF16_TAG
        return t.numpy(), None
    if hasattr(obj, "__dlpack__") and not _has_buffer(obj):
        try:
            return np.from_dlpack(obj), None
        except (BufferError, RuntimeError, TypeError) as exc:
            raise TypeError(f"cannot view {type(obj).__name__} through DLPack: {exc}") from None
    return None, None


def _has_buffer(obj) -> bool:
    try:
        memoryview(obj).release()
        return True
    except TypeError:
        return False


def loan_dtype(dtype) -> tuple[np.dtype, str]:
    """``loan(shape, dtype)``'s dtype (numpy, a string, or a torch dtype) as
    the numpy dtype of the loaned array and its tag."""
    if _is_torch(dtype):
        import torch

        if dtype == torch.bfloat16:
            return np.dtype("<u2"), BF16_TAG
        dtype = torch.empty((), dtype=dtype).numpy().dtype
    if isinstance(dtype, str) and dtype == BF16_TAG:
        return np.dtype("<u2"), BF16_TAG
    dt = np.dtype(dtype)
    if dt.kind not in SUPPORTED_KINDS or dt.fields is not None:
        raise TypeError(f"cannot loan arrays of dtype {dt}")
    return dt, dt.str


def to_torch(arr: np.ndarray, tag: str):
    """A torch tensor over ``arr``'s memory (writable ``arr``: no copy)."""
    import torch

    t = torch.from_numpy(arr)
    if tag == BF16_TAG:
        t = t.view(torch.bfloat16)
    return t
