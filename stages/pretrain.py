"""Stage pretrain: train the dense model and write its checkpoint and per-epoch curve."""
from common import epoch_logger, load_params, parser, run_stage, start, tracked
from hanprune import data, io
from hanprune.config import ConfigError
from hanprune.models import ModelError, check_fits, make
from hanprune.pruning import checkpoint, weight_std
from hanprune.train import fit


def main(argv=None):
    ap = parser(__doc__, "model", "--data")
    ap.add_argument("--out", required=True, help="checkpoint to write")
    ap.add_argument("--plot", required=True, help="per-epoch CSV to write")
    args = ap.parse_args(argv)
    p = load_params(args.params, args.model)
    m = p.models[args.model]
    cfg = m.pretrain
    if cfg is None:
        raise ConfigError(f"{p.source}: models.{args.model}.pretrain: missing; this pipeline trains the dense model "
                          f"(models.{args.model}.dense names one that another pipeline trains)")
    device = start(p, cfg.seed)  # before the model: its initial weights come from the seed
    try:
        model = make(m.arch, m.kwargs)
    except ModelError as e:
        raise ConfigError(f"{p.source}: models.{args.model}.arch: {e}") from None
    splits = data.open_splits(args.data, p.data, device)
    with tracked(p, f"pretrain@{args.model}", args.model, splits.dataset) as mlrun:
        mlrun.params({"pretrain": cfg.model_dump(), "data": p.data.model_dump(exclude={"md5"}), "run": p.run.model_dump()})
        model.to(device)
        check_fits(model, args.model, splits.input_shape, splits.classes)  # before any training
        epochs = fit(model, cfg, splits.train, splits.val, splits.test, device,
                     log=epoch_logger(mlrun, f"pretrain {args.model}"), label=f"pretrain {args.model}",
                     lr_key=f"models.{args.model}.pretrain.lr")
        test_acc = epochs[-1]["test_accuracy"]
        io.save_torch(args.out, checkpoint(args.model, m.arch, m.kwargs, model, weight_std(model), history=[]))
        io.write_csv(args.plot, ["epoch", "train_loss", "val_accuracy", "test_accuracy"],
                     [[e["epoch"], f"{e['train_loss']:.6f}", f"{e['val_accuracy']:.6f}", f"{e['test_accuracy']:.6f}"]
                      for e in epochs])
        mlrun.metrics({"final_val_accuracy": epochs[-1]["val_accuracy"], "test_accuracy": test_acc})
    seconds = sum(e["seconds"] for e in epochs)
    print(f"pretrain {args.model}: {cfg.epochs} epochs in {seconds:.0f} s "
          f"({seconds / cfg.epochs:.2f} s/epoch), val {epochs[-1]['val_accuracy']:.4f}, test {test_acc:.4f} -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
