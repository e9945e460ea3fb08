"""Train the shapes VLM (:mod:`tokenprune.eval.shapes_model`) on the shapes suite, from scratch.

    python -m tokenprune.eval.train_shapes --out DIR [--steps N] [--batch B] [--init DIR]

Every step draws a fresh batch from the endless ``train`` stream (no example is seen twice), builds
``USER: <image>\\n{question} ASSISTANT: {answer}</s>`` and takes the cross-entropy of the answer word and
the end-of-sequence token only. AdamW with a linear warm-up and cosine decay; bf16 autocast where the
CPU or GPU supports it. Every ``--every`` steps the model is scored on 300 validation examples and
saved to ``--out`` (weights, config and processor: a complete checkpoint); ``--init`` continues from
such a checkpoint, so training can run in pieces. Prints one line per report.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import time

import torch

from . import shapes_model, suite
from .accuracy import score


def training_batch(processor, examples: list[suite.Example]) -> dict:
    """Processor tensors of ``examples`` with their answers appended, right-padded, and ``labels`` that
    are -100 everywhere except the answer word and the closing ``</s>`` of each row."""
    texts = [f"{shapes_model.prompt(processor, item.question)} {item.answer}</s>" for item in examples]
    inputs = processor(
        images=[item.image for item in examples], text=texts, return_tensors="pt", padding=True
    )
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if bool(mask[:, 0].all()) and not bool(mask.all()):  # left padding: move every row's tokens right-aligned
        order = torch.argsort(mask, dim=1, stable=True, descending=True)
        ids, mask = ids.gather(1, order), mask.gather(1, order)
    lengths = mask.sum(1)
    labels = torch.full_like(ids, -100)
    rows = torch.arange(len(examples))
    for back in (1, 2):
        labels[rows, lengths - back] = ids[rows, lengths - back]
    return dict(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"], labels=labels)


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to a tenth of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(args: argparse.Namespace) -> None:
    from transformers import LlavaForConditionalGeneration

    torch.set_num_threads(args.threads)
    processor = shapes_model.processor()
    processor.tokenizer.padding_side = "right"
    if args.init:
        model = LlavaForConditionalGeneration.from_pretrained(args.init, attn_implementation="sdpa")
    else:
        model = shapes_model.build(args.seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05, betas=(0.9, 0.98))
    stream = suite.iter_examples("train", start=args.start)
    validation = suite.examples("validation", 300)
    out = pathlib.Path(args.out)
    began, running = time.time(), []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        batch = training_batch(processor, [next(stream) for _ in range(args.batch)])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running.append(loss.item())
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            model.eval()
            processor.tokenizer.padding_side = "left"
            accuracy = score(model, processor, validation, batch_size=50)
            processor.tokenizer.padding_side = "right"
            model.train()
            kinds = " ".join(f"{kind}={value:.2f}" for kind, value in accuracy.items())
            print(
                f"step {step + 1} loss {sum(running) / len(running):.3f} {kinds} "
                f"({time.time() - began:.0f}s, next example {args.start + (step + 1) * args.batch})",
                flush=True,
            )
            running = []
            model.save_pretrained(out)
            processor.tokenizer.padding_side = "left"
            processor.save_pretrained(out)
            processor.tokenizer.padding_side = "right"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory the checkpoint is written to")
    parser.add_argument("--init", help="continue from this checkpoint instead of a fresh model")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--every", type=int, default=250, help="validate and save every this many steps")
    parser.add_argument("--start", type=int, default=0, help="index of the first training example")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False)
    train(parser.parse_args())


if __name__ == "__main__":
    main()
