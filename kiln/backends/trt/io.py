"""An engine's I/O: its tensors, their profile ranges, and their host storage (bf16 and fp8 converted)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kiln.errors import KilnError

# Host storage of each TensorRT data type: numpy dtype holding its bits, and bits per element.
# bf16 travels as uint16 bit patterns and fp8 (E4M3) as uint8 codes; the runner converts them.
TRT_STORAGE: dict[str, tuple[str | None, int]] = {
    "FLOAT": ("float32", 32), "HALF": ("float16", 16), "BF16": ("uint16", 16), "INT8": ("int8", 8),
    "INT32": ("int32", 32), "INT64": ("int64", 64), "BOOL": ("bool", 8), "UINT8": ("uint8", 8),
    "FP8": ("uint8", 8), "E8M0": ("uint8", 8), "INT4": (None, 4), "FP4": (None, 4),
}


def _fp8_e4m3_table():
    """float32 value of each of the 256 FP8 E4M3FN codes (bias 7, no infinities, S.1111.111 is NaN)."""
    import numpy as np

    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp = (codes >> 3) & 0xF
    man = codes & 0x7
    value = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    value = sign * value
    value[(exp == 0xF) & (man == 0x7)] = np.nan
    return value.astype(np.float32)


def to_storage(array, dtype: str):
    """A feed as the contiguous host bits of TensorRT type ``dtype`` (a DataType member name)."""
    import numpy as np

    storage, _ = TRT_STORAGE.get(dtype, (None, 0))
    if storage is None:
        raise KilnError(f"engine I/O of type {dtype} is not supported by Kiln's runner: keep the model's "
                        f"inputs and outputs in fp32, fp16, bf16, fp8 or an integer type")
    a = np.asarray(array)
    if dtype == "BF16":
        f = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
        rounded = ((f + 0x7FFF + ((f >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest, ties to even
        nan = np.isnan(a.astype(np.float32))
        return np.where(nan, np.uint16(0x7FC0), rounded).astype(np.uint16)
    if dtype == "FP8":
        table = _fp8_e4m3_table()
        finite = np.flatnonzero(np.isfinite(table))
        order = finite[np.argsort(table[finite], kind="stable")]
        values = table[order]
        x = np.clip(np.ascontiguousarray(a, dtype=np.float32), -448.0, 448.0)  # E4M3FN saturates at 448
        hi = np.clip(np.searchsorted(values, x), 1, len(values) - 1)
        lo = hi - 1
        d_lo, d_hi = np.abs(x - values[lo]), np.abs(values[hi] - x)
        # Nearest value; a tie goes to the code with an even mantissa.
        pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & ((order[hi] & 1) == 0))
        codes = np.where(pick_hi, order[hi], order[lo]).astype(np.uint8)
        return np.where(np.isnan(a.astype(np.float32)), np.uint8(0x7F), codes).astype(np.uint8)
    return np.ascontiguousarray(a, dtype=storage)


def from_storage(raw, dtype: str):
    """Host bits of TensorRT type ``dtype`` as a numpy array of the nearest numpy type (bf16, fp8 -> float32)."""
    import numpy as np

    if dtype == "BF16":
        return (np.asarray(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype == "FP8":
        return _fp8_e4m3_table()[np.asarray(raw, dtype=np.uint8)]
    return np.asarray(raw)


def storage_nbytes(shape: Sequence[int], dtype: str) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return (n * TRT_STORAGE[dtype][1] + 7) // 8


@dataclass(frozen=True)
class TensorInfo:
    """One I/O tensor of an engine: shape -1 where dynamic; (min, opt, max) per profile for inputs."""

    name: str
    is_input: bool
    dtype: str
    shape: tuple[int, ...]
    profiles: tuple[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...] = ()


def describe_io(engine: Any, trt: Any) -> list[TensorInfo]:
    """The engine's I/O tensors in binding order, with their profile ranges."""
    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        shape = tuple(int(d) for d in engine.get_tensor_shape(name))
        profiles = ()
        if is_input:
            ranges = []
            for k in range(max(1, engine.num_optimization_profiles)):
                try:
                    dims = [tuple(int(d) for d in x) for x in engine.get_tensor_profile_shape(name, k)]
                except Exception:  # an input outside every profile (static shape)
                    dims = []
                if len(dims) != 3 or not all(dims):
                    if any(d < 0 for d in shape):
                        raise KilnError(f"engine input '{name}' has dynamic shape {list(shape)} but no profile {k}")
                    dims = [shape, shape, shape]
                ranges.append(tuple(dims))
            profiles = tuple(ranges)
        dtype = engine.get_tensor_dtype(name)
        out.append(TensorInfo(name, is_input, getattr(dtype, "name", str(dtype)), shape, profiles))
    return out


def select_profile(tensors: Sequence[TensorInfo], shapes: dict[str, Sequence[int]]) -> int:
    """The first optimization profile whose min..max range holds every input shape."""
    inputs = [t for t in tensors if t.is_input]
    missing = [t.name for t in inputs if t.name not in shapes]
    if missing:
        raise KilnError(f"no feed for engine input(s) {', '.join(missing)}")
    count = max((len(t.profiles) for t in inputs), default=0)
    for k in range(count):
        fits = True
        for t in inputs:
            lo, _, hi = t.profiles[k]
            shape = tuple(int(d) for d in shapes[t.name])
            if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
                fits = False
                break
        if fits:
            return k
    ranges = "; ".join(
        f"profile {k}: " + ", ".join(f"{t.name} {list(t.profiles[k][0])}..{list(t.profiles[k][2])}" for t in inputs)
        for k in range(count)
    )
    given = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
    raise KilnError(f"input shapes {given} fit none of the engine's optimization profiles ({ranges}): "
                    f"time batch sizes within them, or rebuild with 'devices.<d>.profiles' covering them")


def max_batch_of(tensors: Sequence[TensorInfo]) -> int | None:
    """Largest batch (axis 0) every input accepts in some profile; None for a static batch axis."""
    inputs = [t for t in tensors if t.is_input and t.shape and t.shape[0] < 0]
    if not inputs:
        return None
    count = min(len(t.profiles) for t in inputs)
    return max(min(t.profiles[k][2][0] for t in inputs) for k in range(count)) if count else None
