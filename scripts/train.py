#!/usr/bin/env python
"""Train a zoo model with SGD and write curvscope checkpoint bundles at chosen epochs.

The shipped checkpoints were made with:

    python scripts/train.py --model lenet5 --model-kwargs '{"in_channels": 1}' --data digits \
        --loss nll --epochs 21 --save-at 1,21 --lr 0.05 --batch-size 100 --seed 0 \
        --out checkpoints/lenet5_digits

Training follows the paper's setup (docs/DESIGN.md §2): plain SGD on mini-batches of
100, no augmentation, the zoo's N(0, σ²/fan_in) initialisation, log-softmax
outputs with the NLL loss. Deterministic on the CPU for a given seed.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from curvscope.sources.checkpoint import save_checkpoint
from curvscope.sources.datasets import Dataset, build_dataset
from curvscope.sources.losses import build_loss
from curvscope.sources.zoo import build_model


def accuracy(model: torch.nn.Module, data: Dataset, batch_size: int = 500) -> float:
    """Fraction of `data` classified correctly by `model` in eval mode."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            out = model(data.inputs[i:i + batch_size])
            correct += int((out.argmax(1) == data.targets[i:i + batch_size]).sum())
    return correct / len(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--model-kwargs", default="{}", type=json.loads)
    parser.add_argument("--data", required=True)
    parser.add_argument("--data-kwargs", default="{}", type=json.loads)
    parser.add_argument("--data-root", help="folder (cifar10, mnist) or file (npz) to read the data from")
    parser.add_argument("--loss", default="nll")
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--save-at", default="", help="comma-separated epochs to save (default: the last)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="path prefix: <out>_epNN.pt")
    args = parser.parse_args(argv)

    if args.data_root:
        args.data_kwargs = {**args.data_kwargs, "root": args.data_root}
    torch.manual_seed(args.seed)
    save_at = {int(e) for e in args.save_at.split(",") if e} or {args.epochs}
    train = build_dataset(args.data, "train", args.data_kwargs)
    test = build_dataset(args.data, "test", args.data_kwargs)
    model = build_model(args.model, args.model_kwargs)
    loss_fn = build_loss(args.loss)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    gen = torch.Generator().manual_seed(args.seed)
    command = "python scripts/train.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train), args.batch_size):
            idx = order[i:i + args.batch_size]
            opt.zero_grad()
            loss_fn(model(train.inputs[idx]), train.targets[idx]).backward()
            opt.step()
        if epoch in save_at:
            acc_train, acc_test = accuracy(model, train), accuracy(model, test)
            path = Path(f"{args.out}_ep{epoch:02d}.pt")
            path.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(path, model, model_name=args.model, model_kwargs=args.model_kwargs,
                            data={"name": args.data, "kwargs": args.data_kwargs}, loss=args.loss, epoch=epoch,
                            training={"optimizer": "SGD", "lr": args.lr, "momentum": args.momentum,
                                      "batch_size": args.batch_size, "seed": args.seed, "epochs": epoch,
                                      "train_accuracy": acc_train, "test_accuracy": acc_test,
                                      "torch_version": str(torch.__version__), "command": command})
            print(f"epoch {epoch:3d}: train accuracy {acc_train:.4f}, test accuracy {acc_test:.4f} -> {path} "
                  f"({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
