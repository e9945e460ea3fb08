"""The shapes suite as an lmms-eval task, ``tokenprune_shapes``, for ``--include_path``.

:func:`export_lmms_task` writes a directory that lmms-eval reads as a local task::

    python -c "from tokenprune.eval.lmms_task import export_lmms_task; export_lmms_task('shapes-task')"
    python -m lmms_eval --model tokenprune --model_args pretrained=CKPT,method=dart,keep_ratio=0.25 \\
        --include_path shapes-task --tasks tokenprune_shapes --batch_size 16

The task YAML points its functions (``!function tokenprune.eval.lmms_task.doc_to_visual`` ...) at this
module, which lmms-eval imports by name when no file of that name lies beside the YAML. A reply is
scored by its first word, lower-cased and without surrounding punctuation, against the one-word answer:
``exact_match`` over every question and ``<kind>_exact_match`` over each kind of
:data:`suite.KINDS` present.
"""

from __future__ import annotations

import json
import os
import pathlib
import string

from PIL import Image

from . import suite

TASK = "tokenprune_shapes"
DATA_FILE = "data.jsonl"
TASK_FILE = f"{TASK}.yaml"
#: Question/answer pairs of the default export: 100 of each kind, as ``tokenprune eval`` scores.
DEFAULT_COUNT = 600
#: New tokens per reply: a one-word answer, with room for a real model's capital or full stop.
MAX_NEW_TOKENS = 5


def export_lmms_task(
    directory: str | os.PathLike, split: str | int = "test", count: int = DEFAULT_COUNT
) -> pathlib.Path:
    """Write ``count`` examples of ``split`` as task ``tokenprune_shapes`` into ``directory``.

    Writes ``images/NNNNN.png``, ``data.jsonl`` (one row per example: ``id``, ``question``, ``answer``,
    ``kind`` and the image's absolute path) and ``tokenprune_shapes.yaml``, whose ``data_files`` is the
    absolute path of ``data.jsonl`` (lmms-eval loads it with the ``json`` builder of ``datasets``, no
    download). Returns the path of the YAML.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1 question, got {count}")
    root = pathlib.Path(directory).resolve()
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for index, item in enumerate(suite.examples(split, count)):
        image = root / "images" / f"{index:05d}.png"
        item.image.save(image)
        rows.append(
            dict(id=index, question=item.question, answer=item.answer, kind=item.kind, image=str(image))
        )
    (root / DATA_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = root / TASK_FILE
    kinds = [kind for kind in suite.KINDS if any(row["kind"] == kind for row in rows)]
    task.write_text(task_yaml(root / DATA_FILE, kinds))
    return task


def task_yaml(data_file: pathlib.Path, kinds: list[str]) -> str:
    """The task's YAML for the rows in ``data_file``: one ``test`` split, ``generate_until`` with greedy
    decoding, and a mean-aggregated metric for every question and for each of ``kinds``.

    Written as text because lmms-eval's ``!function`` tag is not plain YAML that a dumper produces.
    """
    function = f"!function {__name__}"
    metrics = "".join(
        f"  - metric: {name}\n    aggregation: mean\n    higher_is_better: true\n"
        for name in ["exact_match", *(f"{kind}_exact_match" for kind in kinds)]
    )
    return (
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {json.dumps(str(data_file))}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        f"doc_to_visual: {function}.doc_to_visual\n"
        f"doc_to_text: {function}.doc_to_text\n"
        "doc_to_target: answer\n"
        f"process_results: {function}.process_results\n"
        "generation_kwargs:\n"
        f"  max_new_tokens: {MAX_NEW_TOKENS}\n"
        "  temperature: 0\n"
        "  do_sample: false\n"
        '  until: ["\\n"]\n'
        f"metric_list:\n{metrics}"
        "lmms_eval_specific_kwargs:\n"
        "  default:\n"
        '    pre_prompt: ""\n'
        '    post_prompt: ""\n'
        "metadata:\n"
        "  version: 1.0\n"
    )


def doc_to_visual(doc: dict) -> list[Image.Image]:
    """The document's scene, as the one RGB image of its prompt."""
    with Image.open(doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question between the task's ``pre_prompt`` and ``post_prompt`` (both empty by default: the
    shapes model knows only the suite's words; a real model may want "Answer with one word.")."""
    prompts = lmms_eval_specific_kwargs or {}
    return f"{prompts.get('pre_prompt', '')}{doc['question']}{prompts.get('post_prompt', '')}"


def first_word(reply: str) -> str:
    """The first word of ``reply``, lower-cased, without surrounding punctuation ("" for no word)."""
    words = reply.split()
    return words[0].strip(string.punctuation).lower() if words else ""


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """``exact_match`` and ``<kind>_exact_match`` of the document: 1.0 when the first word of the reply
    is the answer, else 0.0. Only the document's own kind gets a value, so each kind's mean is over
    that kind's questions."""
    score = float(first_word(results[0]) == doc["answer"])
    return {"exact_match": score, f"{doc['kind']}_exact_match": score}
