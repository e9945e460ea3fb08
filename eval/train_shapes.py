"""Train the shapes VLM (:mod:`tokenprune.eval.shapes_model`) on the shapes suite, from scratch.

    python -m tokenprune.eval.train_shapes --out DIR [--steps N] [--batch B] [--init DIR]

Every step draws a fresh batch from the endless ``train`` stream (no example is seen twice; ``--start``
is the first one) and trains on the replies only (:func:`training_batch`): a ``--describe`` share of the
rows asks for the scene's description, the others ask the example's own question, then one question of
every other kind the scene answers, in one conversation. ``--patch-loss`` adds an auxiliary loss of linear
heads on the tower's patch features (:class:`PatchProbe`, not saved). AdamW with a linear warm-up and
cosine decay on ``--device``; ``--bf16`` autocasts. Every 50 steps it prints the loss; every ``--every`` steps
it scores ``--validate`` validation questions and saves a complete checkpoint (weights, config and
processor) to ``--out``; ``--init`` continues from such a checkpoint, so training can run in pieces
(the shipped model's card lists its pieces).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import random
import time
from collections.abc import Callable, Iterator

import numpy
import torch

from . import shapes_model, suite
from .accuracy import score


def training_batch(processor, examples: list[suite.Example], describe: list[bool] | None = None) -> dict:
    """Processor tensors of ``examples``' conversations, right-padded, and ``labels`` that are -100
    everywhere except the assistant's replies and their closing ``</s>``.

    Each conversation shows the image once. Where ``describe`` is True it asks :data:`suite.DESCRIBE` and
    the reply is the scene's :func:`~suite.description`; elsewhere the example's own question comes
    first (exactly the prompt the model is scored on), then one question of every other kind the scene
    can answer (:func:`suite.questions`), in random order: more answers per encoded image.
    """
    describe = describe or [False] * len(examples)
    texts = [
        processor.apply_chat_template(_conversation(item, dense), tokenize=False)
        for item, dense in zip(examples, describe, strict=True)
    ]
    inputs = processor(
        images=[item.image for item in examples], text=texts, return_tensors="pt", padding=True
    )
    ids = inputs["input_ids"]
    return dict(
        input_ids=ids,
        attention_mask=inputs["attention_mask"],
        pixel_values=inputs["pixel_values"],
        labels=_reply_labels(ids, processor.tokenizer),
    )


def _conversation(item: suite.Example, dense: bool) -> list[dict]:
    if dense:
        turns = [(suite.DESCRIBE, suite.description(item.things))]
    else:
        rng = random.Random(item.question + item.answer + str(item.things))
        others = [(q, a) for kind, q, a in suite.questions(item.things, rng) if kind != item.kind]
        rng.shuffle(others)
        turns = [(item.question, item.answer), *others]
    (first_question, _), *_ = turns
    conversation = []
    for number, (question, reply) in enumerate(turns):
        content = question if number else [{"type": "image"}, {"type": "text", "text": first_question}]
        conversation += [{"role": "user", "content": content}, {"role": "assistant", "content": reply}]
    return conversation


def _reply_labels(ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """``ids`` where a token belongs to a reply (after an ``ASSISTANT:`` colon, up to and including its
    ``</s>``), -100 elsewhere."""
    colon, eos = tokenizer.convert_tokens_to_ids(":"), tokenizer.eos_token_id
    labels = torch.full_like(ids, -100)
    for row, tokens in enumerate(ids.tolist()):
        start = None
        for position, token in enumerate(tokens):
            if token == colon:
                start = position + 1
            elif token == eos and start is not None:
                labels[row, start : position + 1] = ids[row, start : position + 1]
                start = None
    return labels


#: Classes of the per-patch auxiliary targets: colour (letters are black) and shape (or "letter"), where
#: class 0 is "nothing here", and the letter, asked only of patches with ink on them.
PATCH_CLASSES = (
    ("", *suite.COLORS, "black"),
    ("", *suite.SHAPES, "letter"),
    suite.LETTERS,
)
#: A pixel whose brightest channel is below this is ink of a letter (shapes' colours all have a channel
#: above 180, backgrounds all above 225).
INK = 128


def patch_targets(examples: list[suite.Example], patch_size: int) -> torch.Tensor:
    """Long ``[B, patches, 3]``: for every patch of every example, the colour and shape class of the item
    in the grid cell the patch lies in (0 where the cell is empty), and the letter class where the patch
    holds ink of the scene's letter (-100, ignored, elsewhere). A free dense signal that teaches the
    vision tower what each region holds; the letter targets sit on the glyph itself, since a cell-wide
    letter target asks mostly blank patches to name it."""
    patches_per_cell = suite.CELL // patch_size
    side = suite.GRID * patches_per_cell
    targets = torch.zeros(len(examples), side, side, 3, dtype=torch.long)
    targets[..., 2] = -100
    for row, item in enumerate(examples):
        for thing in item.things:
            letter = thing.shape == "letter"
            top, left = thing.row * patches_per_cell, thing.column * patches_per_cell
            cell = targets[row, top : top + patches_per_cell, left : left + patches_per_cell]
            cell[..., 0] = PATCH_CLASSES[0].index("black" if letter else thing.label)
            cell[..., 1] = PATCH_CLASSES[1].index(thing.shape)
            if letter:
                ink = torch.from_numpy(numpy.asarray(item.image).max(-1) < INK)
                inked = ink.unflatten(0, (side, patch_size)).unflatten(2, (side, patch_size)).any(3).any(1)
                targets[row, inked, 2] = PATCH_CLASSES[2].index(thing.label)
    return targets.flatten(1, 2)


class PatchProbe(torch.nn.Module):
    """Linear heads on the vision features LLaVA projects (the tower's ``vision_feature_layer`` output),
    read through a forward hook on the tower; used for the auxiliary loss only, never saved."""

    def __init__(self, model):
        super().__init__()
        config = model.config
        self.heads = torch.nn.ModuleList(
            torch.nn.Linear(config.vision_config.hidden_size, len(classes)) for classes in PATCH_CLASSES
        )
        self.layer = config.vision_feature_layer
        self.features = None
        self.handle = model.model.vision_tower.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self.features = output.hidden_states[self.layer][:, 1:]  # without CLS, as the "default" strategy

    def loss(self, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the three heads on the last forward's patch features (a head whose
        targets are all ignored, as the letter head's in a batch without letters, adds nothing)."""
        losses = [
            torch.nn.functional.cross_entropy(
                head(self.features).flatten(0, 1).float(), targets[..., i].flatten(), reduction="sum"
            )
            / (targets[..., i] != -100).sum().clamp(min=1)
            for i, head in enumerate(self.heads)
        ]
        return sum(losses) / len(losses)


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
    device = torch.device(args.device)
    model.to(device).train()
    probe = PatchProbe(model).to(device) if args.patch_loss else None
    parameters = [*model.parameters(), *(probe.parameters() if probe else ())]
    validation = suite.examples("validation", args.validate)
    out = pathlib.Path(args.out)

    def batch_loss(examples: list[suite.Example]) -> torch.Tensor:
        describe = [random.random() < args.describe for _ in examples]
        batch = {
            key: value.to(device) for key, value in training_batch(processor, examples, describe).items()
        }
        loss = model(**batch).loss
        if probe is None:
            return loss
        targets = patch_targets(examples, model.config.vision_config.patch_size).to(device)
        return loss + args.patch_loss * probe.loss(targets)

    def validate() -> dict[str, float]:
        model.eval()
        accuracy = score(model, processor, validation, batch_size=50)  # pads on the left for generate
        processor.tokenizer.padding_side = "right"
        model.train()
        return accuracy

    def save() -> None:
        model.save_pretrained(out)
        processor.tokenizer.padding_side = "left"
        processor.save_pretrained(out)
        processor.tokenizer.padding_side = "right"

    stream = suite.iter_examples("train", start=args.start)
    training_loop(args, parameters, stream, batch_loss, validate, save)


def training_loop(
    args: argparse.Namespace,
    parameters: list[torch.nn.Parameter],
    stream: Iterator,
    batch_loss: Callable[[list], torch.Tensor],
    validate: Callable[[], dict[str, float]],
    save: Callable[[], None],
) -> None:
    """The loop of every suite's training script: ``args.steps`` steps (fewer where ``args.minutes`` run
    out first) of AdamW on ``parameters``, each on the loss ``batch_loss`` gives of the next ``args.batch``
    examples of ``stream`` (under bf16 autocast with ``args.bf16``), at :func:`learning_rate`'s rate. Every
    50 steps it prints the mean loss; every ``args.every`` steps and at the last it prints ``validate()``'s
    accuracy per kind and the next unseen example, and calls ``save()``."""
    device = torch.device(args.device)
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.05, betas=(0.9, 0.98))
    random.seed(args.seed)
    began, running = time.time(), []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        examples = [next(stream) for _ in range(args.batch)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = batch_loss(examples)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running.append(loss.item())
        elapsed = time.time() - began
        if (step + 1) % 50 == 0:
            recent = running[-50:]
            print(f"step {step + 1} loss {sum(recent) / len(recent):.3f} ({elapsed:.0f}s)", flush=True)
        last = step + 1 == args.steps or elapsed > args.minutes * 60
        if (step + 1) % args.every == 0 or last:
            kinds = " ".join(f"{kind}={value:.2f}" for kind, value in validate().items())
            print(
                f"step {step + 1} loss {sum(running) / len(running):.3f} {kinds} "
                f"({time.time() - began:.0f}s, next example {args.start + (step + 1) * args.batch})",
                flush=True,
            )
            running = []
            save()
        if last:
            break


def training_arguments(description: str, batch: int, warmup: int, validate: int) -> argparse.ArgumentParser:
    """The command-line options a suite's training script shares with the others (the checkpoint, the
    schedule, the stream of examples, the device), with its own defaults for ``batch``, ``warmup`` and
    ``validate``; the script adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, help="directory the checkpoint is written to")
    parser.add_argument("--init", help="continue from this checkpoint instead of a fresh model")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--every", type=int, default=250, help="validate and save every this many steps")
    parser.add_argument("--validate", type=int, default=validate, help="validation examples per report")
    parser.add_argument("--start", type=int, default=0, help="index of the first training example")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="'cpu', 'cuda', ...")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--minutes", type=float, default=float("inf"), help="stop (and save) after this long")
    return parser


def main() -> None:
    parser = training_arguments(__doc__.split("\n")[0], batch=32, warmup=200, validate=300)
    parser.add_argument(
        "--patch-loss", type=float, default=0.0, help="weight of the auxiliary per-patch loss (0: none)"
    )
    parser.add_argument(
        "--describe", type=float, default=0.5, help="share of rows asked to describe the scene"
    )
    train(parser.parse_args())


if __name__ == "__main__":
    main()
