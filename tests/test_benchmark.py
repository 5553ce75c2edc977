"""The throughput benchmark runs as a user runs it, on synthetic data, and its counts add up
(speed itself is the benchmark's to print, not a test's to assert)."""

from __future__ import annotations

import json
import sys

from conftest import run_cli


def test_throughput_benchmark_prints_every_mode(tmp_path):
    out = tmp_path / "figures.json"
    result = run_cli([sys.executable, "benchmarks/throughput.py", "--preset", "tiny", "--data_path", "synthetic",
                      "--pairs", "24", "--warmup_steps", "1", "--json", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    for mode in ("max_len", "dynamic", "grouped", "shared", "packed"):
        assert f"\n{mode} " in result.stdout
    rows = {row["mode"]: row for row in json.loads(out.read_text())["results"]}
    assert rows["max_len"]["tokens_per_pair"] == 2 * 512  # two rows of --max_seq_len per pair
    # The same sequences in every mode; fewer tokens processed the more the layout saves.
    assert len({round(row["seq_tokens_per_s"] / row["pairs_per_s"]) for row in rows.values()}) == 1
    assert rows["max_len"]["tokens_per_pair"] > rows["dynamic"]["tokens_per_pair"] \
        >= rows["grouped"]["tokens_per_pair"] > rows["shared"]["tokens_per_pair"] >= rows["packed"]["tokens_per_pair"]
    assert rows["packed"]["real_share"] >= rows["shared"]["real_share"] > rows["dynamic"]["real_share"]
    assert rows["packed"]["arrangement"] == "fit" and rows["packed"]["attention"] == "sdpa"
    assert "\npacked runs " in result.stdout
    assert all(row["peak_mib"] > 0 and 0 < row["flops_per_s"] for row in rows.values())


def test_gpu_table_runs_the_presets_lengths_and_mixes_asked_for(capsys):
    """The GPU table's loop and summary, on the tiny preset (the real presets need a GPU) and one length
    mix (each mode is a process of its own: the second mix would double the test's time, not its reach)."""
    from rlhf_reward.benchmarks import throughput

    assert throughput.main(["--gpu_table", "--table_presets", "tiny", "--table_lengths", "256", "--table_mixes",
                            "long_tail", "--pairs", "16", "--warmup_steps", "1"]) == 0
    out = capsys.readouterr().out
    summary = out[out.rindex("preset "):].splitlines()[1:]
    assert [line.split()[:4] for line in summary] == [["tiny", "256", "long_tail", mode]
                                                      for mode in throughput.GPU_TABLE_MODES]
    assert "bf16" in out and "gradient checkpointing" in out


def test_probe_finds_a_linear_direction_and_counts_ties_half():
    """On differences that all lie on the chosen side of one direction, the probe fits and generalises; on
    features that never differ (an encoder's [CLS] embedding) every pair is a tie, scored half."""
    import torch
    from rlhf_reward.benchmarks.probe import probe

    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(16, generator=generator, dtype=torch.float64)

    def differences(count: int) -> torch.Tensor:
        rows = torch.randn(count, 16, generator=generator, dtype=torch.float64)
        return rows * (rows @ direction).sign()[:, None]

    fit, held_out = probe(differences(200), differences(200), 1e-3)
    assert fit > 0.95 and held_out > 0.95
    assert probe(torch.zeros(40, 16, dtype=torch.float64), torch.zeros(20, 16, dtype=torch.float64), 1e-2) == (0.5, 0.5)


def test_probe_runs_on_the_shipped_sample(model_dirs):
    result = run_cli([sys.executable, "benchmarks/probe.py", "--model", model_dirs["llama"], "--train_pairs", "40",
                      "--layers", "2", "--max_seq_len", "64"])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "40 pairs to fit, 200 held out" in lines[0]
    rows = [line.split() for line in lines[2:]]
    assert [row[0] for row in rows] == ["0", "2"]  # the embeddings and the last of the tiny model's 2 layers
    assert all(0 <= float(value) <= 1 for row in rows for value in row[1:] if value != "/")
