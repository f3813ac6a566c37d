"""The plain storage forms of a (pruned) model, each written as a real file so that the report's
Deep Compression table gives file sizes, not formulas. The compressed forms (weight sharing with
fixed-width or Huffman codes) are in encoding.py.

The files have no header: the model's architecture gives every shape (a loader fills a plain
model of it). Per prunable layer, in the model's order, all little-endian:

- dense:  the weight (row-major) then the bias, float32.
- values: the non-zero weights (row-major) then the bias, float32. This is what "pruned size"
          means in the reference implementation; without positions it cannot be loaded back.
- csr:    the weight as a (rows x rest) CSR matrix, rows = output channels / units: row pointers
          (int32, rows + 1), column indices (int32, nnz), values (float32, nnz); then the bias
          (float32).
"""
import numpy as np
import torch
from torch import nn

from .models import prunable_layers
from .errors import HanpruneError


# The file name of each form in the pipeline's storage directory (models/<model>/storage/).
FILES = {"dense": "dense.f32", "pruned_values": "values.f32", "pruned_csr": "csr.bin",
         "quantized_fixed": "fixed.bin"}


class StorageError(HanpruneError):
    pass


def _layer_arrays(model: nn.Module):
    for name, layer in prunable_layers(model).items():
        w = layer.weight.detach().cpu().reshape(layer.weight.shape[0], -1).numpy().astype("<f4")
        bias = np.zeros(0, "<f4") if layer.bias is None else layer.bias.detach().cpu().numpy().astype("<f4")
        yield name, w, bias


def dense_bytes(model: nn.Module) -> bytes:
    return b"".join(w.tobytes() + bias.tobytes() for _, w, bias in _layer_arrays(model))


def values_bytes(model: nn.Module) -> bytes:
    return b"".join(w[w != 0].tobytes() + bias.tobytes() for _, w, bias in _layer_arrays(model))


def csr_bytes(model: nn.Module) -> bytes:
    parts = []
    for _, w, bias in _layer_arrays(model):
        rows, cols = np.nonzero(w)  # row-major order
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=w.shape[0]))])
        parts += [indptr.astype("<i4").tobytes(), cols.astype("<i4").tobytes(), w[rows, cols].tobytes(), bias.tobytes()]
    return b"".join(parts)


class _Cursor:
    def __init__(self, data: bytes, what: str):
        self.data, self.offset, self.what = data, 0, what

    def take(self, dtype: str, count: int) -> np.ndarray:
        n = count * np.dtype(dtype).itemsize
        if self.offset + n > len(self.data):
            raise StorageError(f"{self.what}: {len(self.data)} bytes, too short for this model "
                               f"(needs at least {self.offset + n})")
        self.offset += n
        return np.frombuffer(self.data, dtype, count, self.offset - n)

    def done(self):
        if self.offset != len(self.data):
            raise StorageError(f"{self.what}: {len(self.data) - self.offset} bytes left over; "
                               f"the file does not match this model")


def _load(data: bytes, model: nn.Module, fmt: str, read_weight) -> nn.Module:
    """Set the prunable layers of `model` (a plain one, of the file's architecture) from the file."""
    what = f"{fmt} file of a {type(model).__name__}"
    cursor = _Cursor(data, what)
    with torch.no_grad():
        for name, layer in prunable_layers(model).items():
            rows = layer.weight.shape[0]
            rest = layer.weight[0].numel()
            w = read_weight(cursor, rows, rest, f"{what}, layer {name!r}")
            layer.weight.copy_(torch.from_numpy(w.reshape(layer.weight.shape)))
            if layer.bias is not None:
                layer.bias.copy_(torch.from_numpy(cursor.take("<f4", layer.bias.numel()).copy()))
    cursor.done()
    return model


def load_dense(data: bytes, model: nn.Module) -> nn.Module:
    return _load(data, model, "dense", lambda c, rows, rest, what: c.take("<f4", rows * rest).copy())


def load_csr(data: bytes, model: nn.Module) -> nn.Module:
    def read(cursor, rows, rest, what):
        indptr = cursor.take("<i4", rows + 1).astype(np.int64)
        if indptr[0] != 0 or (np.diff(indptr) < 0).any() or (np.diff(indptr) > rest).any():
            raise StorageError(f"{what}: row pointers are not 0, then non-decreasing by at most {rest}")
        cols = cursor.take("<i4", int(indptr[-1]))
        values = cursor.take("<f4", int(indptr[-1]))
        if cols.size and (cols.min() < 0 or cols.max() >= rest):
            raise StorageError(f"{what}: column index outside 0..{rest - 1}")
        w = np.zeros((rows, rest), np.float32)
        w[np.repeat(np.arange(rows), np.diff(indptr)), cols] = values
        return w
    return _load(data, model, "csr", read)
