"""Train the video VLM (:mod:`tokenprune.eval.video_model`) on the video suite, from scratch.

    python -m tokenprune.eval.train_video --out DIR [--steps N] [--batch B] [--init DIR] [--start I]

Every step draws a fresh batch from the endless ``train`` stream (``--start`` is the first example) and
trains on the replies only: each clip's conversation asks the example's own question first (exactly the
prompt the model is scored on), then every other question the clip answers (:func:`video_suite.questions`),
in random order,
and on a ``--describe`` share of the rows ends by asking for the clip's description (every actor's
colour, shape and role). ``--token-loss`` adds an auxiliary loss of linear heads on the video tokens
(:class:`TokenProbe`, not saved) naming, in the decoder's own word embeddings, what each token's
16x16-pixel region shows, its classes balanced within the batch. AdamW with a linear
warm-up and cosine decay (``train_shapes.learning_rate``); ``--bf16`` autocasts. Every 50 steps it
prints the loss; every ``--every`` steps it scores ``--validate`` validation questions per kind and saves
a complete checkpoint (weights, config and tokenizer) to ``--out``, as does the last step or
``--minutes`` of wall time running out; ``--init`` continues from such a checkpoint, so training can run
in pieces.
"""

from __future__ import annotations

import argparse
import pathlib
import random

import numpy
import torch
from PIL import Image, ImageDraw

from . import video_model, video_suite
from .accuracy import accuracy_by_kind
from .suite import COLORS, SHAPES, draw_shape
from .train_shapes import training_arguments, training_loop


def conversation(item: video_suite.Example, describe: bool) -> list[tuple[str, str]]:
    """The training turns of one clip: its own question, every other one, then maybe the description."""
    rng = random.Random(f"{item.question}/{item.answer}/{item.actors}")
    others = [(q, a) for _, q, a in video_suite.questions(item.actors) if q != item.question]
    rng.shuffle(others)
    turns = [(item.question, item.answer), *others]
    if describe:
        turns.append((video_suite.DESCRIBE, video_suite.description(item.actors)))
    return turns


#: Classes of the per-token auxiliary targets (class 0: nothing there): the colour and shape of the actor
#: that covers most of the token's region in the first frame of its pair, and how it moves (each a word
#: of the vocabulary).
TOKEN_CLASSES = (("", *COLORS), ("", *SHAPES), ("", "stays", *video_suite.DIRECTIONS))


def token_targets(examples: list[video_suite.Example], region: int, temporal: int) -> torch.Tensor:
    """Long ``[tokens, 3]`` over the batch's video tokens in the model's order (clip, temporal patch,
    row, column): for each, the classes of :data:`TOKEN_CLASSES` of the actor covering most of the
    token's ``region``-pixel square in the first frame of its ``temporal`` frames (0 where none does)."""
    side = video_suite.FRAME_SIZE // region
    rows = []
    for item in examples:
        for t in range(0, video_suite.FRAMES, temporal):
            labels = Image.new("L", (video_suite.FRAME_SIZE,) * 2, 0)
            canvas = ImageDraw.Draw(labels)
            for number, actor in enumerate(item.actors, start=1):
                if (state := actor.state(t)) is not None:
                    draw_shape(canvas, state.shape, state.x, state.y, state.size, number)
            blocks = numpy.asarray(labels).reshape(side, region, side, region).transpose(0, 2, 1, 3)
            for block in blocks.reshape(side * side, -1):
                counts = numpy.bincount(block, minlength=len(item.actors) + 1)[1:]
                if not counts.any():
                    rows.append((0, 0, 0))
                    continue
                actor = item.actors[int(counts.argmax())]
                state = actor.state(t)
                motion = actor.direction if actor.role == "moves" else "stays"
                rows.append(
                    (
                        TOKEN_CLASSES[0].index(state.color),
                        TOKEN_CLASSES[1].index(state.shape),
                        TOKEN_CLASSES[2].index(motion),
                    )
                )
    return torch.tensor(rows)


class TokenProbe(torch.nn.Module):
    """Classifiers of the video tokens the vision tower gives the decoder (read through a forward hook)
    whose class weights are the decoder's own input embeddings of the class words (and a learned vector
    for "nothing"), so that a token showing a red shape comes to look like the word ``red`` to the
    decoder; used for the auxiliary loss only (the embeddings train with it), never saved."""

    def __init__(self, model, tokenizer):
        super().__init__()
        width = model.config.text_config.hidden_size
        self.embed = [model.get_input_embeddings()]  # in a list: the model's, not a module of the probe
        self.words = [torch.tensor(tokenizer.convert_tokens_to_ids(list(c[1:]))) for c in TOKEN_CLASSES]
        self.nothing = torch.nn.Parameter(torch.zeros(len(TOKEN_CLASSES), width))
        self.scale = torch.nn.Parameter(torch.full((len(TOKEN_CLASSES),), 10.0))
        self.features = None
        model.model.visual.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self.features = output.pooler_output

    def loss(self, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the classifiers on the last forward's video tokens, each class weighted
        by the inverse of its count in the batch (:func:`balanced`): background tokens outnumber the
        actors' and ``stays`` outnumbers every direction, and unweighted, the motion classifier learnt
        to say ``stays`` for moving shapes too."""
        losses = []
        for i, words in enumerate(self.words):
            weight = torch.cat([self.nothing[i : i + 1], self.embed[0](words.to(self.nothing.device))])
            logits = self.scale[i] * self.features.float() @ weight.float().T
            classes = balanced(targets[:, i], len(weight))
            losses.append(torch.nn.functional.cross_entropy(logits, targets[:, i], weight=classes))
        return sum(losses) / len(losses)


def balanced(targets: torch.Tensor, classes: int) -> torch.Tensor:
    """Per-class weights that give every class present in ``targets`` the same total weight (0 for the
    absent ones)."""
    counts = torch.bincount(targets, minlength=classes).float()
    return torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))


def validate(model, inputs, examples) -> dict[str, float]:
    """Accuracy per kind of the model (put in eval mode for the call) on ``examples``."""
    model.eval()
    accuracy = accuracy_by_kind(
        examples, video_model.answers(model, inputs, examples, batch_size=35), video_suite.KINDS
    )
    model.train()
    return accuracy


def train(args: argparse.Namespace) -> None:
    from transformers import Qwen2VLForConditionalGeneration

    torch.set_num_threads(args.threads)
    if args.init:
        model = Qwen2VLForConditionalGeneration.from_pretrained(args.init, attn_implementation="sdpa")
    else:
        model = video_model.build(args.seed)
    tokenizer = video_model.tokenizer()
    inputs = video_model.VideoInputs(tokenizer, model.config.vision_config)
    device = torch.device(args.device)
    model.to(device).train()
    probe = TokenProbe(model, tokenizer).to(device) if args.token_loss else None
    parameters = [*model.parameters(), *(probe.parameters() if probe else ())]
    validation = video_suite.examples("validation", args.validate)
    out = pathlib.Path(args.out)

    def batch_loss(examples: list[video_suite.Example]) -> torch.Tensor:
        turns = [conversation(item, random.random() < args.describe) for item in examples]
        batch = {k: v.to(device) for k, v in inputs([item.frames for item in examples], turns).items()}
        loss = model(**batch).loss
        if probe is None:
            return loss
        vision = model.config.vision_config
        region = vision.patch_size * vision.spatial_merge_size
        targets = token_targets(examples, region, vision.temporal_patch_size).to(device)
        return loss + args.token_loss * probe.loss(targets)

    def validate_now() -> dict[str, float]:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            return validate(model, inputs, validation)

    def save() -> None:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    stream = video_suite.iter_examples("train", start=args.start)
    training_loop(args, parameters, stream, batch_loss, validate_now, save)


def main() -> None:
    parser = training_arguments(__doc__.split("\n")[0], batch=16, warmup=100, validate=140)
    parser.add_argument("--describe", type=float, default=0.5, help="share of rows ending with a description")
    parser.add_argument(
        "--token-loss", type=float, default=0.0, help="weight of the auxiliary per-token loss (0: none)"
    )
    train(parser.parse_args())


if __name__ == "__main__":
    main()
