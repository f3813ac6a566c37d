"""The compressed file format: exact round trips, filler entries, sizes, and one clear error per bad file."""
import hashlib
import heapq
import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hanprune.encoding import (CRC_SIZE, FORMAT_VERSION, MAGIC, EncodingError, QuantizedLayer, _huffman, decode, decode_all,
                               describe, encode)

ARCH = "nets:Net"  # the arch a file names; what it is plays no part in the format


def random_layer(shape, density, k, seed=0, bias=True) -> QuantizedLayer:
    """Codes uniform over a k-entry codebook, each weight kept with probability `density`."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, k, size=shape)
    codes[rng.random(shape) >= density] = -1
    codebook = torch.from_numpy(rng.normal(size=k).astype(np.float32))
    return QuantizedLayer(codes=torch.from_numpy(codes), codebook=codebook,
                          bias=torch.from_numpy(rng.normal(size=shape[0]).astype(np.float32)) if bias else None)


def assert_same(back: QuantizedLayer, layer: QuantizedLayer):
    """The same weights, bit for bit, from the entries the layer uses (format version 5 drops the
    others and numbers the rest anew)."""
    assert back.codes.dtype == torch.int64 and back.codebook.dtype == torch.float32
    kept = layer.codes >= 0
    assert torch.equal(back.codes >= 0, kept)
    assert back.codebook[back.codes[kept]].numpy().tobytes() == layer.codebook[layer.codes[kept]].numpy().tobytes()
    assert back.codebook.numel() == torch.unique(layer.codes[kept]).numel() == torch.unique(back.codes[kept]).numel()
    assert (back.bias is None) == (layer.bias is None)
    if layer.bias is not None:
        assert back.bias.numpy().tobytes() == layer.bias.numpy().tobytes()
    assert torch.equal(back.weight(), layer.weight())
    assert int((back.weight() != 0).sum()) == int((layer.weight() != 0).sum())


def round_trip(model_key, layers, **kwargs):
    blob = encode(model_key, ARCH, {}, layers, **kwargs)
    key, back = decode(blob)
    assert key == model_key and list(back) == list(layers)
    for name, layer in layers.items():
        assert_same(back[name], layer)
    return blob


def test_weight_is_codebook_value_or_exact_zero():
    layer = QuantizedLayer(codes=torch.tensor([[1, -1], [0, 1]]), codebook=torch.tensor([-0.5, 2.0]))
    assert torch.equal(layer.weight(), torch.tensor([[2.0, 0.0], [-0.5, 2.0]]))


def test_round_trip_conv_and_linear_layers_with_and_without_bias():
    layers = {"conv1": random_layer((20, 1, 5, 5), 0.6, 256, seed=1),
              "conv2": random_layer((50, 20, 5, 5), 0.1, 256, seed=2, bias=False),
              "fc1": random_layer((500, 800), 0.08, 32, seed=3),
              "fc2": random_layer((10, 500), 0.2, 32, seed=4, bias=False)}
    blob = round_trip("lenet5_caffe", layers)
    rows = describe(blob)
    assert [r["layer"] for r in rows] == list(layers)
    for row, layer in zip(rows, layers.values()):
        assert row["shape"] == tuple(layer.codes.shape)
        assert row["codebook_size"] == torch.unique(layer.codes[layer.codes >= 0]).numel() <= layer.codebook.numel()
        assert row["nonzero"] == int((layer.codes >= 0).sum()) <= row["entries"]
        assert 1 <= row["index_bits"] <= 16
    assert sum(r["bytes_total"] for r in rows) < len(blob)


def test_encoding_is_deterministic():
    layers = {"fc": random_layer((100, 300), 0.1, 64, seed=5)}
    assert encode("m", ARCH, {}, layers) == encode("m", ARCH, {}, {"fc": random_layer((100, 300), 0.1, 64, seed=5)})


@pytest.mark.parametrize("codes, k", [
    (torch.full((3, 4), -1), 1),            # all pruned: no entries
    (torch.full((3, 4), -1), 0),            # all pruned, empty codebook
    (torch.zeros((3, 4), dtype=torch.int64), 1),  # one symbol, one gap value: 1-bit codes
    (torch.tensor([-1, -1, 2, -1]), 3),     # a single surviving weight
    (torch.zeros((0, 5), dtype=torch.int64), 2),  # no positions at all
    (torch.tensor(3), 4),                   # a 0-dimensional weight
])
def test_round_trip_edge_cases(codes, k):
    round_trip("m", {"w": QuantizedLayer(codes=codes, codebook=torch.arange(k, dtype=torch.float32))})


def test_round_trip_of_a_model_without_layers_and_with_a_unicode_key():
    assert decode(encode("modèle-λ", ARCH, {}, {})) == ("modèle-λ", {})


def test_largest_codebook():
    rng = np.random.default_rng(6)
    codes = torch.from_numpy(rng.permutation(65536).reshape(256, 256))  # every entry used: 4-byte counts
    codebook = torch.from_numpy(rng.normal(size=65536).astype(np.float32))
    row, = describe(round_trip("m", {"w": QuantizedLayer(codes=codes, codebook=codebook)}))
    assert row["codebook_size"] == 65536


def expected_fillers(codes: torch.Tensor, index_bits: int) -> int:
    """Deep Compression's rule: g pruned positions before a surviving weight need g >> index_bits fillers."""
    positions = np.flatnonzero(codes.reshape(-1).numpy() >= 0)
    return int(((np.diff(positions, prepend=-1) - 1) >> index_bits).sum())


def shapes(max_size=5000):
    def fit(dims):
        while math.prod(dims) > max_size:
            dims[dims.index(max(dims))] //= 2
        return tuple(dims)
    return st.lists(st.integers(1, 120), min_size=1, max_size=3).map(fit)


@settings(max_examples=60, deadline=None)
@given(shape=shapes(), density=st.floats(0.01, 1) | st.sampled_from([0.5, 0.02, 0.005, 0.001, 1.0, 0.0]),
       k=st.integers(1, 256), index_bits=st.none() | st.integers(1, 4) | st.integers(1, 16),
       bias=st.booleans(), seed=st.integers(0, 2**32 - 1), huffman=st.booleans())
def test_random_sparse_layers_round_trip(shape, density, k, index_bits, bias, seed, huffman):
    layer = random_layer(shape, density, k, seed=seed, bias=bias)
    blob = round_trip("m", {"w": layer}, index_bits=index_bits, huffman=huffman)
    row, = describe(blob)
    if index_bits is not None:
        assert row["index_bits"] == index_bits
    assert row["entries"] == row["nonzero"] + expected_fillers(layer.codes, row["index_bits"])


def test_long_gap_uses_fillers_and_stays_small():
    codes = torch.full((20000,), -1)
    codes[[3, 10003]] = torch.tensor([0, 1])
    layer = QuantizedLayer(codes=codes, codebook=torch.tensor([0.25, -0.75]))
    row, = describe(round_trip("m", {"w": layer}, index_bits=4))
    assert row["entries"] == 2 + 9999 // 16 == 2 + expected_fillers(codes, 4)
    blob = round_trip("m", {"w": layer})
    assert len(blob) < 100  # dense float32: 80000 bytes


def test_automatic_index_bits_is_the_smallest_file():
    layers = {"w": random_layer((100, 300), 0.03, 16, seed=7)}
    forced = {b: len(encode("m", ARCH, {}, layers, index_bits=b)) for b in range(1, 17)}
    assert len(encode("m", ARCH, {}, layers)) == min(forced.values())
    assert describe(encode("m", ARCH, {}, layers))[0]["index_bits"] == min(forced, key=forced.get)


def test_fixed_width_codes_take_the_same_bits_per_entry_and_huffman_is_never_larger():
    layer = random_layer((100, 300), 0.1, 64, seed=12)
    fixed = round_trip("m", {"w": layer}, index_bits=5, huffman=False)
    row, = describe(fixed)
    fillers = expected_fillers(layer.codes, 5)
    assert row["codebook_size"] == 64 and fillers > 0
    bits = 7  # 64 shared values and the filler symbol
    # max length, counts and filler rank (1 byte each: alphabet 65), stream length, stream; no table
    assert row["bytes_codes"] == 1 + bits + 1 + 4 + math.ceil(row["entries"] * bits / 8)
    assert row["gap_code"] == "huffman" and row["bytes_index"] >= 1 + 4 + math.ceil(row["entries"] * 5 / 8)
    huffman = round_trip("m", {"w": layer}, index_bits=5)
    assert len(huffman) <= len(fixed)
    assert describe(huffman)[0]["entries"] == row["entries"]


def test_geometric_gaps_take_a_rice_code_of_the_lengths_the_format_gives():
    """A sparse layer's gaps are near geometric: the encoder codes them with a Rice code, whose
    stream is exactly sum((g >> m) + 1 + m) bits over the entries' gaps (fillers' included), with
    no table, and the layer comes back the same."""
    rng = np.random.default_rng(14)
    codes = torch.from_numpy(np.where(rng.random(100_000) < 0.01, rng.integers(0, 32, 100_000), -1))
    layer = QuantizedLayer(codes=codes, codebook=torch.from_numpy(rng.normal(size=32).astype(np.float32)))
    row, = describe(round_trip("m", {"w": layer}))
    assert row["gap_code"].startswith("rice "), row
    m, max_gap = int(row["gap_code"].split()[1]), (1 << row["index_bits"]) - 1
    positions = np.flatnonzero(codes.numpy() >= 0)
    skipped = np.diff(positions, prepend=-1) - 1
    gaps = np.concatenate([skipped & max_gap, np.full(int((skipped >> row["index_bits"]).sum()), max_gap)])
    assert row["entries"] == gaps.size
    assert row["bytes_index"] == 1 + 4 + math.ceil(int(((gaps >> m) + 1 + m).sum()) / 8)


def test_lenet_300_100_layer_compresses_over_30x():
    layer = random_layer((300, 784), 0.08, 64, seed=8, bias=False)
    blob = encode("lenet300", ARCH, {}, {"fc1": layer})
    dense = 300 * 784 * 4
    print(f"\n300x784 at 8% density, 64-entry codebook: {len(blob)} bytes vs {dense} dense "
          f"({dense / len(blob):.1f}x); {describe(blob)[0]}")
    assert len(blob) < dense / 30


GOLDEN = Path(__file__).parent / "data"


def _md5(t: torch.Tensor) -> str:
    return hashlib.md5(t.numpy().tobytes()).hexdigest()


def _golden(version: int):
    """model-v<version>.bin, checked against the md5s of what it holds (model-v<version>.json): its
    bytes and what decode_all gives."""
    blob = (GOLDEN / f"model-v{version}.bin").read_bytes()
    expected = json.loads((GOLDEN / f"model-v{version}.json").read_text())
    assert hashlib.md5(blob).hexdigest() == expected["file_md5"]
    assert struct.unpack_from("<H", blob, len(MAGIC))[0] == version
    found = decode_all(blob)
    assert (found.model_key, found.arch, found.kwargs) == (expected["model_key"], expected["arch"], expected["kwargs"])
    assert list(found.layers) == list(expected["layers"])
    for name, layer in found.layers.items():
        e = expected["layers"][name]
        assert list(layer.codes.shape) == e["shape"] and layer.codes.dtype == torch.int64
        assert layer.codebook.dtype == torch.float32 and (layer.bias is None or layer.bias.dtype == torch.float32)
        assert _md5(layer.codes) == e["codes_int64"] and _md5(layer.codebook) == e["codebook_float32"], name
        assert (None if layer.bias is None else _md5(layer.bias)) == e["bias_float32"], name
        assert _md5(layer.weight()) == e["weight_float32"], name
    assert {n: {"dtype": str(t.dtype), "shape": list(t.shape), "md5": _md5(t)} for n, t in found.other.items()} \
        == expected["other"]
    assert [r["entries"] > r["nonzero"] for r in describe(blob)] == [True, True]  # fillers in both layers
    return blob, found


def test_the_committed_version_3_file_decodes_to_its_committed_tensors():
    """model-v3.bin (made by the encoder of commit 35781c9, format version 3: every float f32): a
    4-D layer with a bias, a layer with filler entries and no bias, and other tensors of both
    dtypes. Its tensors, encoded now (version 6), come back the same; fc's codebook (-0.5, -0.125,
    0.25, 1.0) is then stored as f16, conv's codebook and bias stay f32."""
    blob, found = _golden(3)
    again = encode(found.model_key, found.arch, found.kwargs, found.layers, other=found.other)
    k_conv, k_fc = (found.layers[n].codebook.numel() for n in ("conv", "fc"))
    assert [(r["bytes_codebook"], r["bytes_bias"]) for r in describe(blob)] == [(4 + 4 * k_conv, 1 + 4 + 4 * 3), (4 + 4 * k_fc, 1)]
    assert [(r["bytes_codebook"], r["bytes_bias"]) for r in describe(again)] == [(4 + 1 + 4 * k_conv, 1 + 4 + 4 * 3),
                                                                               (4 + 1 + 2 * k_fc, 1)]
    back = decode_all(again)
    for name, layer in found.layers.items():
        assert_same(back.layers[name], layer)


def test_the_committed_version_4_file_decodes_to_its_committed_tensors():
    """model-v4.bin: model-v3's tensors with conv's bias rounded to float16, so that it holds every
    codebook and bias type (conv: f32 codebook, f16 bias; fc: f16 codebook, no bias). Encoded now
    (version 6), the same weights come back."""
    blob, found = _golden(4)
    rows = {r["layer"]: r for r in describe(blob)}
    k_conv, k_fc = (found.layers[n].codebook.numel() for n in ("conv", "fc"))
    assert (rows["conv"]["bytes_codebook"], rows["fc"]["bytes_codebook"]) == (4 + 1 + 4 * k_conv, 4 + 1 + 2 * k_fc)
    assert rows["conv"]["bytes_bias"] == 1 + 4 + 2 * found.layers["conv"].bias.numel() and rows["fc"]["bytes_bias"] == 1
    back = decode_all(encode(found.model_key, found.arch, found.kwargs, found.layers, other=found.other))
    for name, layer in found.layers.items():
        assert_same(back.layers[name], layer)


def test_the_committed_version_5_file_decodes_to_its_committed_tensors():
    """model-v5.bin (made by the encoder of commit ca83dbb): model-v4's tensors, fc's codebook with
    an unused first entry, which the file drops, encoded with 1 index bit, so that both layers
    have fillers: conv's gaps take a Rice code, fc's a Huffman table."""
    blob, found = _golden(5)
    _, v4 = _golden(4)
    rows = {r["layer"]: r for r in describe(blob)}
    assert [(r["gap_code"], r["codebook_size"], r["index_bits"]) for r in rows.values()] == [("rice 0", 8, 1),
                                                                                            ("huffman", 4, 1)]
    for name, layer in v4.layers.items():
        assert_same(found.layers[name], layer)


def test_the_committed_version_6_file_decodes_to_its_committed_tensors_and_encodes_back_to_its_bytes():
    """model-v6.bin: model-v5's tensors, fc with rows 2 to 4 pruned whole and a bias that is 0 there,
    so that the file stores fc's bias for rows 0 and 1 only (a Unit bias); conv keeps its full f16
    bias. An encoder and a decoder that change together (the round trips still pass) break this
    file: the format is the specification, not the code."""
    blob, found = _golden(6)
    _, v5 = _golden(5)
    rows = {r["layer"]: r for r in describe(blob)}
    assert [(r["gap_code"], r["codebook_size"], r["index_bits"]) for r in rows.values()] == [("rice 0", 8, 1),
                                                                                            ("huffman", 4, 1)]
    assert rows["fc"]["bytes_bias"] == 1 + 4 + 4 + 2 * 2 and rows["conv"]["bytes_bias"] == 1 + 4 + 2 * 3
    assert found.layers["fc"].bias.tolist() == [0.5, -0.25, 0.0, 0.0, 0.0]
    fc = v5.layers["fc"]
    codes = torch.where(torch.arange(5)[:, None] < 2, fc.codes, -1)
    layers = {"conv": v5.layers["conv"], "fc": QuantizedLayer(codes, fc.codebook, torch.tensor([0.5, -0.25, 0.0, 0.0, 0.0]))}
    for name, layer in layers.items():
        assert_same(found.layers[name], layer)
    assert encode(found.model_key, found.arch, found.kwargs, layers, index_bits=1, other=v5.other) == blob


def test_a_bias_is_stored_for_the_units_in_use_and_those_listed_where_that_is_smaller():
    """20 units, 4 of them with a weight: the file stores their 4 biases and lists the units without
    a weight whose bias is not +0.0 (0.5 and -0.0), so that every bias comes back bit for bit; with
    every unit in use, or too many listed, the full bias is smaller and is written."""
    codes = torch.full((20, 6), -1)
    codes[[0, 5, 9, 19], 2] = 0
    bias = torch.zeros(20)
    bias[[0, 5, 9, 19]] = torch.tensor([1.5, -2.0, 0.25, 3.0])
    bias[7], bias[12] = 0.5, -0.0
    layer = QuantizedLayer(codes, torch.tensor([0.75]), bias)
    blob = round_trip("m", {"w": layer})
    assert describe(blob)[0]["bytes_bias"] == 1 + 4 + 4 + 4 * 2 + 2 * (4 + 2)
    assert decode(blob)[1]["w"].bias.numpy().tobytes() == bias.numpy().tobytes()
    bias[1:4] = 1.0  # 5 units listed: 1 + 4 + 4 + 20 + 12 > 1 + 4 + 40
    assert describe(round_trip("m", {"w": QuantizedLayer(codes, torch.tensor([0.75]), bias)}))[0]["bytes_bias"] == 1 + 4 + 2 * 20
    every = QuantizedLayer(torch.zeros((20, 6), dtype=torch.long), torch.tensor([0.75]), torch.zeros(20))
    assert describe(round_trip("m", {"w": every}))[0]["bytes_bias"] == 1 + 4 + 2 * 20


def test_a_corrupt_unit_bias_gets_its_own_message():
    """A Unit bias whose length is not the layer's units, or that lists a unit out of order, out
    of range or in use, is refused with a message naming the layer and what is wrong."""
    codes = torch.full((20, 6), -1)
    codes[[0, 5], 2] = 0
    layer = QuantizedLayer(codes, torch.tensor([0.75]), torch.tensor([1.0] + [0.0] * 4 + [2.0] + [0.0] * 14))
    blob = encode("m", ARCH, {}, {"w": layer})
    tail = struct.pack("<BII", 4, 20, 0) + np.array([1.0, 2.0], "<f2").tobytes() + struct.pack("<H", 0)
    assert blob[:-CRC_SIZE].endswith(tail)
    head = blob[:-CRC_SIZE - len(tail)]

    def with_bias(bias: bytes) -> bytes:
        data = head + bias + struct.pack("<H", 0)
        data = data[:len(MAGIC) + 2] + struct.pack("<I", len(data) + CRC_SIZE) + data[len(MAGIC) + 6:]
        return data + struct.pack("<I", zlib.crc32(data))

    values = np.array([1.0, 2.0], "<f2").tobytes()
    assert decode(with_bias(tail[:-2]))[1]["w"].bias.tolist()[:6] == [1.0, 0, 0, 0, 0, 2.0]
    for bias, message in [
            (struct.pack("<BII", 4, 19, 0) + values, "layer 'w' has a bias of its units' kind with 19 values for 20 units"),
            (struct.pack("<BIIII", 4, 20, 2, 7, 3) + values + values, r"layer 'w' lists units \[7, 3\] for their biases"),
            (struct.pack("<BIII", 4, 20, 1, 20) + values + values, r"layer 'w' lists units \[20\]"),
            (struct.pack("<BIII", 4, 20, 1, 5) + values + values, r"layer 'w' lists units \[5\] for their biases; "
                                                                 "expected ascending units below 20, none of them in use")]:
        with pytest.raises(EncodingError, match=message):
            decode(with_bias(bias))


def test_values_a_float16_holds_are_stored_in_two_bytes_and_others_in_four():
    """Per layer and per array: the codebook and the bias each go to f16 only if every value
    survives the trip exactly; one value that does not (0.1) keeps the whole array f32."""
    codes = torch.tensor([[0, 1, -1], [1, 0, 0]])
    half, single = torch.tensor([1.5, -0.25]), torch.tensor([1.5, 0.1])
    sizes = {}
    for codebook_name, codebook in (("half", half), ("single", single)):
        for bias_name, bias in (("half", half), ("single", single)):
            layer = QuantizedLayer(codes, codebook, bias)
            blob = round_trip("m", {"w": layer})
            row = describe(blob)[0]
            sizes[codebook_name, bias_name] = len(blob)
            assert row["bytes_codebook"] == 4 + 1 + (2 if codebook_name == "half" else 4) * 2
            assert row["bytes_bias"] == 1 + 4 + (2 if bias_name == "half" else 4) * 2
    assert sizes["single", "single"] - sizes["half", "half"] == 8
    # float16 overflows past 65504 and loses precision below 2**-14: such values stay f32; NaN and inf need not
    for values, width in (([70000.0, 1.0], 4), ([1e-7, 1.0], 4), ([float("nan"), float("inf"), -0.0], 2)):
        layer = QuantizedLayer(torch.tensor([0, 1]), torch.tensor(values[:2]), torch.tensor(values))
        rows = describe(encode("m", ARCH, {}, {"w": layer}))
        assert rows[0]["bytes_bias"] == 1 + 4 + width * len(values), values
        back = decode(encode("m", ARCH, {}, {"w": layer}))[1]["w"]
        assert back.bias.numpy().tobytes() == layer.bias.numpy().tobytes()


def _reference_huffman_bits(frequencies: list[int]) -> int:
    """The length of the coded stream under an optimal prefix code (Huffman's algorithm, heapq):
    the sum of the weights of every merge."""
    heap = [f for f in frequencies if f > 0]
    if len(heap) == 1:
        return heap[0]  # a lone symbol: 1 bit each
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        total += merged
        heapq.heappush(heap, merged)
    return total


@pytest.mark.parametrize("frequencies", [
    [5], [1, 1], [1, 2, 4, 8, 16, 32, 64], [100, 1, 1, 1, 1], [0, 7, 0, 3, 3, 3, 0, 9],
    np.random.default_rng(0).integers(0, 1000, 65).tolist(), (2 ** np.arange(20)).tolist(),
])
def test_huffman_codes_are_optimal_and_within_the_entropy_bound(frequencies):
    f = np.asarray(frequencies, dtype=np.int64)
    code = _huffman(f, "test")
    assert code.n_bits == _reference_huffman_bits(frequencies)
    n = int(f.sum())
    p = f[f > 0] / n
    entropy = float(-(p * np.log2(p)).sum()) * n
    assert entropy - 1e-9 <= code.n_bits < entropy + n or len(p) == 1
    lengths = {s: len(w) for s, w in code.codewords.items()}
    assert code.n_bits == sum(int(f[s]) * lengths[s] for s in lengths)
    words = sorted(w.to01() for w in code.codewords.values())
    assert not any(b.startswith(a) for a, b in zip(words, words[1:]))  # prefix-free


def test_a_layer_s_coded_streams_are_as_short_as_an_optimal_code_allows():
    """Through the file: the code section of a layer of skewed codes is the Huffman-optimal length."""
    rng = np.random.default_rng(13)
    codes = torch.from_numpy(rng.choice(8, size=2000, p=[0.5, 0.2, 0.1, 0.1, 0.05, 0.03, 0.01, 0.01]))
    layer = QuantizedLayer(codes=codes, codebook=torch.arange(8, dtype=torch.float32))
    row, = describe(round_trip("m", {"w": layer}, index_bits=1))  # every gap 0: no fillers
    assert row["entries"] == 2000
    longest = max(len(w) for w in _huffman(np.bincount(codes.numpy(), minlength=9), "w").codewords.values())
    table = 1 + longest + 1 + 4  # max length, counts, filler rank (1 byte each), bit count; no table
    bits = _reference_huffman_bits(np.bincount(codes.numpy()).tolist())
    assert row["bytes_codes"] == table + math.ceil(bits / 8)


def test_other_tensors_round_trip_with_their_dtype_and_shape():
    """Batch norm's tensors (format versions 2 to 4): float32 of any shape, int64 (0-dim for
    num_batches_tracked), in their order; another dtype is refused."""
    other = {"bn.weight": torch.tensor([1.5, -2.0, 0.25]), "bn.running_mean": torch.randn(3),
             "bn.num_batches_tracked": torch.tensor(12345678901), "table": torch.arange(6, dtype=torch.int64).view(2, 3),
             "scalar": torch.tensor(0.5)}
    found = decode_all(encode("m", ARCH, {}, {"w": LAYER}, other=other))
    assert list(found.other) == list(other)
    for name, t in other.items():
        back = found.other[name]
        assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t), name
    with pytest.raises(EncodingError, match="tensor 'x': dtype float64 is not float32 or int64"):
        encode("m", ARCH, {}, {"w": LAYER}, other={"x": torch.zeros(2, dtype=torch.float64)})


@pytest.mark.parametrize("layer, message", [
    (QuantizedLayer(torch.tensor([0.0, 1.0]), torch.zeros(2)), "codes must be integers"),
    (QuantizedLayer(torch.tensor([0, 2]), torch.zeros(2)), "codes must be -1 .* or 0..1"),
    (QuantizedLayer(torch.tensor([0, -2]), torch.zeros(2)), "codes must be -1"),
    (QuantizedLayer(torch.tensor([0, 1]), torch.zeros(2, dtype=torch.float64)), "codebook must be 1-D float32"),
    (QuantizedLayer(torch.tensor([0, 1]), torch.zeros(2), torch.zeros(1, 2)), "bias must be 1-D float32"),
    (QuantizedLayer(torch.tensor([0, 1]), torch.zeros(65537)), "codebook has 65537 entries, more than 65536"),
])
def test_encode_rejects_what_the_format_cannot_hold(layer, message):
    with pytest.raises(EncodingError, match=f"layer 'w': {message}"):
        encode("m", ARCH, {}, {"w": layer})


# --------------------------------------------------------------------------------- bad files

LAYER = QuantizedLayer(codes=torch.tensor([[0, -1, 1], [-1, 0, 0]]), codebook=torch.tensor([1.5, 2.5]),
                       bias=torch.tensor([0.5, -0.5]))
GOOD = encode("m", ARCH, {}, {"w": LAYER})
FIXED = encode("m", ARCH, {}, {"w": LAYER}, huffman=False)  # the same offsets up to the code section (its codebook: 1.5, 2.5)
# Offsets in GOOD: preamble 14, key 2+1, arch 2+8, kwargs 2+2, layer count 2, name 2+1, ndim 1.
KWARGS = 14 + 3 + 10
DIMS = KWARGS + 4 + 2 + 3 + 1
CODEBOOK_TYPE = DIMS + 2 * 4 + 4  # after dims and k
CODE_TABLE = CODEBOOK_TYPE + 1 + 2 * 2 + 1 + 4  # codebook type, codebook (f16), index bits, entries
BIAS_TYPE = len(GOOD) - 4 - 2 - (1 + 4 + 2 * 2)  # before: the bias (f16), the other tensors' count, the CRC
# 1 index bit, no fillers. Codes 0, 1, 0, 0: the code section is max_length 1, counts [2], filler
# rank 2 (1 byte each), 4 bits, 1 byte of stream; then the gaps 0, 1, 1, 0 in a Rice code, m = 0.
GAPS = CODE_TABLE + 3 + 4 + 1
# FIXED's codes take 2 bits (alphabet 3): counts [0, 2], then the gaps' Huffman section (Rice byte 0,
# max_length 1, counts [2]) and its table [0, 1].
FIXED_GAP_TABLE = CODE_TABLE + 4 + 4 + 1 + 3


def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def patched(offset: int, value: bytes, good: bytes = GOOD) -> bytes:
    """`good` with bytes replaced at offset and a valid CRC: only the decoder's checks can catch it."""
    body = good[:-4]
    return with_crc(body[:offset] + value + body[offset + len(value):])


def test_the_good_file_layout_assumed_below():
    assert GOOD[:KWARGS + 4] == MAGIC + struct.pack("<HI", FORMAT_VERSION, len(GOOD)) + b"\x01\x00m\x08\x00nets:Net\x02\x00{}"
    assert GOOD[DIMS:DIMS + 8] == struct.pack("<II", 2, 3)
    # the codebook in the order of its codes (two 1-bit codes; bitarray's canonical order lists 2.5's first)
    assert GOOD[CODEBOOK_TYPE:CODEBOOK_TYPE + 5] == bytes([1]) + np.array([2.5, 1.5], "<f2").tobytes()
    assert GOOD[CODE_TABLE:CODE_TABLE + 3] == bytes([1, 2, 2]) and GOOD[GAPS] == 1
    assert FIXED[14:CODEBOOK_TYPE + 1] == GOOD[14:CODEBOOK_TYPE + 1] and FIXED[CODE_TABLE - 5:CODE_TABLE] == GOOD[CODE_TABLE - 5:CODE_TABLE]
    assert FIXED[FIXED_GAP_TABLE - 3:FIXED_GAP_TABLE + 2] == bytes([0, 1, 2, 0, 1])
    assert GOOD[BIAS_TYPE:BIAS_TYPE + 9] == bytes([2]) + struct.pack("<I", 2) + np.array([0.5, -0.5], "<f2").tobytes()
    assert GOOD[-6:-4] == b"\x00\x00"  # no other tensors


def test_the_file_names_the_arch_and_its_kwargs_as_sorted_json():
    kwargs = {"width": 8, "blocks": [1, 2], "name": "ü", "scale": 0.1, "bn": True, "extra": None}
    blob = encode("mine", "pkg.nets:Net", kwargs, {"w": LAYER})
    found = decode_all(blob)
    assert (found.model_key, found.arch, found.kwargs) == ("mine", "pkg.nets:Net", kwargs)
    text = '{"blocks":[1,2],"bn":true,"extra":null,"name":"\\u00fc","scale":0.1,"width":8}'.encode()
    assert struct.pack("<H", len(text)) + text in blob


@pytest.mark.parametrize("kwargs, message", [
    ({"sizes": (3, 3)}, r"kwargs \{'sizes': \(3, 3\)\} do not come back from JSON as they are "
                        r"\(as \{\"sizes\":\[3,3\]\}\)"),
    ({1: 2}, "do not come back from JSON"),
    ({"scale": float("inf")}, "are not JSON: Out of range float values"),
    ({"f": print}, "are not JSON: Object of type builtin_function_or_method"),
])
def test_kwargs_that_json_does_not_give_back_are_refused(kwargs, message):
    with pytest.raises(EncodingError, match=message):
        encode("m", ARCH, kwargs, {"w": LAYER})


@pytest.mark.parametrize("text, message", [(b"[]", "kwargs are a JSON list, not an object"),
                                           (b"{x", "kwargs are not JSON")])
def test_kwargs_in_the_file_that_are_not_a_json_object(text, message):
    with pytest.raises(EncodingError, match=f"corrupt file: {message}"):
        decode(patched(KWARGS + 2, text))


@pytest.mark.parametrize("cut", [0, 3, 8, 11, 20, len(GOOD) // 2, len(GOOD) - 5, len(GOOD) - 1])
def test_truncated_file(cut):
    expected = "empty file" if cut == 0 else "truncated file"
    with pytest.raises(EncodingError, match=expected):
        decode(GOOD[:cut])


def test_truncated_file_names_both_lengths():
    with pytest.raises(EncodingError, match=f"truncated file: 30 bytes, the header says {len(GOOD)}"):
        decode(GOOD[:30])


@pytest.mark.parametrize("offset", [DIMS, CODE_TABLE + 5, len(GOOD) - 10])
def test_flipped_byte_is_a_checksum_mismatch(offset):
    bad = bytearray(GOOD)
    bad[offset] ^= 0x10
    stored = GOOD[-4:][::-1].hex()
    with pytest.raises(EncodingError, match=f"checksum mismatch: the file says CRC32 0x{stored}, its contents give 0x"):
        decode(bytes(bad))


def test_wrong_magic():
    with pytest.raises(EncodingError, match="not a hanprune compressed model \\(magic b'PK"):
        decode(b"PK\x03\x04" + GOOD[4:])


@pytest.mark.parametrize("version, message", [
    (7, f"format version 7, newer than this reader supports \\(version {FORMAT_VERSION}\\)"),
    (0, "unknown format version 0 \\(this reader supports versions 1 to 6\\)"),
])
def test_other_format_version(version, message):
    # The version is checked before the CRC, so a newer file gets this message and not a checksum one.
    bad = MAGIC + struct.pack("<H", version) + GOOD[10:]
    with pytest.raises(EncodingError, match=message):
        decode(bad)


def test_empty_bytes():
    with pytest.raises(EncodingError, match="empty file: not a hanprune compressed model"):
        decode(b"")


def test_trailing_garbage():
    with pytest.raises(EncodingError, match=f"3 trailing bytes after the compressed model \\(the header says "
                                            f"{len(GOOD)} bytes, the file has {len(GOOD) + 3}\\)"):
        decode(GOOD + b"xyz")


def test_entries_past_the_layer_size():
    with pytest.raises(EncodingError, match="layer 'w' has an entry at position 5, past its 4 weights"):
        decode(patched(DIMS, struct.pack("<II", 2, 2)))


def test_gap_out_of_the_gap_alphabet():
    with pytest.raises(EncodingError, match="layer 'w' gap symbol 7 out of range 0..1"):
        decode(patched(FIXED_GAP_TABLE, bytes([7]), FIXED))


@pytest.mark.parametrize("offset, value, message", [
    (CODE_TABLE - 5, bytes([17]), "17 index bits, allowed 1..16"),
    (CODE_TABLE - 4, struct.pack("<I", 5), "code stream holds 4 entries, the layer says 5"),
    (CODE_TABLE, bytes([32]), "codes up to 32 bits long"),
    (CODE_TABLE + 1, bytes([5]), "layer 'w' code counts sum to 5, expected the codebook's 2 \\(or 3 with the filler\\)"),
    (CODE_TABLE + 2, bytes([3]), "layer 'w' code filler rank 3, expected 0..2 \\(and 2 with no fillers\\)"),
    (CODE_TABLE + 2, bytes([1]), "layer 'w' code filler rank 1, expected 0..2 \\(and 2 with no fillers\\)"),
    (GAPS, bytes([3]), "layer 'w' gap Rice parameter 2 with 1 index bits; allowed 0..1"),
    (DIMS + 8, struct.pack("<I", 70000), "70000-entry codebook"),
    (CODEBOOK_TYPE, bytes([2]), "layer 'w' codebook type is 2, expected one of \\[0, 1\\]"),
    (BIAS_TYPE, bytes([5]), "layer 'w' bias type is 5, expected one of \\[0, 1, 2, 3, 4\\]"),
    (14, b"\xff\xff", "runs past the end of the data"),
])
def test_other_inconsistencies_with_a_valid_checksum(offset, value, message):
    with pytest.raises(EncodingError, match=message):
        decode(patched(offset, value))


def test_bytes_after_the_last_layer_with_a_valid_length_and_checksum():
    body = GOOD[:-4] + b"\x00"
    body = body[:10] + struct.pack("<I", len(body) + 4) + body[14:]
    with pytest.raises(EncodingError, match="1 unread bytes after the last layer"):
        decode(with_crc(body))
