"""kvpager.Error and one subclass per kvp_status.

A failing call raises the subclass of its status; the exception carries the status, the library's
static description (kvp_strerror) and the detail kvp_last_error() gave right after the call, on the
calling thread.
"""

from . import _library as lib


class Error(Exception):
    """A kvpager call failed. status: the kvp_status; detail: kvp_last_error() of the call."""

    status = None

    def __init__(self, status, detail, call=None):
        self.status = status
        self.detail = detail
        self.call = call
        # most details already start with the call's name
        where = f"{call}: " if call and not (detail or "").startswith(call) else ""
        super().__init__(f"{where}{detail}" if detail else f"{where}{strerror(status)}")


class InvalidArgument(Error):
    """KVP_EINVAL: bad argument, spec, shape or handle (or a parked sequence used)."""


class OutOfMemory(Error):
    """KVP_ENOMEM: quota, pool limit or the system is out of memory."""


class SpillIOError(Error):
    """KVP_EIO: the spill device failed."""


class Corrupt(Error):
    """KVP_ECORRUPT: spilled or loaded data failed its checks."""


class PermissionDenied(Error):
    """KVP_EPERM: a handle used outside its owner, or after it was closed."""


class Unsupported(Error):
    """KVP_EUNSUPPORTED: a valid request this build or host does not serve."""


class AbiMismatch(Error):
    """KVP_EABI: host and library disagree on a structure version."""


class Busy(Error):
    """KVP_EBUSY: another call on the same sequence was in progress (the binding serializes its own)."""


_BY_STATUS = {
    lib.EINVAL: InvalidArgument,
    lib.ENOMEM: OutOfMemory,
    lib.EIO: SpillIOError,
    lib.ECORRUPT: Corrupt,
    lib.EPERM: PermissionDenied,
    lib.EUNSUPPORTED: Unsupported,
    lib.EABI: AbiMismatch,
    lib.EBUSY: Busy,
}


def strerror(status):
    text = lib.native().kvp_strerror(status)
    return text.decode("utf-8", "replace") if text else f"status {status}"


def check(status, call):
    """Raises the Error subclass of a failing status with kvp_last_error(); returns None on KVP_OK."""
    if status == lib.OK:
        return
    detail = lib.native().kvp_last_error()
    detail = detail.decode("utf-8", "replace") if detail else ""
    raise _BY_STATUS.get(status, Error)(status, detail, call)


def closed(what):
    """What using a closed object raises: the status the library gives a closed sequence handle. The
    call never reaches C (a closed pool's or tenant's pointer is freed memory)."""
    return PermissionDenied(lib.EPERM, f"the {what} is closed", None)
