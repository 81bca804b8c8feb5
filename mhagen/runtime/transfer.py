"""Host <-> device transfers that work on every driver, Vulkan on Mesa's lavapipe included.

`DeviceArray.to_host()` imports a fresh host allocation, which Mesa's lavapipe refuses ("host
allocation import pointer does not satisfy Vulkan minImportedHostPointerAlignment 4096"). So
results are read by mapping their buffer when it is host-visible and mappable (the CPU drivers),
else by a `queue_copy` into a mappable staging buffer. Inputs are written into freshly allocated
device buffers through `map()`, or through a staging copy where device memory is not mappable
(discrete GPUs). bool tensors travel as one byte per element, as IREE stores i1.
"""

from __future__ import annotations

import numpy as np
import iree.runtime as rt
from iree.runtime.dtypes import map_dtype_to_hal_element_type

__all__ = ["to_device", "to_host", "zeros"]

_MT = rt.MemoryType
_BU = rt.BufferUsage
_BC = rt.BufferCompatibility

_DEVICE_MT = int(_MT.DEVICE_LOCAL)
_STAGING_MT = int(_MT.HOST_LOCAL | _MT.DEVICE_VISIBLE)
_MAPPABLE_DEVICE_USAGE = int(_BU.DEFAULT | _BU.MAPPING)
_PLAIN_DEVICE_USAGE = int(_BU.DEFAULT)
_UPLOAD_STAGING_USAGE = int(_BU.TRANSFER_SOURCE | _BU.MAPPING)
_DOWNLOAD_STAGING_USAGE = int(_BU.TRANSFER_TARGET | _BU.MAPPING)

_direct_ok_cache: dict[int, bool] = {}


def _device_of(device):
    return device.device if isinstance(device, rt.Config) else device


def _alloc_size(nbytes: int) -> int:
    # zero-size buffers are awkward for some drivers; round to 4 bytes
    # (Vulkan fill/copy granularity).
    return max(4, (nbytes + 3) & ~3)


def _direct_mappable_ok(device: rt.HalDevice) -> bool:
    key = id(device)
    if key not in _direct_ok_cache:
        compat = device.allocator.query_buffer_compatibility(
            memory_type=_DEVICE_MT,
            allowed_usage=_MAPPABLE_DEVICE_USAGE,
            intended_usage=_MAPPABLE_DEVICE_USAGE,
            allocation_size=4096,
        )
        ok = bool(compat & int(_BC.ALLOCATABLE)) and bool(compat & int(_BC.QUEUE_DISPATCH))
        if ok:
            # Double-check the buffer really comes back host visible + mappable.
            try:
                b = device.allocator.allocate_buffer(
                    memory_type=_DEVICE_MT,
                    allowed_usage=_MAPPABLE_DEVICE_USAGE,
                    allocation_size=16,
                )
                ok = _is_mappable(b)
            except Exception:
                ok = False
        _direct_ok_cache[key] = ok
    return _direct_ok_cache[key]


def _is_mappable(buf: rt.HalBuffer) -> bool:
    hv = int(_MT.HOST_VISIBLE)
    ms = int(_BU.MAPPING_SCOPED)
    return (buf.memory_type() & hv) == hv and (buf.allowed_usage() & ms) == ms


def _write_mapped(buf: rt.HalBuffer, host: np.ndarray) -> None:
    mapped = buf.map()
    view = mapped.asarray([host.nbytes], np.dtype(np.uint8))
    view[...] = host.reshape(-1).view(np.uint8)
    del view, mapped  # unmap (flushes if non-coherent)


def _queue_copy_wait(device: rt.HalDevice, src: rt.HalBuffer, dst: rt.HalBuffer) -> None:
    sem = device.create_semaphore(0)
    device.queue_copy(
        src,
        dst,
        wait_semaphores=rt.HalFence.create_at(sem, 0),
        signal_semaphores=rt.HalFence.create_at(sem, 1),
    )
    rt.HalFence.create_at(sem, 1).wait()


def to_device(device, array) -> rt.DeviceArray:
    """Copy a NumPy array into a new device buffer (no host-pointer import)."""
    device = _device_of(device)
    host = np.asarray(array, order="C")  # keeps 0-d shape (ascontiguousarray would make it 1-d)
    if host.dtype == np.bool_:
        storage = host.view(np.uint8)  # i1 is stored as i8
    else:
        storage = host
    et = map_dtype_to_hal_element_type(host.dtype)
    if et is None:
        raise TypeError(f"dtype {host.dtype} has no IREE HAL element type")
    nbytes = storage.nbytes
    size = _alloc_size(nbytes)
    alloc = device.allocator

    if _direct_mappable_ok(device):
        buf = alloc.allocate_buffer(
            memory_type=_DEVICE_MT, allowed_usage=_MAPPABLE_DEVICE_USAGE, allocation_size=size
        )
        if nbytes:
            _write_mapped(buf, storage)
    else:
        buf = alloc.allocate_buffer(
            memory_type=_DEVICE_MT, allowed_usage=_PLAIN_DEVICE_USAGE, allocation_size=size
        )
        staging = alloc.allocate_buffer(
            memory_type=_STAGING_MT, allowed_usage=_UPLOAD_STAGING_USAGE, allocation_size=size
        )
        if nbytes:
            _write_mapped(staging, storage)
        _queue_copy_wait(device, staging, buf)

    bv = rt.HalBufferView(buf, list(host.shape), et)
    return rt.DeviceArray(device, bv, implicit_host_transfer=False, override_dtype=host.dtype)


def zeros(device, shape, dtype) -> rt.DeviceArray:
    """A zero-filled device array, filled where it lives when the driver maps device memory (no
    host copy of its size: a decoder's cache can be most of a process's memory)."""
    device = _device_of(device)
    dtype = np.dtype(dtype)
    if not _direct_mappable_ok(device):
        return to_device(device, np.zeros(shape, dtype))
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = device.allocator.allocate_buffer(
        memory_type=_DEVICE_MT, allowed_usage=_MAPPABLE_DEVICE_USAGE, allocation_size=_alloc_size(nbytes))
    buf.fill_zero(0, _alloc_size(nbytes))
    et = map_dtype_to_hal_element_type(dtype)
    bv = rt.HalBufferView(buf, list(shape), et)
    return rt.DeviceArray(device, bv, implicit_host_transfer=False, override_dtype=dtype)


def to_host(device, result) -> np.ndarray:
    """Read a DeviceArray / HalBufferView (e.g. a function result) into a fresh ndarray."""
    device = _device_of(device)
    if isinstance(result, np.ndarray):
        return np.array(result, copy=True)
    override = None
    if isinstance(result, rt.DeviceArray):
        bv = result._buffer_view
        override = result._override_dtype
    elif isinstance(result, rt.HalBufferView):
        bv = result
    else:
        raise TypeError(f"to_host: unsupported result type {type(result)}")

    shape = tuple(bv.shape)
    raw_dtype = np.dtype(rt.HalElementType.map_to_dtype(bv.element_type))
    want = np.dtype(override) if override is not None else raw_dtype
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = count * raw_dtype.itemsize
    src = bv.get_buffer()  # may be larger than nbytes (padding); data starts at 0
    # No extra sync needed: default (sync-ABI) IREE functions wait for their own
    # completion before returning. For async-ABI ("coarse-fences") functions,
    # wait on the signal fence you passed before calling to_host.

    if _is_mappable(src):
        mapped = src.map()
        flat = np.array(mapped.asarray([nbytes], np.dtype(np.uint8)), copy=True)
        del mapped
    else:
        staging = device.allocator.allocate_buffer(
            memory_type=_STAGING_MT,
            allowed_usage=_DOWNLOAD_STAGING_USAGE,
            allocation_size=_alloc_size(src.byte_length()),
        )
        _queue_copy_wait(device, src, staging)
        mapped = staging.map()
        flat = np.array(mapped.asarray([nbytes], np.dtype(np.uint8)), copy=True)
        del mapped

    out = flat.view(raw_dtype).reshape(shape)
    if want == np.bool_ and raw_dtype != np.bool_:
        out = out != 0
    elif want == np.bool_:
        out = out.view(np.uint8) != 0  # normalise any nonzero byte to True
    elif want != raw_dtype:
        out = out.astype(want)
    return out
