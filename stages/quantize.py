"""Stage quantize: weight sharing on the final pruned model (Deep Compression, Han et al. 2016).

Clusters each layer's surviving weights into 2**bits shared values, fine-tunes the shared values
(codes and sparsity pattern fixed) and writes a checkpoint that also holds codes and codebooks."""
from common import config, epoch_logger, open_run, parser, run, setup
from hanprune import data, io
from hanprune.models import build
from hanprune.pruning import attach_masks, checkpoint, load_checkpoint
from hanprune.quantize import load_into, quantized_layers, share_weights
from hanprune.train import accuracy, fit


def main():
    ap = parser(__doc__)
    ap.add_argument("model", help="model key")
    ap.add_argument("--data", default="data", help="data root")
    ap.add_argument("--pruned", required=True, help="final pruned checkpoint")
    ap.add_argument("--out", required=True, help="quantized checkpoint to write")
    ap.add_argument("--metrics", required=True, help="JSON metrics to write")
    args = ap.parse_args()
    p = config.load(args.params)
    if args.model not in p.models:
        raise config.ConfigError(f"model {args.model!r} is not in params models: {', '.join(p.models)}")
    q = p.models[args.model].quantize
    device = setup(p, q.finetune.seed)
    splits = data.Splits(args.data, p.data.val_size, p.data.val_seed)
    on = lambda t: (t[0].to(device), t[1].to(device))  # noqa: E731
    val = on(splits.val)
    _, ckpt = load_checkpoint(args.pruned, args.model)
    model = build(args.model)
    model.load_state_dict(ckpt["state_dict"])
    with open_run(p, f"quantize@{args.model}", args.model, data.dataset_md5(args.data)) as mlrun:
        mlrun.params({"quantize": q.model_dump()})
        val_pruned = accuracy(model.to(device), *val)
        share_weights(model.cpu(), q.bits, ckpt["masks"])
        val_quantized = accuracy(model.to(device), *val)
        epochs = fit(model, q.finetune, on(splits.train), val, None, device,
                     log=epoch_logger(mlrun, f"quantize {args.model}"))
        layers = quantized_layers(model.cpu())
        plain = load_into(build(args.model), layers)
        attach_masks(plain, {name: m.float() for name, m in ckpt["masks"].items()})
        saved = checkpoint(args.model, plain, ckpt["dense_std"], ckpt["history"])
        saved["quantized"] = {name: {"codes": l.codes.int(), "codebook": l.codebook} for name, l in layers.items()}
        record = {"val_accuracy_pruned": val_pruned, "val_accuracy_quantized": val_quantized,
                  "val_accuracy_finetuned": epochs[-1]["val_accuracy"], "bits": q.bits}
        io.save_torch(args.out, saved)
        io.write_json(args.metrics, record)
        mlrun.metrics({k: v for k, v in record.items() if k != "bits"})
    print(f"quantize {args.model}: val {val_pruned:.4f} -> shared weights {val_quantized:.4f} -> "
          f"fine-tuned {record['val_accuracy_finetuned']:.4f}, bits "
          + " ".join(f"{n} {b}" for n, b in q.bits.items()) + f" -> {args.out}")


if __name__ == "__main__":
    run(main)
