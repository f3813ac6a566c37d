"""The compressed file of a pruned, weight-shared model: Deep Compression's storage format
(Han, Mao & Dally 2016): the sparse pattern as relative indices with filler entries, shared
weights as codebook indices, and both sequences Huffman-coded (the gaps Rice-coded where that
is smaller, from version 5 on; from version 6 on, only the biases of units that keep a weight).

Byte-level specification, format versions 1 to 6
=================================================
All integers are unsigned little-endian (u8, u16, u32); floats are IEEE-754 binary32 (f32) or,
for codebooks and biases from version 4 on, binary16 (f16), little-endian. A "string" is a u16 byte
length followed by that many bytes of UTF-8.

File::

    magic         8 bytes   b"HANPRUNE"
    version       u16       6 (written); 1 to 5 are read too
    total_length  u32       length of the whole file in bytes, this field and the CRC included
    model_key     string
    arch          string    (versions 3 to 6) the architecture: a built-in name or package.module:Class
    kwargs        string    (versions 3 to 6) the keyword arguments of arch's class, a JSON object (RFC 8259);
                            written with its keys sorted and no whitespace
    n_layers      u16
    layer         n_layers times, in the model's order (names are unique)
    n_other       u16       (versions 2 to 6) then n_other Other records
    crc           u32       zlib.crc32 of every byte before it

Version 1 has neither arch, kwargs nor other tensors; version 2 adds the other tensors; version 3
names the architecture, so that the model is made from the file alone; version 4 stores a layer's
codebook and bias in half precision where that loses nothing (the encoder writes f16 only for
values that f16 holds exactly, so every version decodes to the tensors that were encoded). Version
5 stores only the codebook entries a layer uses, in the order of their codes, so that the symbol
code needs no table, and may code the gaps with a Rice code, which needs none either; it decodes
to the same weights, with the codes numbered in that order. Version 6 may store a layer's bias
for the units in use only (Unit bias, below): a unit whose connections are all pruned costs no
bytes. For a file of version 1 or 2 the
reader has to know the architecture (hanprune takes the model key for a built-in one).

Other (versions 2 to 6): a tensor of the model's state that is not a pruned layer's weight or bias,
stored as it is (batch norm's scale, shift and running statistics, say)::

    name          string          its state_dict key
    dtype         u8              0 = f32, 1 = i64 (little-endian)
    ndim          u8
    dims          ndim x u32
    data          the N values (N the product of dims, 1 for ndim 0)

Layer::

    name          string
    ndim          u8
    dims          ndim x u32      the weight's shape; its size N is the product (1 for ndim 0)
    k             u32             codebook size, 0..65536
    codebook_type u8              (versions 4 to 6) 0 = f32, 1 = f16
    codebook      k x f32 (f16 if codebook_type is 1)   the shared weight values
    index_bits    u8              b, 1..16
    n_entries     u32             number of (gap, symbol) entries, fillers included
    symbols       Huffman section over the alphabet 0..k         (k = FILLER); versions 5, 6: Symbol section
    gaps          Huffman section over the alphabet 0..2**b - 1; versions 5, 6: Gap section
    bias_type     u8              0 = no bias, 1 = f32, 2 = f16 (2 from version 4 on);
                                  3 = f32, 4 = f16 of the units in use only (version 6)
    bias          bias_type 1, 2: u32 n, then n values of that type
                  bias_type 3, 4: Unit bias

Sparse layout. The weight is flattened row-major (C order) into N positions; position p holds
code c_p, with c_p = -1 for a pruned weight. Each entry is a pair (gap, symbol). Reading the
entries in order with a cursor starting at -1, an entry lands at position cursor + gap + 1 and
moves the cursor there (so the first entry's gap is its position counted from 0). A symbol s < k
puts code s at that position: weight = codebook[s]. The symbol FILLER = k stands for a pruned
weight; the encoder emits a filler (gap 2**b - 1) whenever the distance to the next surviving
weight does not fit in b bits: a surviving weight with g pruned positions before it is preceded by
g >> b fillers and stored with gap g & (2**b - 1). Positions never landed on, or landed on by a
filler, are pruned. Every entry must land at a position < N. The encoder picks, for each layer,
the b that makes the two Huffman sections smallest in bytes (the smallest such b on a tie).

Huffman section, for an alphabet of A symbols (A = k + 1 for symbols, 2**b for gaps)::

    max_length    u8              L, the longest code length, 0..31 (0 only if n_entries is 0)
    counts        L x uW          counts[i] = number of symbols whose code has length i + 1
    table         sum(counts) x uW   the symbols in canonical order, each < A
    n_bits        u32             length of the coded stream in bits
    stream        ceil(n_bits / 8) bytes

uW is an unsigned integer of W bytes, W the smallest of 1, 2, 4 that can hold the value A.
The table lists only the symbols that occur. The code is canonical: starting with c = 0, for each
length l = 1..L in turn, the next counts[l-1] symbols of the table get the l-bit codes c, c + 1,
..., c advancing past them, and then c is doubled. (A lone symbol gets the 1-bit code 0.) The
code need not be complete: the fixed-width variant (encode(huffman=False), every symbol present
at ceil(log2(A)) bits) is a section like any other. The
stream is the n_entries codes concatenated, each written most significant bit first, packed
into bytes most significant bit first; the padding bits of the last byte are zero. With
n_entries = 0 the table is empty (L = 0) and n_bits is 0.

Unit bias (version 6). A unit is an index u along the weight's first dimension (a Linear's output
feature, a Conv2d's output channel); it is in use if one of its positions holds a weight::

    n             u32             the bias length: dims[0] (ndim >= 1)
    n_listed      u32             how many units not in use have a stored bias
    listed        n_listed x u32  those units, ascending
    values        one per unit in use or listed, in unit order, f32 (type 3) or f16 (type 4)

Every other unit's bias is +0.0. The encoder lists a unit not in use whose bias is not +0.0 (bit
for bit), and writes this form where it is smaller than types 1 and 2. (hanprune's encode stage
first drops dead units, hanprune/deadunits.py: that zeroes their biases.)

Symbol section (versions 5, 6): a Huffman section over the alphabet 0..k without its table::

    max_length    u8              L
    counts        L x uW          as above; they sum to k (no filler entries) or k + 1
    filler_rank   uW              r, where FILLER stands in the canonical order: k when it is absent
    n_bits, stream                as above

The table is 0, 1, ..., r - 1, FILLER, r, ..., k - 1, cut to sum(counts) symbols: codebook entry s
has the (s + 1)-th code in canonical order (the (s + 2)-th from the filler on). The encoder
numbers the entries a layer uses so (the canonical order lists shorter codes first) and drops
the rest, so the codebook costs nothing for a value no weight takes and the table costs nothing.

Gap section (versions 5, 6)::

    rice          u8              0: a Huffman section over 0..2**b - 1 follows (table and all);
                                  m + 1 (m in 0..b): a Rice code with parameter m, and only
    n_bits, stream                as above

The Rice code with parameter m (Golomb 1966; Rice 1979) gives gap g the length (g >> m) + 1 + m,
at most 31 bits: the canonical code of those lengths over the table 0, 1, ..., 2**b - 1, that is
g >> m one-bits, a zero bit, then the low m bits of g. Gaps between surviving weights are close to
geometric, for which it is near optimal, and it needs no table. The encoder takes, per layer, the
index bits, the gap code and m that make the layer smallest.

Checks. `decode` raises an EncodingError with one message for anything wrong with a file. It
checks, in order, so that each problem gets its own message: the magic, the version, the file
length against total_length (truncated file or trailing bytes), the CRC, and then, field by
field, that the body is consistent: every field inside the file, kwargs a JSON object, known
values (index bits, codebook and bias types, code lengths of at most 31 bits, codebook size, the
Rice parameter, counts that fit the codebook), table symbols inside their alphabet,
streams decoding to exactly n_entries codes, entries inside the layer, unique layer names, and
no bytes left between the last layer and the CRC. `encode` raises an EncodingError if a layer is
malformed (codes outside -1..k-1, a codebook that is not 1-D float32, ...) or does not fit the
format's fields (e.g. more than 65535 layers), or kwargs that JSON does not give back as they are.
"""
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from bitarray import bitarray, frozenbitarray
from bitarray.util import canonical_decode, canonical_huffman

from .errors import HanpruneError
from .finite import nonfinite
from .models import ModelError, architecture, make
from .quantize import QuantizedLayer, load_into, other_state  # noqa: F401 (QuantizedLayer: the file's layers)

MAGIC = b"HANPRUNE"
FORMAT_VERSION = 6  # the version this code writes, and the newest it reads
OTHER_DTYPES = {0: "<f4", 1: "<i8"}
CODEBOOK_TYPES = {0: "<f4", 1: "<f2"}  # codebook_type, from version 4 on
BIAS_TYPES = {1: "<f4", 2: "<f2"}  # bias_type (0: no bias); 2 from version 4 on
UNIT_BIAS_TYPES = {3: "<f4", 4: "<f2"}  # version 6: the units in use only

MAX_CODEBOOK = 65536
INDEX_BITS = range(1, 17)
MAX_CODE_LENGTH = 31  # the longest code bitarray's canonical_decode accepts
PREAMBLE = struct.Struct("<8sHI")  # magic, version, total length
CRC_SIZE = 4
MIN_FILE_SIZE = PREAMBLE.size + 2 + 2 + CRC_SIZE  # an empty model key and no layers
U16_MAX, U32_MAX = 0xFFFF, 0xFFFFFFFF


class EncodingError(HanpruneError):
    """A model that cannot be encoded, or a file that cannot be decoded."""


@dataclass(eq=False)
class Compressed:
    """What a compressed file holds. arch and kwargs are None in a file of version 1 or 2."""
    model_key: str
    arch: str | None
    kwargs: dict | None
    layers: dict[str, QuantizedLayer]
    other: dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------- encoding

@dataclass
class _Code:
    """A canonical prefix code and what it costs for the frequencies it was built from."""
    codewords: dict  # symbol -> frozenbitarray
    counts: list[int]  # counts[l] = number of symbols with code length l; counts[0] == 0
    symbols: list[int]  # in canonical order
    n_bits: int  # length of the coded stream
    rice: int | None = None  # the Rice code's parameter m (a version 5 gap section), None for a table's code


def _width(alphabet: int) -> int:
    """Bytes per count and per symbol in a Huffman table over `alphabet` symbols."""
    return 1 if alphabet <= 0xFF else 2 if alphabet <= U16_MAX else 4


def _huffman(frequencies: np.ndarray, what: str) -> _Code:
    """The canonical Huffman code of the symbols s with frequencies[s] > 0."""
    present = np.flatnonzero(frequencies)
    if present.size == 0:
        return _Code({}, [0], [], 0)
    codewords, counts, symbols = canonical_huffman(dict(zip(present.tolist(), frequencies[present].tolist())))
    if len(counts) - 1 > MAX_CODE_LENGTH:
        raise EncodingError(f"{what}: a Huffman code is {len(counts) - 1} bits long, more than {MAX_CODE_LENGTH}")
    lengths = np.repeat(np.arange(len(counts)), counts)
    n_bits = int((frequencies[symbols] * lengths).sum())
    return _Code(codewords, counts, symbols, n_bits)


def _fixed_width(frequencies: np.ndarray, what: str) -> _Code:
    """A fixed-width code written as a canonical code the decoder reads like any other: every
    symbol present gets ceil(log2(alphabet)) bits (at least 1). Deep Compression's step before
    Huffman coding; the alphabet includes the filler symbol, so k = 2**bits shared values take
    bits + 1 bits here."""
    present = np.flatnonzero(frequencies)
    if present.size == 0:
        return _Code({}, [0], [], 0)
    length = max(1, (frequencies.size - 1).bit_length())
    codewords = {int(s): frozenbitarray(format(i, f"0{length}b")) for i, s in enumerate(present)}
    return _Code(codewords, [0] * length + [present.size], present.tolist(), int(frequencies.sum()) * length)


def _rice_counts(index_bits: int, m: int) -> list[int]:
    """counts (counts[0] == 0) of the Rice code with parameter m over 0..2**index_bits - 1."""
    return [0] * (m + 1) + [1 << m] * (((1 << index_bits) - 1 >> m) + 1)


def _rice(frequencies: np.ndarray, index_bits: int) -> _Code | None:
    """The shortest Rice code of the gaps (frequencies over 0..2**index_bits - 1) whose codes are at
    most MAX_CODE_LENGTH bits, or None if there is none."""
    gaps = np.arange(frequencies.size)  # the alphabet, 0..2**index_bits - 1
    best = None
    for m in range(index_bits + 1):
        if ((frequencies.size - 1) >> m) + 1 + m > MAX_CODE_LENGTH:
            continue
        n_bits = int((frequencies * ((gaps >> m) + 1 + m)).sum())
        if best is None or n_bits < best[0]:
            best = (n_bits, m)
    if best is None:
        return None
    n_bits, m = best
    codewords = {int(g): frozenbitarray("1" * (g >> m) + "0" + (format(g & (1 << m) - 1, f"0{m}b") if m else ""))
                 for g in np.flatnonzero(frequencies)}  # the canonical code of these lengths (module docstring)
    return _Code(codewords, _rice_counts(index_bits, m), [], n_bits, rice=m)  # its table, 0..2**b - 1, is implied


def _symbol_section_size(code: _Code, alphabet: int) -> int:
    """Bytes of a symbol section (version 5): max length, counts, filler rank, bit count, stream."""
    return 1 + len(code.counts) * _width(alphabet) + 4 + (code.n_bits + 7) // 8  # L counts and the rank


def _gap_section_size(code: _Code, alphabet: int) -> int:
    """Bytes of a gap section (version 5): the Rice byte, then the table's section or the stream."""
    table = 0 if code.rice is not None else 1 + (len(code.counts) - 1 + len(code.symbols)) * _width(alphabet)
    return 1 + table + 4 + (code.n_bits + 7) // 8


def _layer_codes(symbols: np.ndarray, skipped: np.ndarray, k: int, index_bits: int | None, huffman: bool,
                 what: str) -> tuple[int, _Code, _Code]:
    """(index bits, symbol code, gap code) of a layer: with `index_bits` if given, else with the
    index bits that make the two sections smallest (the smallest such on a tie). huffman: Huffman
    codes, and a Rice code for the gaps where it is smaller; else fixed-width codes.
    symbols: the codes of the surviving weights; skipped: the pruned positions before each."""
    make_code = _huffman if huffman else _fixed_width
    symbol_counts = np.bincount(symbols, minlength=k + 1)
    symbol_codes = {}  # by number of fillers, the only thing the index bits change in the symbols
    best = None
    for bits in INDEX_BITS if index_bits is None else [index_bits]:
        max_gap = (1 << bits) - 1
        n_fillers = int((skipped >> bits).sum())
        if n_fillers not in symbol_codes:
            symbol_frequencies = symbol_counts.copy()
            symbol_frequencies[k] += n_fillers
            symbol_codes[n_fillers] = make_code(symbol_frequencies, what)
        gap_frequencies = np.bincount(skipped & max_gap, minlength=max_gap + 1)
        gap_frequencies[max_gap] += n_fillers
        gap_codes = [make_code(gap_frequencies, what)] + ([_rice(gap_frequencies, bits)] if huffman else [])
        gap_code = min((c for c in gap_codes if c is not None), key=lambda c: _gap_section_size(c, max_gap + 1))
        size = _symbol_section_size(symbol_codes[n_fillers], k + 1) + _gap_section_size(gap_code, max_gap + 1)
        if best is None or size < best[0]:
            best = (size, bits, symbol_codes[n_fillers], gap_code)
    return best[1:]


def _symbol_table(rank: int, k: int, n: int) -> list[int]:
    """A version 5 symbol code's table (module docstring): 0..k-1 with the filler k at `rank`, cut to n."""
    return [*range(rank), k, *range(rank, k)][:n]


def _canonical_numbering(code: _Code, k: int) -> tuple[np.ndarray, int, _Code]:
    """Renumber a symbol code over k entries, all present, and the filler k, so that entry s has
    the code of canonical rank s (s + 1 from the filler on): (order, filler rank, the code), with
    order[new number] = the old one."""
    rank = code.symbols.index(k) if k in code.symbols else k
    order = np.asarray([s for s in code.symbols if s != k], dtype=np.int64)
    codewords = {new: code.codewords[old] for new, old in enumerate(order.tolist())}
    if k in code.codewords:
        codewords[k] = code.codewords[k]
    return order, rank, _Code(codewords, code.counts, _symbol_table(rank, k, len(code.symbols)), code.n_bits)


def _entries(symbols: np.ndarray, skipped: np.ndarray, k: int, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The (symbol, gap) entries, fillers included, of the surviving weights."""
    max_gap = (1 << index_bits) - 1
    real = np.cumsum((skipped >> index_bits) + 1) - 1  # where each surviving weight's entry goes
    n_entries = int(real[-1]) + 1 if real.size else 0
    entry_symbols = np.full(n_entries, k, dtype=np.int64)
    entry_gaps = np.full(n_entries, max_gap, dtype=np.int64)
    entry_symbols[real] = symbols
    entry_gaps[real] = skipped & max_gap
    return entry_symbols, entry_gaps


def _pack_string(text: str, what: str) -> bytes:
    raw = text.encode()
    if len(raw) > U16_MAX:
        raise EncodingError(f"{what} is {len(raw)} bytes of UTF-8, more than {U16_MAX}")
    return struct.pack("<H", len(raw)) + raw


def _pack_u32(value: int, what: str) -> bytes:
    if value > U32_MAX:
        raise EncodingError(f"{what} is {value}, more than a u32 holds")
    return struct.pack("<I", value)


def _pack_stream(entries: np.ndarray, code: _Code, what: str) -> bytes:
    stream = bitarray(endian="big")
    if entries.size:
        stream.encode(code.codewords, entries.tolist())
    return _pack_u32(len(stream), f"{what} stream length") + stream.tobytes()


def _pack_counts(code: _Code, alphabet: int) -> bytes:
    return struct.pack("<B", len(code.counts) - 1) + np.asarray(code.counts[1:], f"<u{_width(alphabet)}").tobytes()


def _pack_symbols(entries: np.ndarray, code: _Code, rank: int, k: int, what: str) -> bytes:
    return _pack_counts(code, k + 1) + np.asarray([rank], f"<u{_width(k + 1)}").tobytes() + _pack_stream(entries, code, what)


def _pack_gaps(entries: np.ndarray, code: _Code, alphabet: int, what: str) -> bytes:
    if code.rice is not None:
        return struct.pack("<B", code.rice + 1) + _pack_stream(entries, code, what)
    return b"".join([struct.pack("<B", 0), _pack_counts(code, alphabet),
                     np.asarray(code.symbols, f"<u{_width(alphabet)}").tobytes(), _pack_stream(entries, code, what)])


def _checked_arrays(name: str, layer: QuantizedLayer) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The layer's codes (int64), codebook and bias (float32) as numpy arrays, after checking them."""
    what = f"layer {name!r}"
    if layer.codes.dtype.is_floating_point or layer.codes.dtype.is_complex or layer.codes.dtype == torch.bool:
        raise EncodingError(f"{what}: codes must be integers, got {layer.codes.dtype}")
    if layer.codebook.dtype != torch.float32 or layer.codebook.dim() != 1:
        raise EncodingError(f"{what}: codebook must be 1-D float32, got {layer.codebook.dtype} "
                            f"of shape {tuple(layer.codebook.shape)}")
    if layer.bias is not None and (layer.bias.dtype != torch.float32 or layer.bias.dim() != 1):
        raise EncodingError(f"{what}: bias must be 1-D float32 or None, got {layer.bias.dtype} "
                            f"of shape {tuple(layer.bias.shape)}")
    codes = layer.codes.detach().cpu().numpy().astype(np.int64)
    k = layer.codebook.numel()
    if k > MAX_CODEBOOK:
        raise EncodingError(f"{what}: codebook has {k} entries, more than {MAX_CODEBOOK}")
    if codes.size and (codes.min() < -1 or codes.max() >= k):
        raise EncodingError(f"{what}: codes must be -1 (pruned) or 0..{k - 1} for a {k}-entry codebook, "
                            f"found {codes.min()}..{codes.max()}")
    if codes.ndim > 0xFF or any(d > U32_MAX for d in codes.shape):
        raise EncodingError(f"{what}: shape {codes.shape} does not fit the format (at most 255 dims < 2**32)")
    bias = None if layer.bias is None else layer.bias.detach().cpu().numpy()
    return codes, layer.codebook.detach().cpu().numpy(), bias


def _narrowest(values: np.ndarray, types: dict[int, str]) -> int:
    """The code of the narrowest float type in `types` (f32 among them) that holds every value exactly."""
    with np.errstate(over="ignore"):  # a value past float16's range becomes inf: not exact, so f32
        exact = [c for c, t in types.items()
                 if np.array_equal(values.astype(t).astype(np.float32), values, equal_nan=True)]
    return min(exact, key=lambda c: np.dtype(types[c]).itemsize)


def _encode_layer(name: str, layer: QuantizedLayer, index_bits: int | None, huffman: bool) -> bytes:
    what = f"layer {name!r}"
    codes, codebook, bias = _checked_arrays(name, layer)
    flat = codes.reshape(-1)
    positions = np.flatnonzero(flat >= 0)
    used, symbols = np.unique(flat[positions], return_inverse=True)  # the entries used, numbered 0..k-1
    codebook, k = codebook[used], used.size
    skipped = np.diff(positions, prepend=-1) - 1
    index_bits, symbol_code, gap_code = _layer_codes(symbols, skipped, k, index_bits, huffman, what)
    order, rank, symbol_code = _canonical_numbering(symbol_code, k)
    codebook, symbols = codebook[order], np.argsort(order)[symbols]
    entry_symbols, entry_gaps = _entries(symbols, skipped, k, index_bits)
    codebook_type = _narrowest(codebook, CODEBOOK_TYPES)
    parts = [_pack_string(name, f"{what}: the name"), struct.pack("<B", codes.ndim),
             np.asarray(codes.shape, "<u4").tobytes(), struct.pack("<IB", k, codebook_type),
             codebook.astype(CODEBOOK_TYPES[codebook_type]).tobytes(),
             struct.pack("<B", index_bits), _pack_u32(entry_symbols.size, f"{what}: the number of entries"),
             _pack_symbols(entry_symbols, symbol_code, rank, k, f"{what}: symbol"),
             _pack_gaps(entry_gaps, gap_code, 1 << index_bits, f"{what}: gap")]
    return b"".join(parts + [_pack_bias(bias, codes, what)])


def _pack_bias(bias: np.ndarray | None, codes: np.ndarray, what: str) -> bytes:
    """The bias type and bias: the full bias, or the units in use only (Unit bias) where that is smaller."""
    if bias is None:
        return struct.pack("<B", 0)
    bias_type = _narrowest(bias, BIAS_TYPES)
    full = struct.pack("<B", bias_type) + _pack_u32(bias.size, f"{what}: bias length") + \
        bias.astype(BIAS_TYPES[bias_type]).tobytes()
    if codes.ndim == 0 or codes.shape[0] != bias.size or bias.size == 0:
        return full
    in_use = (codes.reshape(bias.size, -1) >= 0).any(1)
    nonzero = bias.view(np.uint32) != 0  # -0.0 too: the decoder gives +0.0
    listed = np.flatnonzero(~in_use & nonzero)
    stored = bias[in_use | nonzero]
    bias_type = {1: 3, 2: 4}[_narrowest(stored, BIAS_TYPES)]  # the unit form of that float type
    units = b"".join([struct.pack("<BII", bias_type, bias.size, listed.size), listed.astype("<u4").tobytes(),
                      stored.astype(UNIT_BIAS_TYPES[bias_type]).tobytes()])
    return units if len(units) < len(full) else full


def _pack_other(name: str, t: torch.Tensor) -> bytes:
    a = t.detach().cpu().numpy()
    code = next((c for c, kind in OTHER_DTYPES.items() if np.dtype(kind) == a.dtype), None)
    if code is None:
        raise EncodingError(f"tensor {name!r}: dtype {a.dtype} is not float32 or int64")
    if a.ndim > 255:
        raise EncodingError(f"tensor {name!r}: {a.ndim} dimensions, more than 255")
    return b"".join([_pack_string(name, "a tensor name"), struct.pack("<BB", code, a.ndim),
                     *(_pack_u32(d, f"tensor {name!r}: a dimension") for d in a.shape),
                     a.astype(OTHER_DTYPES[code]).tobytes()])


def _pack_kwargs(kwargs: dict) -> bytes:
    try:
        text = json.dumps(kwargs, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise EncodingError(f"kwargs {kwargs!r} are not JSON: {e}") from None
    if json.loads(text) != kwargs:
        raise EncodingError(f"kwargs {kwargs!r} do not come back from JSON as they are (as {text}); use "
                            "string keys, and numbers, strings, booleans, None, lists and dicts")
    return _pack_string(text, "the kwargs")


def encode(model_key: str, arch: str, kwargs: dict, layers: dict[str, QuantizedLayer],
           index_bits: int | None = None, huffman: bool = True, other: dict[str, torch.Tensor] | None = None) -> bytes:
    """The compressed file (format version 6, above) of model `model_key`, made by `arch` with
    `kwargs` (models.make): its quantized layers and its `other` tensors, if any. `index_bits`
    forces the gap width of every layer (for experiments); by default each layer gets its smallest.
    huffman=False writes fixed-width codes instead (and no Rice code), in the same format (decode
    reads both). A layer decodes to the same weights with its codes renumbered (see version 5)."""
    if index_bits is not None and index_bits not in INDEX_BITS:
        raise EncodingError(f"index_bits must be in 1..16, got {index_bits}")
    if len(layers) > U16_MAX:
        raise EncodingError(f"{len(layers)} layers, more than {U16_MAX}")
    other = other or {}
    if len(other) > U16_MAX:
        raise EncodingError(f"{len(other)} other tensors, more than {U16_MAX}")
    body = b"".join([_pack_string(model_key, "the model key"), _pack_string(arch, "the arch"), _pack_kwargs(kwargs),
                     struct.pack("<H", len(layers)),
                     *(_encode_layer(name, layer, index_bits, huffman) for name, layer in layers.items()),
                     struct.pack("<H", len(other)), *(_pack_other(k, t) for k, t in other.items())])
    total_length = PREAMBLE.size + len(body) + CRC_SIZE
    head = MAGIC + struct.pack("<H", FORMAT_VERSION) + _pack_u32(total_length, "the file length")
    data = head + body
    return data + struct.pack("<I", zlib.crc32(data))


# ----------------------------------------------------------------------------------- decoding

class _Reader:
    """Reads fields in order from data[offset:end]; running past `end` is an EncodingError."""

    def __init__(self, data: bytes, offset: int, end: int):
        self.data, self.offset, self.end = data, offset, end

    def take(self, n: int, what: str) -> bytes:
        if n > self.end - self.offset:
            raise EncodingError(f"corrupt file: {what} ({n} bytes at offset {self.offset}) runs past the end "
                                f"of the data ({self.end - self.offset} bytes left)")
        self.offset += n
        return self.data[self.offset - n:self.offset]

    def uint(self, width: int, what: str) -> int:
        return int.from_bytes(self.take(width, what), "little")

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        itemsize = np.dtype(dtype).itemsize
        return np.frombuffer(self.take(count * itemsize, what), dtype).astype(dtype.replace("<", "="))

    def string(self, what: str) -> str:
        raw = self.take(self.uint(2, f"{what} length"), what)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise EncodingError(f"corrupt file: {what} is not valid UTF-8") from None


def _check_preamble(data: bytes) -> None:
    """Magic, version and length, in that order, each with its own message; then the CRC."""
    if not data:
        raise EncodingError("empty file: not a hanprune compressed model")
    head = data[:len(MAGIC)]
    if head != MAGIC[:len(head)]:
        raise EncodingError(f"not a hanprune compressed model (magic {head!r}, expected {MAGIC!r})")
    if len(data) >= len(MAGIC) + 2:
        version = struct.unpack_from("<H", data, len(MAGIC))[0]
        if version > FORMAT_VERSION:
            raise EncodingError(f"file has format version {version}, newer than this reader supports "
                                f"(version {FORMAT_VERSION}); upgrade hanprune")
        if version == 0:
            raise EncodingError(f"unknown format version 0 (this reader supports versions 1 to {FORMAT_VERSION})")
    if len(data) < MIN_FILE_SIZE:
        raise EncodingError(f"truncated file: {len(data)} bytes, a compressed model has at least {MIN_FILE_SIZE}")
    total_length = PREAMBLE.unpack_from(data)[2]
    if total_length < MIN_FILE_SIZE:
        raise EncodingError(f"corrupt header: total length {total_length} is less than the minimum {MIN_FILE_SIZE}")
    if len(data) < total_length:
        raise EncodingError(f"truncated file: {len(data)} bytes, the header says {total_length}")
    if len(data) > total_length:
        raise EncodingError(f"{len(data) - total_length} trailing bytes after the compressed model "
                            f"(the header says {total_length} bytes, the file has {len(data)})")
    stored = struct.unpack_from("<I", data, len(data) - CRC_SIZE)[0]
    actual = zlib.crc32(data[:-CRC_SIZE])
    if stored != actual:
        raise EncodingError(f"checksum mismatch: the file says CRC32 {stored:#010x}, its contents give "
                            f"{actual:#010x}; the file is corrupt")


def _read_counts(reader: _Reader, alphabet: int, what: str) -> list[int]:
    """A section's counts, counts[l] for code lengths l = 1..max_length."""
    max_length = reader.uint(1, f"{what} code length")
    if max_length > MAX_CODE_LENGTH:
        raise EncodingError(f"corrupt file: {what} codes up to {max_length} bits long, more than {MAX_CODE_LENGTH}")
    return reader.array(f"<u{_width(alphabet)}", max_length, f"{what} code counts").tolist()


def _read_stream(reader: _Reader, n_entries: int, counts: list[int], table: list[int], what: str) -> np.ndarray:
    """The n_entries symbols of a section's stream, coded with the canonical code of counts and table."""
    n_bits = reader.uint(4, f"{what} stream length")
    stream = bitarray(endian="big")
    stream.frombytes(reader.take((n_bits + 7) // 8, f"{what} stream"))
    if stream[n_bits:].any():
        raise EncodingError(f"corrupt file: {what} stream has non-zero padding bits")
    del stream[n_bits:]
    try:
        decoded = list(canonical_decode(stream, [0, *counts], table)) if n_bits else []
    except ValueError as e:
        raise EncodingError(f"corrupt file: {what} stream does not decode ({e})") from None
    if len(decoded) != n_entries:
        raise EncodingError(f"corrupt file: {what} stream holds {len(decoded)} entries, the layer says {n_entries}")
    return np.asarray(decoded, dtype=np.int64)


def _read_section(reader: _Reader, n_entries: int, alphabet: int, what: str) -> np.ndarray:
    """The n_entries symbols of a Huffman section (with its table)."""
    counts = _read_counts(reader, alphabet, what)
    table = reader.array(f"<u{_width(alphabet)}", sum(counts), f"{what} code table")
    if table.size and table.max() >= alphabet:
        raise EncodingError(f"corrupt file: {what} symbol {table.max()} out of range 0..{alphabet - 1}")
    return _read_stream(reader, n_entries, counts, table.tolist(), what)


def _read_symbols(reader: _Reader, n_entries: int, k: int, what: str) -> np.ndarray:
    """The n_entries symbols of a version 5 symbol section (its table implied by the filler's rank)."""
    counts = _read_counts(reader, k + 1, what)
    rank = reader.uint(_width(k + 1), f"{what} filler rank")
    if sum(counts) not in (k, k + 1):
        raise EncodingError(f"corrupt file: {what} counts sum to {sum(counts)}, expected the codebook's {k} "
                            f"(or {k + 1} with the filler)")
    if rank > k or (sum(counts) == k and rank != k):
        raise EncodingError(f"corrupt file: {what} filler rank {rank}, expected 0..{k} (and {k} with no fillers)")
    return _read_stream(reader, n_entries, counts, _symbol_table(rank, k, sum(counts)), what)


def _read_gaps(reader: _Reader, n_entries: int, index_bits: int, what: str) -> tuple[np.ndarray, int | None]:
    """The n_entries gaps of a version 5 gap section, and its Rice parameter (None for a table's code)."""
    alphabet = 1 << index_bits
    rice = reader.uint(1, f"{what} Rice parameter")
    if rice == 0:
        return _read_section(reader, n_entries, alphabet, what), None
    m = rice - 1
    if m > index_bits or ((alphabet - 1) >> m) + 1 + m > MAX_CODE_LENGTH:
        raise EncodingError(f"corrupt file: {what} Rice parameter {m} with {index_bits} index bits; allowed "
                            f"0..{index_bits}, with codes of at most {MAX_CODE_LENGTH} bits")
    return _read_stream(reader, n_entries, _rice_counts(index_bits, m)[1:], list(range(alphabet)), what), m


def _place(entry_symbols: np.ndarray, entry_gaps: np.ndarray, k: int, size: int, what: str) -> np.ndarray:
    """The flat codes (-1 = pruned) the entries describe."""
    positions = np.cumsum(entry_gaps + 1) - 1
    if positions.size and positions[-1] >= size:
        raise EncodingError(f"corrupt file: {what} has an entry at position {positions[-1]}, past its {size} weights")
    codes = np.full(size, -1, dtype=np.int64)
    real = entry_symbols != k
    codes[positions[real]] = entry_symbols[real]
    return codes


def _read_type(reader: _Reader, types: dict[int, str], what: str) -> str:
    code = reader.uint(1, what)
    if code not in types:
        raise EncodingError(f"corrupt file: {what} is {code}, expected one of {sorted(types)}")
    return types[code]


def _read_layer(reader: _Reader, version: int) -> tuple[str, QuantizedLayer, dict]:
    """One layer, and its row of `describe`."""
    start = reader.offset
    name = reader.string("layer name")
    what = f"layer {name!r}"
    shape = tuple(reader.array("<u4", reader.uint(1, f"{what} ndim"), f"{what} shape").tolist())
    size = int(np.prod(shape, dtype=object))
    k = reader.uint(4, f"{what} codebook size")
    if k > MAX_CODEBOOK:
        raise EncodingError(f"corrupt file: {what} has a {k}-entry codebook, more than {MAX_CODEBOOK}")
    codebook_start = reader.offset
    codebook_type = _read_type(reader, CODEBOOK_TYPES, f"{what} codebook type") if version >= 4 else "<f4"
    codebook = reader.array(codebook_type, k, f"{what} codebook").astype(np.float32)
    bytes_codebook = 4 + reader.offset - codebook_start  # with k
    index_bits = reader.uint(1, f"{what} index bits")
    if index_bits not in INDEX_BITS:
        raise EncodingError(f"corrupt file: {what} has {index_bits} index bits, allowed 1..16")
    n_entries = reader.uint(4, f"{what} number of entries")
    symbols_start = reader.offset
    entry_symbols = (_read_symbols(reader, n_entries, k, f"{what} code") if version >= 5
                     else _read_section(reader, n_entries, k + 1, f"{what} code"))
    gaps_start = reader.offset
    entry_gaps, rice = (_read_gaps(reader, n_entries, index_bits, f"{what} gap") if version >= 5
                        else (_read_section(reader, n_entries, 1 << index_bits, f"{what} gap"), None))
    bytes_codes, bytes_index = gaps_start - symbols_start, reader.offset - gaps_start
    codes = _place(entry_symbols, entry_gaps, k, size, what)
    bias_start = reader.offset
    bias = _read_bias(reader, what, version, codes.reshape(shape))
    layer = QuantizedLayer(codes=torch.from_numpy(codes.reshape(shape)), codebook=torch.from_numpy(codebook),
                           bias=None if bias is None else torch.from_numpy(bias))
    row = {"layer": name, "shape": shape, "nonzero": int((codes >= 0).sum()), "entries": n_entries,
           "index_bits": index_bits, "gap_code": "huffman" if rice is None else f"rice {rice}", "codebook_size": k,
           "bytes_codes": bytes_codes, "bytes_index": bytes_index,
           "bytes_codebook": bytes_codebook, "bytes_bias": reader.offset - bias_start,
           "bytes_total": reader.offset - start}
    return name, layer, row


def _read_bias(reader: _Reader, what: str, version: int, codes: np.ndarray) -> np.ndarray | None:
    types = {0: None, **(BIAS_TYPES if version >= 4 else {1: "<f4"})}
    code = reader.uint(1, f"{what} bias type")
    if version >= 6 and code in UNIT_BIAS_TYPES:
        return _read_unit_bias(reader, what, UNIT_BIAS_TYPES[code], codes)
    if code not in types:
        allowed = sorted(types) + (sorted(UNIT_BIAS_TYPES) if version >= 6 else [])
        raise EncodingError(f"corrupt file: {what} bias type is {code}, expected one of {allowed}")
    if types[code] is None:
        return None
    return reader.array(types[code], reader.uint(4, f"{what} bias length"), f"{what} bias").astype(np.float32)


def _read_unit_bias(reader: _Reader, what: str, dtype: str, codes: np.ndarray) -> np.ndarray:
    """A Unit bias (version 6): the values of the units in use or listed; +0.0 for the others."""
    n = reader.uint(4, f"{what} bias length")
    if codes.ndim == 0 or n != codes.shape[0]:
        raise EncodingError(f"corrupt file: {what} has a bias of its units' kind with {n} values for "
                            f"{codes.shape[0] if codes.ndim else 'no'} units")
    listed = reader.array("<u4", reader.uint(4, f"{what} number of listed units"), f"{what} listed units")
    in_use = (codes >= 0).reshape(n, -1).any(1) if n else np.zeros(0, bool)
    if listed.size and (listed[-1] >= n or np.any(np.diff(listed.astype(np.int64)) <= 0) or in_use[listed].any()):
        raise EncodingError(f"corrupt file: {what} lists units {listed.tolist()[:8]} for their biases; "
                            f"expected ascending units below {n}, none of them in use")
    stored = in_use.copy()
    stored[listed] = True
    bias = np.zeros(n, np.float32)
    bias[stored] = reader.array(dtype, int(stored.sum()), f"{what} bias")
    return bias


def _read_other(reader: _Reader) -> tuple[str, torch.Tensor]:
    name = reader.string("tensor name")
    kind = reader.uint(1, f"tensor {name!r} dtype")
    if kind not in OTHER_DTYPES:
        raise EncodingError(f"corrupt file: tensor {name!r} has dtype code {kind}, expected 0 or 1")
    dims = [reader.uint(4, f"tensor {name!r} dimension") for _ in range(reader.uint(1, f"tensor {name!r} ndim"))]
    values = reader.array(OTHER_DTYPES[kind], int(np.prod(dims)), f"tensor {name!r}")
    return name, torch.from_numpy(values.reshape(dims).copy())


def _read_kwargs(reader: _Reader) -> dict:
    try:
        kwargs = json.loads(reader.string("kwargs"))
    except json.JSONDecodeError as e:
        raise EncodingError(f"corrupt file: kwargs are not JSON ({e})") from None
    if not isinstance(kwargs, dict):
        raise EncodingError(f"corrupt file: kwargs are a JSON {type(kwargs).__name__}, not an object")
    return kwargs


def _parse(data) -> tuple[Compressed, list[dict]]:
    """What the file holds, and the rows of `describe`."""
    data = bytes(data)
    _check_preamble(data)
    version = struct.unpack_from("<H", data, len(MAGIC))[0]
    reader = _Reader(data, PREAMBLE.size, len(data) - CRC_SIZE)
    model_key = reader.string("model key")
    arch, kwargs = (reader.string("arch"), _read_kwargs(reader)) if version >= 3 else (None, None)
    layers = [_read_layer(reader, version) for _ in range(reader.uint(2, "number of layers"))]
    names = [name for name, _, _ in layers]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise EncodingError(f"corrupt file: layer names {duplicates} occur more than once")
    other = {}
    if version >= 2:
        for name, tensor in (_read_other(reader) for _ in range(reader.uint(2, "number of other tensors"))):
            if name in other:
                raise EncodingError(f"corrupt file: tensor {name!r} occurs more than once")
            other[name] = tensor
    if reader.offset != reader.end:
        raise EncodingError(f"corrupt file: {reader.end - reader.offset} unread bytes after the last "
                            + ("tensor" if other else "layer"))
    compressed = Compressed(model_key, arch, kwargs, {name: layer for name, layer, _ in layers}, other)
    return compressed, [row for _, _, row in layers]


def decode(data: bytes) -> tuple[str, dict[str, QuantizedLayer]]:
    """(model key, layers in file order) of a compressed file; EncodingError if anything is wrong."""
    compressed = decode_all(data)
    return compressed.model_key, compressed.layers


def decode_all(data: bytes) -> Compressed:
    """Everything a compressed file holds: decode's key and layers, the arch and kwargs (versions 3
    to 6), the other tensors (versions 2 to 6)."""
    return _parse(data)[0]


def describe(data: bytes) -> list[dict]:
    """Per layer, where the file's bytes go: its shape, surviving weights ("nonzero"), entries
    (fillers included), index bits, the gap code ("huffman" or "rice <m>"), codebook size, and the
    bytes of the code section, the gap section, the codebook, the bias, and the whole layer record
    (name and shape included)."""
    return _parse(data)[1]


def read_compressed(path, model_key: str | None = None, arch: str | None = None,
                    kwargs: dict | None = None) -> tuple[Compressed, nn.Module]:
    """Rebuild the torch model from a compressed file (see encoding.py), made with the arch and kwargs
    the file names: (what the file holds, the model). model_key, arch and kwargs, if given, are what
    the caller expects; a file of format version 1 or 2 names no arch: it is taken to hold `arch`
    with `kwargs`, else (models.architecture) its key's built-in architecture. The Compressed
    returned names the arch and kwargs the model was made with."""
    try:
        found = decode_all(Path(path).read_bytes())
        key = found.model_key
        if model_key is not None and key != model_key:
            raise EncodingError(f"holds model {key!r}, expected {model_key!r}")
        found.arch, found.kwargs = architecture(key, found.arch, found.kwargs, arch, kwargs)
        model = load_into(make(found.arch, found.kwargs), found.layers)
        other, expected = found.other, other_state(model, model.state_dict())
        if set(other) != set(expected):
            raise EncodingError(f"holds the tensors {sorted(other)} besides its layers; {key} has {sorted(expected)}")
        for name, tensor in other.items():
            if tensor.shape != expected[name].shape:
                raise EncodingError(f"tensor {name}: shape {tuple(tensor.shape)}, {key} has {tuple(expected[name].shape)}")
        model.load_state_dict({**model.state_dict(), **other})
        if bad := nonfinite(model.state_dict()):  # a codebook or bias that was never finite, or overflowed float16
            raise EncodingError(f"refused: its decoded {bad}; the training that made it diverged (or the file "
                                "was altered)")
        return found, model
    except (EncodingError, ModelError, ValueError) as e:
        raise EncodingError(f"{path}: {e}") from None
