"""The speed benchmark runs end to end on the tiny model and writes consistent results."""

import json

import pytest
import torch
from typer.testing import CliRunner

from tokenprune.cli import app
from tokenprune.eval.archs import ARCHS
from tokenprune.eval.bench import build_model, markdown_table, run_benchmark, write_results
from tokenprune.testing import tiny_config


@pytest.fixture(scope="module")
def rows():
    model = build_model(ARCHS["tiny"](), "sdpa", torch.device("cpu"), torch.float32)
    methods = ["uniform", "fastv", "fastv+drop_early_kv"]
    return run_benchmark(model, methods, [0.5, 0.25], [1, 2], repeats=1, new_tokens=3)


def test_the_7b_model_is_built_on_the_target_device():
    """Every weight is created where the benchmark runs (``meta`` stands in for the GPU: nothing is
    allocated, and nothing of the 7 billion parameters passes through the CPU)."""
    model = build_model(ARCHS["llava-1.5-7b"](), "sdpa", torch.device("meta"), torch.bfloat16)
    devices = {p.device.type for p in model.parameters()}
    assert devices == {"meta"} and sum(p.numel() for p in model.parameters()) > 7e9
    assert not model.training


@pytest.mark.parametrize("arch", ["llava-1.5-7b", "qwen2.5-vl-small"])
def test_each_architecture_is_built_as_its_own_family(arch):
    model = build_model(ARCHS[arch](), "sdpa", torch.device("meta"), torch.bfloat16)
    assert model.config.model_type == {"llava-1.5-7b": "llava", "qwen2.5-vl-small": "qwen2_5_vl"}[arch]
    assert type(model).__name__.endswith("ForConditionalGeneration")


def test_a_qwen_architecture_benchmarks_decoder_and_kv_methods():
    """Qwen2.5-VL's images (256 tokens each here) through the same rows: the kv method keeps every cache
    entry, the decoder method at layer 2 drops the pruned tokens from the layers after it."""
    model = build_model(tiny_config("qwen2_5_vl"), "sdpa", torch.device("cpu"), torch.float32)
    rows = run_benchmark(model, ["fastv", "sparsevila"], [0.25], [1], repeats=1, new_tokens=3)
    by = {r.method: r for r in rows}
    assert sorted(by) == ["fastv", "ideal", "sparsevila", "unpruned"]
    assert by["unpruned"].visual_tokens == 256 and by["unpruned"].kept_tokens == 256
    assert all(by[m].kept_tokens == 64 for m in ("ideal", "fastv", "sparsevila"))
    assert by["ideal"].prompt_tokens == by["unpruned"].prompt_tokens - 192
    assert by["sparsevila"].kv_cache_mib == pytest.approx(by["unpruned"].kv_cache_mib)
    assert by["fastv"].kv_cache_mib < by["unpruned"].kv_cache_mib
    assert by["sparsevila"].layer == 0 and by["fastv"].layer == 2


def test_a_video_workload_times_video_and_decoder_methods_against_its_ideal(tmp_path):
    """A video of 3 frames of 64 tokens per prompt instead of the image: the video method in the tower, the
    decoder method in the language model, each against the ideal of its kept tokens; the command refuses
    a model without Qwen-VL videos."""
    model = build_model(tiny_config("qwen2_5_vl"), "sdpa", torch.device("cpu"), torch.float32)
    rows = run_benchmark(model, ["evs", "fastv"], [0.25], [2], repeats=1, new_tokens=2, video_frames=3)
    by = {r.method: r for r in rows}
    assert by["unpruned"].visual_tokens == 3 * 64 and by["unpruned"].batch_size == 2
    assert all(by[m].kept_tokens == 48 for m in ("ideal", "evs", "fastv"))
    assert by["ideal"].prompt_tokens == by["unpruned"].prompt_tokens - 3 * 64 + 48
    assert by["evs"].kv_cache_mib < by["unpruned"].kv_cache_mib and by["evs"].layer == 0
    refused = CliRunner().invoke(app, ["bench", "--video-frames", "4", "--out", str(tmp_path)])
    assert refused.exit_code == 2 and "Qwen-VL" in refused.output


def test_rows_cover_every_configuration(rows):
    keys = [(r.batch_size, r.method, r.kept_tokens) for r in rows]
    for batch in (1, 2):
        assert (batch, "unpruned", 64) in keys
        for kept in (32, 16):
            for method in ("ideal", "uniform", "fastv", "fastv+drop_early_kv"):
                assert (batch, method, kept) in keys


def test_ratios_are_consistent(rows):
    for r in rows:
        if r.method in ("unpruned",):
            continue
        base = next(b for b in rows if b.method == "unpruned" and b.batch_size == r.batch_size)
        ideal = next(
            i
            for i in rows
            if i.method == "ideal" and i.batch_size == r.batch_size and i.kept_tokens == r.kept_tokens
        )
        assert r.prefill_speedup == pytest.approx(base.prefill_ms / r.prefill_ms)
        assert r.speedup_vs_ideal == pytest.approx(r.prefill_speedup / r.ideal_speedup)
        if r.method == "ideal":  # a method's ideal is the one timed in turns with it
            assert r.ideal_speedup == pytest.approx(base.prefill_ms / ideal.prefill_ms)
        assert 0 <= r.selection_share < 1
        if r.method != "ideal":
            assert (
                r.selection_ms > 0
                and r.layer == {"uniform": 0, "fastv": 2, "fastv+drop_early_kv": 2}[r.method]
            )
            assert not r.decode_tokens_per_s <= 0  # a rate, or NaN when lost in timing noise
            base_launches = next(b for b in rows if b.method == "unpruned" and b.batch_size == r.batch_size)
            assert 0 < r.prefill_launches < 2 * base_launches.prefill_launches


def test_a_decoder_method_is_held_to_the_ideal_of_its_layers_lengths():
    """A layer-K method's layers before K run on every visual token, the ones after on its kept ones: its
    ideal lies between the ideal of its kept tokens and that of every token, by the share of layers (and
    tokens) it runs in full; a pre-LLM or vision method's is the ideal of its kept tokens."""
    import tokenprune as tp
    from tokenprune.eval.bench import bench_config, decoder_lengths, layer_ideal_ms

    def lengths(method: str, depth: int = 8) -> list[int]:
        return decoder_lengths(bench_config(method, 64 / 576).for_depth(depth), 576, depth)

    assert lengths("fastv") == [576] * 2 + [64] * 6
    assert lengths("saint_llm+saint") == [376] * 2 + [64] * 6  # the tower stage first
    pyramid = tp.PrunerConfig("pdrop", keep_ratio=64 / 576).for_depth(8).stages(576)
    assert lengths("pdrop") == [576] * 2 + [pyramid[0][1]] * 2 + [pyramid[1][1]] * 2 + [64] * 2
    assert lengths("uniform") == lengths("tome") == lengths("sparsevila") == [64] * 8
    assert layer_ideal_ms(100.0, 300.0, [64] * 8, 576, 64) == 100.0
    assert layer_ideal_ms(100.0, 300.0, [576] * 8, 576, 64) == 300.0
    assert layer_ideal_ms(100.0, 300.0, [576] * 2 + [64] * 6, 576, 64) == 150.0
    assert layer_ideal_ms(100.0, 300.0, [320] * 8, 576, 64) == 200.0


def test_a_method_is_held_to_its_ideal_by_the_median_ratio_of_each_turn(monkeypatch):
    """The machine's speed drifts between turns: each turn's ideal is compared with the method's prefill of
    the same turn, and the median of those ratios scales the method's fastest prefill (the two fastest,
    taken apart, would pair the ideal's fastest moment, turn 1 here, with another turn's). A layer-K
    method's per-turn ideal is its layer ideal from that turn's ideal and full prefills."""
    from tokenprune.eval import bench

    model = build_model(ARCHS["tiny"](), "sdpa", torch.device("cpu"), torch.float32)
    cpu = torch.device("cpu")
    runner = bench.Runner(model, bench.benchmark_inputs(model, 1, 8, cpu), cpu, 1, 2)
    turns = {  # a fast moment in turn 1 for both, the machine slower after it
        "ideal": [100.0, 150.0, 300.0],
        "pruned": [160.0, 165.0, 330.0],
        "full": [300.0, 450.0, 900.0],
        "selection": [2.0, 1.0, 3.0],
    }
    monkeypatch.setattr(bench.Runner, "prefill_turns", lambda self, *a, **k: turns)
    visual = bench.tokens_per_image(model, runner.inputs)
    kept = bench.bench_config("uniform", 0.25).kept_per_image(visual)
    pruned, ideal, selection = runner.paired_prefill_ms(bench.bench_config("uniform", 0.25), kept)
    assert (pruned, selection) == (160.0, 1.0)
    assert ideal == pytest.approx(160.0 * 150.0 / 165.0)  # the median ratio, 150/165 = 300/330
    pruned, ideal, _ = runner.paired_prefill_ms(bench.bench_config("fastv", 0.25), kept)
    depth = model.config.get_text_config().num_hidden_layers
    lengths = bench.decoder_lengths(bench.bench_config("fastv", 0.25).for_depth(depth), visual, depth)
    per_turn = [
        bench.layer_ideal_ms(i, f, lengths, visual, kept) / p
        for i, f, p in zip(turns["ideal"], turns["full"], turns["pruned"], strict=True)
    ]
    assert ideal == pytest.approx(160.0 * sorted(per_turn)[1])


def test_launches_are_counted_after_every_timing(monkeypatch):
    """On a GPU the profiler that counts launches slows every later launch: no timing may follow it."""
    from tokenprune.eval import bench

    calls = []

    def times_ms(fn, device, repeats):
        fn()
        calls.append("time")
        return [1.0]

    monkeypatch.setattr(bench, "times_ms", times_ms)
    monkeypatch.setattr(bench, "launches", lambda fn, device: calls.append("count") or 1)
    model = build_model(ARCHS["tiny"](), "sdpa", torch.device("cpu"), torch.float32)
    rows = run_benchmark(model, ["uniform", "fastv"], [0.25], [1, 2], repeats=1, new_tokens=2)
    first_count = calls.index("count")
    assert "time" not in calls[first_count:] and calls.count("count") == 2 * 3
    assert all(r.prefill_launches == 1 for r in rows if r.method != "ideal")


def test_kv_cache_falls_with_the_kept_tokens(rows):
    """Bytes held after prefill: the tiny model has 4 layers of 2 KV heads of 16 dims, fp32."""
    per_token_layer = 2 * 2 * 16 * 4 / 2**20  # keys and values
    by = {(r.batch_size, r.method, r.kept_tokens): r.kv_cache_mib for r in rows}
    for batch in (1, 2):
        prompt = next(r.prompt_tokens for r in rows if r.batch_size == batch)
        assert by[batch, "unpruned", 64] == pytest.approx(batch * prompt * 4 * per_token_layer)
        for kept in (32, 16):
            pruned = prompt - 64 + kept
            assert by[batch, "uniform", kept] == pytest.approx(batch * pruned * 4 * per_token_layer)
            assert by[batch, "fastv", kept] == pytest.approx(
                batch * (2 * prompt + 2 * pruned) * per_token_layer
            )
            assert by[batch, "fastv+drop_early_kv", kept] == by[batch, "uniform", kept]


def test_unknown_bench_variant():
    from tokenprune.eval.bench import bench_config

    assert bench_config("fastv+drop_early_kv", 0.5).drop_early_kv
    assert bench_config("fastv+renumbered", 0.5).positions == "renumbered"
    assert bench_config("fastv", 0.5).position_rule == "original"
    assert bench_config("transprune+original", 0.5).position_rule == "original"
    hybrid = bench_config("saint_llm+saint", 0.25)
    assert (hybrid.method, hybrid.keep_ratio, hybrid.vision.method) == ("saint_llm", 0.25, "saint")
    assert hybrid.vision.keep_ratio == 376 / 576
    assert bench_config("saint_llm+saint", 0.8).vision.keep_ratio == 0.8
    with pytest.raises(
        ValueError, match="the variants are '<method>\\+drop_early_kv', '<method>\\+renumbered'"
    ):
        bench_config("fastv+fast", 0.5)
    with pytest.raises(ValueError, match="'<decoder method>\\+<vision method>'"):
        bench_config("fastv+saint+tome", 0.5)


def test_results_files(rows, tmp_path):
    paths = write_results(rows, tmp_path, {"arch": "tiny", "machine": "test"})
    data = json.loads(paths["json"].read_text())
    assert len(data["rows"]) == len(rows) and data["meta"]["arch"] == "tiny"
    assert paths["csv"].read_text().count("\n") == len(rows) + 1
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert markdown_table(rows).count("\n") == len([r for r in rows if r.method != "ideal"]) + 1


def test_bench_command(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--methods",
            "random",
            "--keep-ratios",
            "0.5",
            "--repeats",
            "1",
            "--new-tokens",
            "2",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "results.json").exists()
    bad = CliRunner().invoke(app, ["bench", "--methods", "nope", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "unknown method" in bad.output


def test_prefill_turns_time_each_method_and_its_ideal_that_often_and_decode_as_repeats(tmp_path, monkeypatch):
    """``--prefill-turns`` sets how many turns time a method's prefill beside its ideal's (recorded in the
    results' meta); the decode is still timed ``--repeats`` times."""
    from tokenprune.eval import bench

    calls = []
    real = bench.Runner.prefill_turns
    monkeypatch.setattr(
        bench.Runner, "prefill_turns", lambda self, *a, **k: calls.append(r := real(self, *a, **k)) or r
    )
    generated = []
    monkeypatch.setattr(bench.Runner, "generate", lambda self, n, **k: generated.append(n))
    args = ["bench", "--methods", "random", "--keep-ratios", "0.5", "--repeats", "2", "--new-tokens", "2"]
    result = CliRunner().invoke(app, [*args, "--prefill-turns", "5", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (turns,) = calls
    assert len(turns["pruned"]) == len(turns["ideal"]) == len(turns["selection"]) == 5
    # two rows (unpruned, random), each a warm-up and 2 timed generates of 2 tokens and of 1
    assert generated.count(2) == generated.count(1) == 2 * 3
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["prefill_turns"] == 5


def test_bench_compile_times_a_compiled_static_decode_beside_eager(tmp_path, monkeypatch):
    import tokenprune.eval.bench as bench

    compiled_calls = []
    original = bench.compiled_decoding
    spy = lambda device: compiled_calls.append(device) or original(device)  # noqa: E731
    monkeypatch.setattr(bench, "compiled_decoding", spy)
    args = ["bench", "--methods", "divprune", "--keep-ratios", "0.25", "--repeats", "1", "--new-tokens", "4"]
    result = CliRunner().invoke(app, [*args, "--compile", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["compile"] is True
    measured = [r for r in data["rows"] if r["method"] != "ideal"]
    assert [r["method"] for r in measured] == ["unpruned", "divprune"] and len(compiled_calls) == 2
    assert all(not r["compiled_decode_tokens_per_s"] <= 0 for r in measured)  # a rate (NaN if lost in noise)
    assert "compiled decode tok/s" in markdown_table([bench.BenchRow(**r) for r in data["rows"]])


def test_gpu_benchmark_script_runs_its_plan_on_the_tiny_model(tmp_path):
    """``eval/gpu_bench.sh``, the prepared H100 run, with the tiny architecture on the CPU: both of its runs
    write their results (batch 1 and 8 at two budgets; then compiled decoding at batch 8)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "eval" / "gpu_bench.sh"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "ARCH": "tiny",
        "DEVICE": "cpu",
        "DTYPE": "float32",
        "METHODS": "random,fastv",
        "REPEATS": "1",
        "OUT": str(tmp_path / "gpu"),
    }
    subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True)

    def measured(part: str) -> set[tuple[str, int, int]]:
        rows = json.loads((tmp_path / part / "results.json").read_text())["rows"]
        return {(r["method"], r["batch_size"], r["kept_tokens"]) for r in rows if r["method"] != "ideal"}

    assert measured("gpu") == {("unpruned", 8, 64)} | {
        (m, 8, k) for m in ("random", "fastv") for k in (7, 16)
    }
    assert measured("gpu-compile") == {("unpruned", 8, 64)} | {(m, 8, 7) for m in ("fastv", "sparsevila")}
    assert json.loads((tmp_path / "gpu-compile" / "results.json").read_text())["meta"]["compile"] is True
    assert measured("gpu-batch1") == {("unpruned", 1, 64), ("random", 1, 7), ("fastv", 1, 7)}


@pytest.fixture(scope="module")
def encoder_rows():
    from tokenprune.eval.archs import ENCODER_ARCHS
    from tokenprune.eval.encoder_bench import build_encoder, run_encoder_benchmark

    encoder = build_encoder(ENCODER_ARCHS["tiny-vit"](), "sdpa", torch.device("cpu"), torch.float32)
    return run_encoder_benchmark(encoder, [0, 8], [0.25], 2, repeats=1)


def test_encoder_rows_count_tokens_and_share_one_baseline(encoder_rows):
    settings = [(r.method, r.setting, r.kept_tokens) for r in encoder_rows]
    assert settings == [
        ("unpruned", "-", 64),
        ("tome", "r=0", 64),
        ("tome", "r=8", 64 - 6 * 8),  # a merge step inside each of the six layers
        ("turbo", "r=0", 64),
        ("turbo", "r=8", 64 - 6 * 8),
        ("hiprune", "keep=0.25", 16),
        ("visionzip", "keep=0.25", 16),
        ("vispruner", "keep=0.25", 16),
        ("saint", "keep=0.25", 16),
    ]
    base = encoder_rows[0]
    for r in encoder_rows:
        assert r.images_per_s == pytest.approx(2 / r.batch_ms * 1e3)
        assert r.speedup == pytest.approx(r.images_per_s / base.images_per_s)


def test_encoder_results_files(encoder_rows, tmp_path):
    from tokenprune.eval.encoder_bench import encoder_markdown_table, write_encoder_results

    paths = write_encoder_results(encoder_rows, tmp_path, {"arch": "tiny-vit", "machine": "test"})
    assert len(json.loads(paths["json"].read_text())["rows"]) == len(encoder_rows)
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert encoder_markdown_table(encoder_rows).count("\n") == len(encoder_rows) + 1


def test_bench_encoder_command(tmp_path):
    args = ["bench-encoder", "--arch", "tiny-vit", "--r", "2", "--keep-ratios", "0.5", "--batch-size", "1"]
    result = CliRunner().invoke(app, [*args, "--repeats", "1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "throughput.png").exists()
    bad = CliRunner().invoke(app, ["bench-encoder", "--r", "-1", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "tome option r must be an int >= 0" in bad.output
    unknown = CliRunner().invoke(app, ["bench-encoder", "--arch", "vit-h", "--out", str(tmp_path)])
    assert unknown.exit_code == 2 and "unknown --arch 'vit-h'" in unknown.output
