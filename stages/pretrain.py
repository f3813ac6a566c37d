"""Stage pretrain: train the dense model and write its checkpoint and per-epoch curve."""
from common import config, epoch_logger, open_run, parser, run, setup
from hanprune import data, io
from hanprune.models import build
from hanprune.pruning import checkpoint, weight_std
from hanprune.train import accuracy, fit


def main():
    ap = parser(__doc__)
    ap.add_argument("model", help="model key, e.g. lenet_300_100")
    ap.add_argument("--data", default="data", help="data root")
    ap.add_argument("--out", required=True, help="checkpoint to write")
    ap.add_argument("--plot", required=True, help="per-epoch CSV to write")
    args = ap.parse_args()
    p = config.load(args.params)
    if args.model not in p.models:
        raise config.ConfigError(f"model {args.model!r} is not in params models: {', '.join(p.models)}")
    cfg = p.models[args.model].pretrain
    device = setup(p, cfg.seed)
    splits = data.Splits(args.data, p.data.val_size, p.data.val_seed)
    on = lambda t: (t[0].to(device), t[1].to(device))  # noqa: E731
    with open_run(p, f"pretrain@{args.model}", args.model, data.dataset_md5(args.data)) as mlrun:
        mlrun.params({"pretrain": cfg.model_dump(), "data": p.data.model_dump(exclude={"md5"}), "run": p.run.model_dump()})
        model = build(args.model).to(device)
        epochs = fit(model, cfg, on(splits.train), on(splits.val), on(splits.test), device,
                     log=epoch_logger(mlrun, f"pretrain {args.model}"))
        test_acc = accuracy(model, *on(splits.test))
        io.save_torch(args.out, checkpoint(args.model, model, weight_std(model), history=[]))
        io.write_text(args.plot, "epoch,train_loss,val_accuracy,test_accuracy\n" + "".join(
            f"{e['epoch']},{e['train_loss']:.6f},{e['val_accuracy']:.6f},{e['test_accuracy']:.6f}\n" for e in epochs))
        mlrun.metrics({"final_val_accuracy": epochs[-1]["val_accuracy"], "test_accuracy": test_acc})
    seconds = sum(e["seconds"] for e in epochs)
    print(f"pretrain {args.model}: {cfg.epochs} epochs in {seconds:.0f} s "
          f"({seconds / cfg.epochs:.2f} s/epoch), val {epochs[-1]['val_accuracy']:.4f}, test {test_acc:.4f} -> {args.out}")


if __name__ == "__main__":
    run(main)
