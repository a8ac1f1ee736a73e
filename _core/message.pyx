"""A received message: its topic, sequence, timestamp, flags and data.

Inline payloads were copied out of the ring slot (they are the receiver's);
arena payloads are read-only views whose base, a :class:`Hold`, keeps the
block alive (docs/arena.md, "Holds and lifetime").
"""

import numpy as _np

from tensorbus._core import tensors as _tensors

from tensorbus._core.errors import TensorbusError

__all__ = ["Message"]


cdef class Message:
    """One received message.

    ``data`` is what was sent: a read-only memoryview for bytes and buffers,
    a read-only numpy array (same dtype and shape) for arrays and tensors.
    Small payloads were copied out of the ring slot; large tensors are views
    of the arena block, which stays reserved while ``data`` or any view made
    from it lives. ``release()`` (or leaving a ``with`` block) drops the
    message's own references early; ``as_torch()`` gives a torch tensor over
    the same memory."""

    @property
    def data(self):
        if self.view is not None:
            return self.view
        if self.payload is None and self.hold is None:
            raise TensorbusError("the message was released")
        if self.dtype is None:
            self.view = memoryview(self.payload)
        else:
            self.view = self._array(False)
        return self.view

    def _array(self, bint writable):
        src = self.hold if self.hold is not None else self.payload
        if self.dtype == _tensors.BYTES_TAG:
            mv = memoryview(src)
            return mv if writable else mv.toreadonly()
        dt = _tensors.numpy_dtype(self.dtype)
        try:
            arr = _np.frombuffer(src, dtype=dt, count=self.size // dt.itemsize).reshape(self.shape)
        except ValueError as exc:
            raise TensorbusError(f"message {self.seq} of {self.topic!r} has an inconsistent "
                                 f"tensor descriptor ({self.dtype}, {self.shape}, "
                                 f"{self.size} bytes): {exc}") from None
        if not writable:
            arr.flags.writeable = False
        elif not arr.flags.writeable:
            arr = arr.copy()  # an inline payload: small, and bytes are immutable
        return arr

    def as_torch(self):
        """A torch tensor of the message's data: over the same arena memory
        for large tensors (do not write it: other subscribers see the same
        block; ``.clone()`` first), a copy for small inline ones."""
        if self.payload is None and self.hold is None:
            raise TensorbusError("the message was released")
        if self.dtype is None or self.dtype == _tensors.BYTES_TAG:
            import torch
            return torch.frombuffer(bytearray(self.payload if self.hold is None
                                              else memoryview(self.hold)), dtype=torch.uint8)
        return _tensors.to_torch(self._array(True), self.dtype)

    def __dlpack__(self, **kwargs):
        return self.data.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return (1, 0)  # kDLCPU

    @property
    def is_tensor(self) -> bool:
        """True for arrays and tensors (``data`` is an ndarray)."""
        return self.dtype is not None and self.dtype != _tensors.BYTES_TAG

    @property
    def zero_copy(self) -> bool:
        """True if ``data`` views the arena rather than a copy."""
        return self.hold is not None

    @property
    def meta(self):
        """The 32 bytes of application metadata sent with a tensor, or None."""
        return self.meta_bytes

    @property
    def nbytes(self) -> int:
        return self.size

    def __bytes__(self):
        if self.payload is None and self.hold is None:
            raise TensorbusError("the message was released")
        if self.hold is not None:
            return bytes(memoryview(self.hold))
        return self.payload

    def __len__(self):
        return self.size

    def release(self) -> None:
        """Drop this message's references to its data. An arena block goes
        back once no view made from ``data`` is alive either."""
        if self.view is not None and type(self.view) is memoryview:
            try:
                self.view.release()
            except BufferError:
                pass  # something still views it: it keeps the data alive
        self.view = None
        self.payload = None
        self.hold = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __repr__(self):
        kind = f" {self.dtype}{list(self.shape)}" if self.dtype is not None else ""
        return (f"<Message topic={self.topic!r} seq={self.seq} nbytes={self.size}{kind} "
                f"timestamp_ns={self.timestamp_ns}>")
