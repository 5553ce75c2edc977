"""The hand-off to step 3 and to everyone else: the Hugging Face export, the step-3 load as the PPO
step does it, folders DeepSpeed-Chat wrote, the converter, and loading errors."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys

import pytest
import torch
from conftest import REPO_ROOT, rounding_tolerance, run_cli, save_random_reward_model
from rlhf_reward.utils.data.tokenize import special_affixes
from rlhf_reward.utils.errors import UserError
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from step2_reward_model.model import RewardModel
from step2_reward_model.output import load_manifest, load_reward_model, load_scoring_tokenizer
from step2_reward_model.scoring import Encoded, Scorer

# DeepSpeed-Chat's layout: the prompt ends at "Assistant:" and the answer starts with its space, so the
# prompt's tokens are the same whether it is tokenised alone (as PPO's prompt) or with the answer.
PROMPTS = ["\n\nHuman: What is 17 + 25?\n\nAssistant:", "\n\nHuman: Tell me about the sea.\n\nAssistant:",
           "\n\nHuman: Hi!\n\nAssistant:"]
ANSWERS = [" The answer is 42.", " The sea covers most of the planet and is salty, deep and cold in most places.",
           " Hello."]


def scorer_for(path: str) -> Scorer:
    manifest = load_manifest(path)
    return Scorer(load_reward_model(path), load_scoring_tokenizer(path), manifest.get("max_seq_len", 512),
                  manifest.get("end_of_conversation_token", "<|endoftext|>"))


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["opt", "gpt2", "llama"])
def test_hf_export_logits_equal_end_scores(family, saved_models):
    out = saved_models[family]
    hf_dir = os.path.join(out, "hf")
    assert os.path.isfile(os.path.join(hf_dir, "model.safetensors"))
    assert not os.path.exists(os.path.join(hf_dir, "pytorch_model.bin"))
    classifier = AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    assert classifier.config.num_labels == 1 and tokenizer.padding_side == "right"
    assert tokenizer.pad_token_id == classifier.config.pad_token_id
    assert tokenizer.pad_token_id not in (tokenizer.eos_token_id, tokenizer.bos_token_id)

    scorer = scorer_for(out)
    sequences = scorer.encode_pairs(PROMPTS, ANSWERS).sequences  # token ids exactly as training makes them
    # OUTPUT's tokenizer is the export's: the same pad id, which no scored text contains
    assert scorer.tokenizer.pad_token_id == tokenizer.pad_token_id == load_manifest(out)["pad_token_id"]
    config = AutoConfig.from_pretrained(out)  # an added pad beyond the step-3 embedding stays out of its config
    assert config.pad_token_id == tokenizer.pad_token_id or tokenizer.pad_token_id >= config.vocab_size
    if family == "gpt2":  # every sequence ends with eos, GPT-2's <|endoftext|>
        assert all(seq[-1] == scorer.tokenizer.eos_token_id for seq in sequences)
    batch = tokenizer.pad({"input_ids": [seq.tolist() for seq in sequences]}, return_tensors="pt")
    assert (batch["attention_mask"][:, -1] == 0).any(), "the batch should be right-padded"
    with torch.no_grad():
        logits = classifier(**batch).logits
    assert logits.shape == (len(sequences), 1)
    expected = scorer.score_ids(Encoded(sequences))
    assert logits[:, 0].tolist() == pytest.approx(expected, abs=rounding_tolerance(expected))

    # the export's own tokenizer on the whole texts, as a transformers user would call it
    texts = [p + a + "<|endoftext|>" for p, a in zip(PROMPTS, ANSWERS, strict=True)]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = classifier(**batch).logits[:, 0]
    ids = [row[mask.bool()] for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    expected = scorer.score_ids(Encoded([row.numpy() for row in ids]))
    assert logits.tolist() == pytest.approx(expected, abs=rounding_tolerance(expected))


@pytest.mark.numerics
def test_hf_export_loads_back_as_a_reward_model(saved_models):
    out = saved_models["gpt2"]
    ours, exported = scorer_for(out), scorer_for(os.path.join(out, "hf"))
    sequences = ours.encode_pairs(PROMPTS, ANSWERS)
    expected = ours.score_ids(sequences)
    assert exported.score_ids(sequences) == pytest.approx(expected, abs=rounding_tolerance(expected))


def test_manifest_says_what_step3_needs(saved_models):
    manifest = load_manifest(saved_models["gpt2"])
    tokenizer = load_scoring_tokenizer(saved_models["gpt2"])
    assert manifest["end_of_conversation_token"] == "<|endoftext|>"
    assert manifest["end_of_conversation_token_ids"] == [tokenizer.eos_token_id]
    assert manifest["max_seq_len"] == 128 and manifest["step3_key_prefix"] == "rwtransformer"
    assert "attention mask" in manifest["scored_token"] and manifest["padding_side"].startswith("right")
    assert manifest["chat_template"] == "DeepSpeed-Chat's text layout" and manifest["hf_export"] == "hf"
    assert manifest["chat_template_sha256"] == hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()
    assert manifest["tokenizer_length"] == len(tokenizer)


def step3_load(path: str) -> RewardModel:
    """What DeepSpeed-Chat's step 3 does: the model from config.json alone (no pretrained weights),
    then the whole state from pytorch_model.bin, tensors only, strictly."""
    config = AutoConfig.from_pretrained(path)
    model = RewardModel(AutoModel.from_config(config))
    state = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def ppo_batch(tokenizer, prompts: list[str], answers: list[str], eot: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Step 3's sequences: prompts left-padded to one length, then generated answers right-padded."""
    prefix, suffix = special_affixes(tokenizer)
    prompt_ids = [prefix + ids for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    answer_ids = [ids + suffix for ids in tokenizer([a + eot for a in answers], add_special_tokens=False)["input_ids"]]
    prompt_length = max(map(len, prompt_ids))
    answer_length = max(map(len, answer_ids))
    pad = tokenizer.pad_token_id
    seq = torch.full((len(prompts), prompt_length + answer_length), pad, dtype=torch.long)
    mask = torch.zeros_like(seq)
    for row, (prompt, answer) in enumerate(zip(prompt_ids, answer_ids, strict=True)):
        start = prompt_length - len(prompt)
        seq[row, start:prompt_length] = torch.tensor(prompt)
        seq[row, prompt_length:prompt_length + len(answer)] = torch.tensor(answer)
        mask[row, start:prompt_length + len(answer)] = 1
    return seq, mask, prompt_length


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_step3_forward_value_equals_rw_eval(family, saved_models):
    out = saved_models[family]
    model = step3_load(out)
    tokenizer = load_scoring_tokenizer(out)
    seq, mask, prompt_length = ppo_batch(tokenizer, PROMPTS, ANSWERS, "<|endoftext|>")
    with torch.no_grad():
        result = model.forward_value(seq, mask, prompt_length=prompt_length)
        values = model.forward_value(seq, mask, return_value_only=True)
    assert result["chosen_end_scores"].shape == (len(PROMPTS),)
    assert values.shape == seq.shape and values[:, :-1].shape == (len(PROMPTS), seq.shape[1] - 1)
    offline = scorer_for(out).score_ids(scorer_for(out).encode_pairs(PROMPTS, ANSWERS))
    assert result["chosen_end_scores"].tolist() == pytest.approx(offline, abs=rounding_tolerance(offline))

    cli = run_cli([sys.executable, "rw_eval.py", "--model_path", out, "--prompt", PROMPTS[1],
                   "--answer", ANSWERS[1]], env={"HF_HUB_OFFLINE": "1"})
    assert cli.returncode == 0, cli.stderr
    reported = float(re.search(r"reward: (-?[\d.]+)", cli.stdout).group(1))
    assert reported == pytest.approx(result["chosen_end_scores"][1].item(), abs=1e-4)


def write_deepspeed_chat_folder(ours: str, base_model: str, folder: str, prefix: str) -> None:
    """A folder as DeepSpeed-Chat's step 2 saves it: the RewardModel state under its attribute name,
    the backbone config (with `_name_or_path`, as transformers 4 wrote it) and no tokenizer config."""
    os.makedirs(folder)
    state = torch.load(os.path.join(ours, "pytorch_model.bin"), weights_only=True)
    torch.save({key.replace("rwtransformer.", f"{prefix}.", 1): value for key, value in state.items()},
               os.path.join(folder, "pytorch_model.bin"))
    with open(os.path.join(ours, "config.json")) as handle:
        config = json.load(handle)
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump({**config, "_name_or_path": base_model}, handle)


@pytest.mark.numerics
@pytest.mark.parametrize("prefix", ["rwtransformer", "rwtranrsformer"])
def test_loads_folders_deepspeed_chat_wrote(prefix, saved_models, model_dirs, tmp_path):
    folder = str(tmp_path / "dschat")
    write_deepspeed_chat_folder(saved_models["opt"], model_dirs["opt"], folder, prefix)
    ours = scorer_for(saved_models["opt"])
    theirs = scorer_for(folder)  # tokenizer found through config `_name_or_path`
    sequences = ours.encode_pairs(PROMPTS, ANSWERS)
    expected = ours.score_ids(sequences)
    assert theirs.score_ids(sequences) == pytest.approx(expected, abs=rounding_tolerance(expected))


def test_converter_rewrites_a_deepspeed_chat_folder(saved_models, model_dirs, synthetic_dir, tmp_path):
    folder = str(tmp_path / "dschat")
    write_deepspeed_chat_folder(saved_models["opt"], model_dirs["opt"], folder, "rwtranrsformer")
    result = run_cli([sys.executable, "step2_reward_model/export.py", folder, "--data_path", synthetic_dir,
                      "--data_split", "0,1,0", "--data_output_path", str(tmp_path / "cache"),
                      "--max_seq_len", "128", "--step3_key_prefix", "rwtranrsformer"], env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(os.path.join(folder, "pytorch_model.bin"), weights_only=True)
    assert all(key.startswith("rwtranrsformer.") or key == "v_head.weight" for key in state)
    assert load_manifest(folder)["step3_key_prefix"] == "rwtranrsformer"
    with open(os.path.join(folder, "reward_stats.json")) as handle:
        stats = json.load(handle)
    assert stats["pairs"] == 300 and stats["all"]["count"] == 600
    assert stats["all"]["q05"] <= stats["all"]["median"] <= stats["all"]["q95"]
    ours = scorer_for(saved_models["opt"])
    sequences = ours.encode_pairs(PROMPTS, ANSWERS).sequences
    classifier = AutoModelForSequenceClassification.from_pretrained(os.path.join(folder, "hf")).eval()
    batch = AutoTokenizer.from_pretrained(os.path.join(folder, "hf")).pad(
        {"input_ids": [seq.tolist() for seq in sequences]}, return_tensors="pt")
    expected = ours.score_ids(Encoded(sequences))
    with torch.no_grad():
        assert classifier(**batch).logits[:, 0].tolist() == pytest.approx(expected, abs=rounding_tolerance(expected))


def test_key_mismatch_is_one_line_error(saved_models, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(saved_models["opt"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(UserError) as excinfo:
        load_reward_model(str(folder))
    message = str(excinfo.value)
    assert "\n" not in message and "missing keys: rwtransformer.decoder.layers.2" in message


def test_hf_export_with_missing_head_is_refused(saved_models, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "hf"
    shutil.copytree(os.path.join(saved_models["opt"], "hf"), folder)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["score.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"missing_keys: score.weight"):
        load_reward_model(str(folder))


@pytest.mark.parametrize("case", ["missing", "no_weights", "keys", "empty_data", "no_tokenizer"])
def test_rw_eval_bad_input_is_one_line_error(case, saved_models, model_dirs, tmp_path):
    out = saved_models["opt"]
    args = ["--model_path", out]
    if case == "missing":
        args = ["--model_path", str(tmp_path / "nowhere")]
        expected = "no such folder"
    elif case == "no_weights":
        folder = tmp_path / "noweights"
        folder.mkdir()
        shutil.copy(os.path.join(model_dirs["opt"], "config.json"), folder)
        args = ["--model_path", str(folder)]
        expected = "no pytorch_model.bin"
    elif case == "keys":
        folder = tmp_path / "keys"
        shutil.copytree(out, folder)
        state = torch.load(folder / "pytorch_model.bin", weights_only=True)
        state.pop("v_head.weight")
        torch.save(state, folder / "pytorch_model.bin")
        args = ["--model_path", str(folder)]
        expected = "missing keys: v_head.weight"
    elif case == "empty_data":
        data = tmp_path / "empty.jsonl"
        data.write_text("")
        args += ["--data_path", str(data), "--data_output_path", str(tmp_path / "cache")]
        expected = "empty.jsonl"
    else:
        folder = tmp_path / "notok"
        write_deepspeed_chat_folder(out, str(tmp_path / "gone"), str(folder), "rwtransformer")
        args = ["--model_path", str(folder)]
        expected = "--tokenizer_path"
    result = run_cli([sys.executable, "rw_eval.py", *args], env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_save_replaces_an_existing_export(model_dirs, tmp_path):
    out = str(tmp_path / "out")
    save_random_reward_model(out, model_dirs["gpt2"], seed=0)
    first = AutoModelForSequenceClassification.from_pretrained(os.path.join(out, "hf")).score.weight.clone()
    save_random_reward_model(out, model_dirs["gpt2"], seed=1)
    second = AutoModelForSequenceClassification.from_pretrained(os.path.join(out, "hf")).score.weight
    assert not torch.equal(first, second)
    assert sorted(os.listdir(out)) == sorted(["chat_template.jinja", "config.json", "hf", "pytorch_model.bin",
                                              "reward_model.json", "tokenizer.json", "tokenizer_config.json"])


def test_rw_eval_report_breaks_accuracy_down_by_source(saved_models, tmp_path):
    from rlhf_reward.utils.data.synthetic import make_pairs, write_jsonl

    sources = {}
    for name, count in (("alpha", 12), ("beta", 20)):
        write_jsonl(make_pairs(40, seed=3), str(tmp_path / name / "train.jsonl"))
        write_jsonl(make_pairs(count, seed=4, held_out=True), str(tmp_path / name / "eval.jsonl"))
        sources[name] = count
    report_path = tmp_path / "not_yet_made" / "report.json"
    result = run_cli([sys.executable, "rw_eval.py", "--model_path", saved_models["opt"],
                      "--data_path", str(tmp_path / "alpha"), str(tmp_path / "beta"), "--data_split", "0,1,0",
                      "--data_output_path", str(tmp_path / "cache"), "--report", str(report_path)],
                     env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    by_source = {name.rsplit("/", 1)[-1]: value["pairs"] for name, value in report["by_source"].items()}
    assert by_source == sources and report["summary"]["pairs"] == 32
    scorer = scorer_for(saved_models["opt"])
    rows = make_pairs(12, seed=4, held_out=True)
    chosen = scorer.score_ids(scorer.encode_pairs([r["prompt"] for r in rows], [r["chosen"] for r in rows]))
    rejected = scorer.score_ids(scorer.encode_pairs([r["prompt"] for r in rows], [r["rejected"] for r in rows]))
    wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected, strict=True))
    assert report["by_source"][next(k for k in report["by_source"] if k.endswith("alpha"))]["accuracy"] == \
        pytest.approx(wins / 12)


def test_rw_eval_on_real_hh_rlhf_pairs(saved_models, tmp_path):
    from conftest import needs_shared_data
    from rlhf_reward.utils.data.sources import load_source

    data = needs_shared_data("hh_rlhf_harmless_sample.jsonl.gz")
    report_path = tmp_path / "report.json"
    result = run_cli([sys.executable, "rw_eval.py", "--model_path", saved_models["gpt2"], "--data_path", str(data),
                      "--data_split", "0,1,0", "--data_output_path", str(tmp_path / "cache"),
                      "--max_seq_len", "512", "--report", str(report_path)], env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    rows = len(load_source(str(data), str(REPO_ROOT)).train)
    held_out = report["summary"]["pairs"] + report["data"]["too_long"]
    assert 0.08 * rows <= held_out <= 0.12 * rows  # a single-split source gives a tenth to evaluation
    assert report["length_bias"]["pairs_with_different_lengths"] > 0.8 * report["summary"]["pairs"]
    assert sum(bucket["pairs"] for bucket in report["by_length"]) == report["summary"]["pairs"]


def test_a_model_without_an_export_keeps_everything_else(saved_models, tokenizers, tmp_path, capsys):
    """An ELECTRA model's sequence classifier has a dense layer before its score head, which a value
    head cannot fill: the export is skipped with its reason, while the step-3 weights, config,
    tokenizer and manifest are saved whole, an earlier run's hf/ (which would not match) is
    removed, and the converter says so on one line with exit status 2."""
    from transformers import ElectraConfig

    from step2_reward_model import export
    from step2_reward_model.output import export_skipped_error, save_reward_model

    out = str(tmp_path / "out")
    shutil.copytree(saved_models["gpt2"], out)  # an earlier run's OUTPUT, hf/ included
    tokenizer = tokenizers["gpt2"]
    torch.manual_seed(0)
    config = ElectraConfig(vocab_size=len(tokenizer), embedding_size=32, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=64)
    model = RewardModel(AutoModel.from_config(config)).eval()
    meta = {"base_model": "tiny-electra", "end_of_conversation_token": "<|endoftext|>", "max_seq_len": 128}
    skipped = save_reward_model(model, tokenizer, out, meta=meta)

    assert skipped.startswith("cannot export as ElectraForSequenceClassification: keys without a source: ")
    assert sorted(os.listdir(out)) == ["chat_template.jinja", "config.json", "pytorch_model.bin", "reward_model.json",
                                       "tokenizer.json", "tokenizer_config.json"]
    manifest = load_manifest(out)
    assert manifest["hf_export"] is None and manifest["hf_export_skipped"] == skipped
    ids = torch.tensor([tokenizer("Human: Hi! Assistant: Hello.<|endoftext|>")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(load_reward_model(out).forward_value(ids)["chosen_end_scores"],
                           model.forward_value(ids)["chosen_end_scores"])
    message = str(export_skipped_error(out, skipped))
    assert "\n" not in message and message.startswith(f"saved the reward model to {out} (step 3 loads it), but not")

    capsys.readouterr()
    assert export.main([out]) == 2  # the converter: weights rewritten, export skipped, one line
    assert capsys.readouterr().err == f"error: {message}\n"
    assert os.path.isfile(os.path.join(out, "pytorch_model.bin")) and not os.path.exists(os.path.join(out, "hf"))
    assert load_manifest(out)["hf_export_skipped"] == skipped
