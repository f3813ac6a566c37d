"""Stage encode: write the quantized model in the project's compressed format (sparse index
differences, codebooks, Huffman and Rice coding; see hanprune/encoding.py), and the storage forms before it
(dense, pruned values, pruned CSR, fixed-width codes; see hanprune/storage.py) as real files.
Both coded files leave out the dead units (hanprune/deadunits.py): the same model output, fewer
weights and biases. Every loadable file is read back and checked before anything is written."""
import torch

from common import load_params, parser, run_stage, start, tracked
from hanprune import encoding, io, storage
from hanprune.deadunits import drop_dead_units
from hanprune.models import make
from hanprune.pruning import load_checkpoint, plain_state_dict
from hanprune.quantize import load_quantized, other_state


def same_weights(a, b) -> bool:
    """Equal pruned layers (weights and biases: what the storage forms hold)."""
    sa, sb = plain_state_dict(a), plain_state_dict(b)
    other = other_state(a, sa)
    a, b = ({k: v for k, v in state.items() if k not in other} for state in (sa, sb))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None) == (b is None) and (a is None or a.numpy().tobytes() == b.numpy().tobytes())


def decodes_to(blob: bytes, names: tuple[str, str, dict], layers: dict, other: dict) -> bool:
    """The file holds `names` (model key, arch, kwargs), exactly these layers (the same pruned
    positions, weights and biases bit for bit; the file numbers the codes anew) and other tensors."""
    found = encoding.decode_all(blob)
    decoded, stored = found.layers, found.other
    return (found.model_key, found.arch, found.kwargs) == names and decoded.keys() == layers.keys() and all(
        torch.equal(decoded[n].codes >= 0, l.codes >= 0) and same_bits(decoded[n].weight(), l.weight())
        and same_bits(decoded[n].bias, l.bias) for n, l in layers.items()) and \
        stored.keys() == other.keys() and all(torch.equal(stored[k], v) for k, v in other.items())


def main(argv=None):
    ap = parser(__doc__, "model", "--dense", "--pruned")
    ap.add_argument("--quantized", required=True, help="checkpoint written by the quantize stage")
    ap.add_argument("--out", required=True, help="compressed model file to write")
    ap.add_argument("--storage", required=True, help="directory for the other storage forms")
    args = ap.parse_args(argv)
    p = load_params(args.params, args.model)
    m = p.models[args.model]
    start(p)
    dense, _ = load_checkpoint(args.dense, args.model, m.arch, m.kwargs)
    pruned, _ = load_checkpoint(args.pruned, args.model, m.arch, m.kwargs)
    quantized, layers = load_quantized(args.quantized, args.model, m.arch, m.kwargs)
    layers, dropped = drop_dead_units(quantized, layers)
    other = other_state(quantized, plain_state_dict(quantized))  # batch norm's tensors, say: stored as they are
    files = {"dense": storage.dense_bytes(dense), "pruned_values": storage.values_bytes(pruned),
             "pruned_csr": storage.csr_bytes(pruned),
             "quantized_fixed": encoding.encode(args.model, m.arch, m.kwargs, layers, huffman=False, other=other)}
    blob = encoding.encode(args.model, m.arch, m.kwargs, layers, other=other)
    names = (args.model, m.arch, m.kwargs)
    checks = {"dense": same_weights(storage.load_dense(files["dense"], make(m.arch, m.kwargs)), dense),
              "pruned_csr": same_weights(storage.load_csr(files["pruned_csr"], make(m.arch, m.kwargs)), pruned),
              "quantized_fixed": decodes_to(files["quantized_fixed"], names, layers, other),
              "compressed": decodes_to(blob, names, layers, other)}
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        raise encoding.EncodingError(f"{', '.join(failed)}: does not load back to the model it stores; nothing written")
    with tracked(p, f"encode@{args.model}", args.model) as mlrun:
        for name, data in files.items():
            io.write_bytes(f"{args.storage}/{storage.FILES[name]}", data)
        io.write_bytes(args.out, blob)
        mlrun.metrics({"compressed_bytes": len(blob), "dead_units": dropped, **{f"{name}_bytes": len(data) for name, data in files.items()}})
        mlrun.artifact(args.out)
    sizes = ", ".join(f"{name} {len(data)}" for name, data in files.items())
    print(f"encode {args.model}: {len(blob)} bytes -> {args.out} ({sizes} bytes in {args.storage}; "
          f"{dropped} dead units left out)")


if __name__ == "__main__":
    run_stage(main)
