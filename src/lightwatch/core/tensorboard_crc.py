"""A C checksum for TensorBoard's event files, in place of the pure-Python one TensorBoard ships.

Every record of an event file carries a masked CRC-32C of its bytes. Without TensorFlow, the ``tensorboard``
package (which ``torch.utils.tensorboard`` and Lightning's ``TensorBoardLogger`` write through) computes it
in pure Python, a table lookup per byte: about 160 ns a byte, on the writer's background thread while
holding the GIL. A sampled step of the default policy on a 96-module model writes ~22 KB of scalars:
~3.5 ms of CPU a sampled step spent on checksums, and the training thread waits for the GIL meanwhile.

:func:`install` swaps in ``google_crc32c``'s C implementation (a dependency of lightwatch) for the function
TensorBoard's record writer calls. The bytes written are the same (the checksum is the same function);
only the time changes (~20 us for those 22 KB). Where ``google_crc32c`` has no compiled extension for the
platform, nothing is replaced.

Example:
    >>> from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference
    >>> data = b"lightwatch" * 100
    >>> install() in (True, False)
    True
    >>> masked_crc32c(data) == reference(data)
    True
"""
from __future__ import annotations

from typing import Callable, Optional

__all__ = ["install", "masked_crc32c"]

_MASK_DELTA = 0xA282EAD8
_installed: Optional[bool] = None


def _c_crc32c() -> Optional[Callable[[bytes], int]]:
    try:
        import google_crc32c
    except ImportError:
        return None
    if getattr(google_crc32c, "implementation", "c") != "c":  # its pure-Python fallback is no faster
        return None
    return google_crc32c.value


_crc32c = _c_crc32c()


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of ``data`` (the rotation and offset TensorFlow applies to the checksum)."""
    if _crc32c is None:
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference

        return reference(data)
    x = _crc32c(data)
    return (((x >> 15) | (x << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def install() -> bool:
    """Make TensorBoard's record writer use the C checksum; ``True`` when it does. Idempotent, cheap to call
    again (the first call decides)."""
    global _installed
    if _installed is not None:
        return _installed
    _installed = False
    if _crc32c is None:
        return False
    try:
        from tensorboard.summary.writer import record_writer
    except ImportError:  # pragma: no cover - tensorboard is a dependency
        return False
    # only replace the function TensorBoard itself ships (leave any other replacement alone)
    current = getattr(record_writer, "masked_crc32c", None)
    if getattr(current, "__module__", "") == "tensorboard.compat.tensorflow_stub.pywrap_tensorflow":
        record_writer.masked_crc32c = masked_crc32c
    _installed = record_writer.masked_crc32c is masked_crc32c
    return _installed
