"""Command line: `python -m hanprune check [PARAMS]` and `python -m hanprune decode FILE [--out CHECKPOINT] [--data DIR]`.

check validates a whole params file, models and rules included (hanprune/check.py), and prints
one line; decode:

Decodes a compressed model file (encoding.py), prints where its bytes go layer by layer, and
optionally reports the rebuilt model's test accuracy on a dataset directory and writes it as a checkpoint of this
project (loadable with torch.load(weights_only=True))."""
import argparse
import sys
from pathlib import Path

import numpy as np
from tabulate import tabulate

from . import config, io
from .check import check
from .data import load_split, verified
from .encoding import EncodingError, decode as decode_file, describe, read_compressed
from .errors import DataError
from .pruning import attach_masks, checkpoint
from .train import accuracy


def entropy_bytes(counts) -> float:
    """The bytes that any code of independent symbols, drawn at these counts' frequencies, needs at
    least for all of them (Shannon): what a gap or code section of the file can be compared with."""
    counts = np.asarray([c for c in counts if c], dtype=np.float64)
    return float((counts * np.log2(counts.sum() / counts)).sum() / 8)


def decode(args) -> None:
    blob = Path(args.file).read_bytes()
    arch = kwargs = None
    if args.params:  # the arch of a model that is not built in, for a file of format 1 or 2 (which names none)
        m = config.load(args.params).models.get(decode_file(blob)[0])
        arch, kwargs = (m.arch, m.kwargs) if m else (None, None)
    found, model = read_compressed(args.file, arch=arch, kwargs=kwargs)
    key, layers = found.model_key, found.layers
    rows = describe(blob)
    for r in rows:  # the positions as independent draws at the layer's density; the codes at their frequencies
        codes = layers[r["layer"]].codes
        r["bound_index"] = entropy_bytes([r["nonzero"], codes.numel() - r["nonzero"]])
        r["bound_codes"] = entropy_bytes(np.bincount(codes[codes >= 0].numpy()))
    print(tabulate([[r["layer"], "x".join(map(str, r["shape"])), r["nonzero"], r["entries"], r["index_bits"],
                     r["gap_code"], f"{r['bytes_index']} ({r['bound_index']:.0f})",
                     f"{r['bytes_codes']} ({r['bound_codes']:.0f})", r["codebook_size"], r["bytes_total"]] for r in rows],
                   headers=["layer", "shape", "non-zero", "entries", "index bits", "gaps", "gap bytes (bound)",
                            "code bytes (bound)", "codebook", "bytes"]))
    print("bound: the fewest bytes for the positions as independent draws at each layer's density, and for the "
          f"codes at their frequencies: {sum(r['bound_index'] + r['bound_codes'] for r in rows):.0f} bytes in all; "
          f"the file's gap and code sections take {sum(r['bytes_index'] + r['bytes_codes'] for r in rows)}")
    size = Path(args.file).stat().st_size
    dense = 4 * sum(p.numel() for p in model.parameters())
    print(f"{args.file}: {key}, {size} bytes, {dense / size:.1f}x smaller than dense float32 ({dense} bytes)")
    if args.data:
        print(f"test accuracy: {accuracy(model, *load_split(verified(args.data), train=False)):.4f}")
    if args.out:
        attach_masks(model, {name: (layer.codes >= 0).float() for name, layer in layers.items()})
        io.save_torch(args.out, checkpoint(key, found.arch, found.kwargs, model, {}, []))
        print(f"wrote {args.out}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m hanprune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    chk = sub.add_parser("check", help="validate a whole params file (every model, round and grid)")
    chk.add_argument("params", nargs="?", default="params.yaml", help="default: params.yaml")
    dec = sub.add_parser("decode", help="decode a compressed model file")
    dec.add_argument("file", help="e.g. models/lenet_300_100/compressed.bin")
    dec.add_argument("--data", help="a dataset directory (data/MNIST/raw, with dataset.json): also report test accuracy")
    dec.add_argument("--out", help="write the decoded model as a checkpoint here")
    dec.add_argument("--params", help="for a file of format 1 or 2 (older ones, which do not name the architecture) "
                                      "of a model that is not built in: the params.yaml it was made with")
    args = ap.parse_args(argv)
    try:
        if args.command == "check":
            p = config.load(args.params)
            try:
                check(p)
            except config.ConfigError as e:
                raise config.ConfigError(f"{args.params}: {e}") from None
            print(f"{args.params}: valid ({len(p.models)} models, {len(p.prune)} rounds)")
        else:
            decode(args)
    except (EncodingError, DataError, config.ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
