"""Encoder backbones (BERT, DeBERTa-v2/v3, T5's encoder) as reward models: scored at their pooled
token whatever the padding, attending both ways, trained end to end through main.py without
prefix sharing, exported where transformers has a matching classifier (BERT) and otherwise saved
with the reason, and marked in the manifest as no PPO critic."""

from __future__ import annotations

import os
import re
import shutil
import string
import sys

import numpy as np
import pytest
import torch
from conftest import (
    REPO_ROOT,
    assert_chunks_change_nothing,
    corpus,
    objective_forward,
    pair_batch,
    rounding_tolerance,
    run_cli,
)
from rlhf_reward.utils.data.build import DataSource
from rlhf_reward.utils.data.collate import pad_right
from rlhf_reward.utils.data.synthetic import make_pairs, make_ranked_rows, write_jsonl
from rlhf_reward.utils.errors import UserError
from rlhf_reward.utils.model_files import load_hf_tokenizer
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    DebertaV2Config,
    MT5Config,
    OPTConfig,
    PreTrainedTokenizerFast,
    T5Config,
    T5Model,
    UMT5Config,
)

from step2_reward_model import export
from step2_reward_model.flags import parse_training_args
from step2_reward_model.heldout import score_split
from step2_reward_model.model import (
    RewardModel,
    create_reward_model,
    end_of_conversation_text,
    load_config,
    new_backbone,
    prefix_sharing_problem,
)
from step2_reward_model.objectives import objective_for, saved_objective
from step2_reward_model.objectives.base import DataRequest
from step2_reward_model.objectives.preference import Preference
from step2_reward_model.output import load_manifest, load_reward_model
from step2_reward_model.scoring import Scorer

FAMILIES = ("bert", "deberta-v2", "t5")
FIRST_TOKEN = {"bert": True, "deberta-v2": True, "t5": False}  # [CLS] in front, or T5's </s> at the end
ALPHABET = list(string.ascii_letters + string.digits + string.punctuation)
PROMPTS = ["Human: What is 17 + 25? Assistant: ", "Human: Tell me about the sea. Assistant: ",
           "Human: Hi! Assistant: "]
ANSWERS = ["The answer is 42.", "The sea covers most of the planet and is salty, deep and cold.", "Hello."]
TRAIN_FLAGS = ["--data_split", "0,1,0", "--dtype", "fp32", "--per_device_eval_batch_size", "32", "--max_seq_len",
               "64", "--learning_rate", "2e-3", "--num_train_epochs", "1", "--deepspeed"]

END_TOKEN = Preference(loss_name="end_token")

def wordpiece_tokenizer(texts: list[str], **names: str) -> PreTrainedTokenizerFast:
    """BERT's conventions: lower-cased WordPiece, `[CLS] text [SEP]`, `[PAD]` id 0, no eos (DeBERTa-v2's
    tokenizers also name [CLS] and [SEP] bos and eos, through `names`)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=512, special_tokens=specials,
                                                                   initial_alphabet=ALPHABET))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[(token, tokenizer.token_to_id(token)) for token in ("[CLS]", "[SEP]")])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, cls_token="[CLS]", sep_token="[SEP]",
                                   pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]", **names)


def t5_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """T5's conventions: a Unigram vocabulary, `</s>` appended to every text, `<pad>` id 0, no bos."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(texts, trainers.UnigramTrainer(
        vocab_size=512, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", initial_alphabet=ALPHABET))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tokenizer.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def save_tiny_encoder(folder: str, family: str) -> None:
    """A random 2-layer encoder of `family` with its tokenizer; T5 saved whole (encoder and decoder), as
    hub checkpoints are. DeBERTa-v2 is configured as DeBERTa-v3 is (relative positions only)."""
    texts = corpus()
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "max_position_embeddings": 128}
    if family == "t5":
        tokenizer = t5_tokenizer(texts)
        config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                          relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    elif family == "bert":
        tokenizer = wordpiece_tokenizer(texts)
        config = BertConfig(vocab_size=len(tokenizer), **sizes)
    else:
        tokenizer = wordpiece_tokenizer(texts, bos_token="[CLS]", eos_token="[SEP]")
        config = DebertaV2Config(vocab_size=len(tokenizer), relative_attention=True, position_biased_input=False,
                                 pos_att_type=["p2c", "c2p"], position_buckets=16, max_relative_positions=-1,
                                 norm_rel_ebd="layer_norm", share_att_key=True, **sizes)
    torch.manual_seed(0)
    model = T5Model(config) if family == "t5" else AutoModel.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def encoder_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("encoders")
    for family in FAMILIES:
        save_tiny_encoder(str(root / family), family)
    return {family: str(root / family) for family in FAMILIES}


def write_source(folder, ranked: bool) -> str:
    """64 training and 32 held-out examples: ranked lists of four answers, or pairs."""
    train, held_out = (make_ranked_rows(64, 0), make_ranked_rows(32, 1, held_out=True)) if ranked else \
        (make_pairs(64, 0), make_pairs(32, 1, held_out=True))
    write_jsonl(train, os.path.join(folder, "train.jsonl"))
    write_jsonl(held_out, os.path.join(folder, "eval.jsonl"))
    return str(folder)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, encoder_dirs):
    """main.py on a family, run once when a test first asks: BERT learns ranked lists with Plackett-Luce,
    the others pairs with the pairwise loss. Returns (OUTPUT, its manifest, the log, the data folder)."""
    runs = {}

    def run(family: str):
        if family not in runs:
            tmp_path = tmp_path_factory.mktemp(family)
            ranked = family == "bert"
            data = write_source(tmp_path / "data", ranked)
            out = tmp_path / "out"
            result = run_cli([sys.executable, "step2_reward_model/main.py", "--model_name_or_path",
                              encoder_dirs[family], "--data_path", data, "--data_output_path", str(tmp_path / "cache"),
                              "--output_dir", str(out), "--loss", "plackett_luce" if ranked else "end_token",
                              "--per_device_train_batch_size", "8" if ranked else "16", *TRAIN_FLAGS])
            log = result.stdout + result.stderr
            assert result.returncode == 0, log[-3000:]
            runs[family] = str(out), load_manifest(str(out)), log, data
        return runs[family]

    return run


def pad_left(rows: list[np.ndarray], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As the PPO step pads: on the left, so that the rows' starts differ."""
    input_ids, attention_mask = pad_right([row[::-1].copy() for row in rows], pad_token_id)
    return input_ids.flip(-1), attention_mask.flip(-1)


def untrained_model(model_dir: str) -> tuple[RewardModel, Scorer]:
    """A float64 reward model on the encoder with a random value head, and a scorer of its texts."""
    tokenizer = load_hf_tokenizer(model_dir)
    torch.manual_seed(0)
    model = create_reward_model(model_dir, tokenizer)
    torch.nn.init.normal_(model.v_head.weight, std=1.0)
    return model.double().eval(), Scorer(model, tokenizer, 64, end_of_conversation_text(model.config))


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_scored_at_the_pooled_token_whatever_the_padding(family, encoder_dirs):
    """The first real token ([CLS]) or T5's last (`</s>`), found from the mask: left and right padding
    score the same, training's forward scores as the PPO step's forward_value does, and the value
    there sees every token (attention both ways), so the prompt moves the score."""
    model, scorer = untrained_model(encoder_dirs[family])
    sequences = scorer.encode_pairs(PROMPTS, ANSWERS).sequences
    assert len({len(row) for row in sequences}) == len(sequences)
    right = model.forward_value(*pad_right(sequences, 0))["chosen_end_scores"]
    input_ids, attention_mask = pad_left(sequences, 0)
    left = model.forward_value(input_ids, attention_mask)
    tolerance = rounding_tolerance(right, dtype=torch.float64)
    assert left["chosen_end_scores"].tolist() == pytest.approx(right.tolist(), abs=tolerance)
    scored = attention_mask.argmax(-1) if FIRST_TOKEN[family] else torch.full((len(sequences),), input_ids.shape[1] - 1)
    assert torch.equal(left["chosen_end_scores"], left["values"].gather(-1, scored[:, None])[:, 0])
    training = objective_forward(model, pair_batch(*pad_right(sequences[:2], 0)), END_TOKEN)["scores"]
    assert training.tolist() == pytest.approx(right[:2].tolist(), abs=tolerance)

    row = torch.as_tensor(sequences[0])[None]
    values = model.forward_value(row, return_value_only=True)[0]
    for position in (1, row.shape[1] - 2):  # the prompt's first token, the answer's last before the end specials
        changed = replaced(row, position, scorer.tokenizer.unk_token_id)
        moved = model.forward_value(changed)
        assert (moved["values"][0, 0] - values[0]).abs() > 1e3 * tolerance, f"position 0 does not see {position}"
        assert (moved["chosen_end_scores"][0] - right[0]).abs() > 1e3 * tolerance


@pytest.mark.numerics
@pytest.mark.parametrize("family", FAMILIES)
def test_length_chunks_give_the_same_loss_scores_and_gradients(family, encoder_dirs):
    """Encoders get no prefix sharing, so their rows are where padding costs most: run in length
    chunks, loss, scores and gradients equal one forward of the whole padded batch (float64)."""
    model, scorer = untrained_model(encoder_dirs[family])
    model.train()
    prompts = [PROMPTS[0] * 4, PROMPTS[2], PROMPTS[1], PROMPTS[2]]
    chosen = [ANSWERS[1], ANSWERS[2], ANSWERS[0], ANSWERS[2]]
    rejected = [ANSWERS[0], ANSWERS[1], ANSWERS[2], ANSWERS[1]]
    items = []
    chosen_ids = scorer.encode_pairs(prompts, chosen).sequences
    for better, worse in zip(chosen_ids, scorer.encode_pairs(prompts, rejected).sequences, strict=True):
        shared = next(i for i, (a, b) in enumerate(zip(better, worse, strict=False)) if a != b)
        items.append({"prompt": better[:shared], "responses": [better[shared:], worse[shared:]],
                      "ranks": np.arange(2), "margin": 0.0, "source": 0})
    assert_chunks_change_nothing(model, items, objective=END_TOKEN)


def replaced(row: torch.Tensor, position: int, token_id: int) -> torch.Tensor:
    """`row` with another token at `position`: `token_id`, or the next id when it is already there."""
    changed = row.clone()
    changed[0, position] = token_id if row[0, position] != token_id else token_id + 1
    return changed


@torch.no_grad()
def test_bert_scores_through_its_pooler(encoder_dirs):
    """BERT's score is the value head on its pooler's output (dense + tanh on [CLS]), which is what
    BertForSequenceClassification computes, so the export can reproduce it."""
    model, scorer = untrained_model(encoder_dirs["bert"])
    for row in scorer.encode_pairs(PROMPTS, ANSWERS).sequences:
        ids = torch.as_tensor(row)[None]
        pooled = model.rwtransformer(input_ids=ids, attention_mask=torch.ones_like(ids)).pooler_output
        expected = model.v_head(pooled)[0, 0]
        score = model.forward_value(ids)["chosen_end_scores"][0]
        assert score.item() == pytest.approx(expected.item(), abs=rounding_tolerance(expected, dtype=torch.float64))


@pytest.mark.parametrize("config", [MT5Config(d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2, vocab_size=64),
                                    UMT5Config(d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                                               vocab_size=64)], ids=["mt5", "umt5"])
def test_t5_variants_get_the_encoder_alone(config):
    backbone = new_backbone(config, trust_remote_code=False)
    assert type(backbone).__name__ == f"{type(config).__name__[:-6]}EncoderModel"
    assert "is an encoder" in prefix_sharing_problem(config)
    ids = torch.tensor([[5, 6, 7, 1, 0]])
    with torch.no_grad():
        values = RewardModel(backbone).forward_value(ids, torch.tensor([[1, 1, 1, 1, 0]]))
    assert values["chosen_end_scores"][0] == values["values"][0, 3]


@pytest.mark.parametrize("family", FAMILIES)
def test_trains_end_to_end_and_saves_what_step3_must_know(family, trained):
    """main.py trains the encoder without prefix sharing (one note, with the reason), saves it with a
    manifest that says it is no PPO critic and which token it scores, and the model rebuilt from OUTPUT
    alone (T5: the encoder-only class) scores the held-out split as the training evaluation did."""
    out, manifest, log, data = trained(family)
    notes = [line for line in log.splitlines() if line.startswith("note: prefix sharing is off")]
    assert len(notes) == 1 and f"model type {family} is an encoder" in notes[0], log[-3000:]
    assert re.search(r"batches: one row per response, .*, run in chunks of similar length", log)
    assert manifest["ppo_critic"] is False and "encoder" in manifest["ppo_critic_note"]
    assert manifest["scored_token"].startswith("the first token" if FIRST_TOKEN[family] else "the last token")
    assert manifest["pad_token_id"] is not None  # BERT has no eos to pad with: it keeps [PAD]
    # No `<|endoftext|>` text after the answers: the pooled token needs no marker.
    assert manifest["end_of_conversation_token"] == "" and manifest["end_of_conversation_token_ids"] == []

    model = load_reward_model(out)
    assert type(model.rwtransformer).__name__ == {"bert": "BertModel", "deberta-v2": "DebertaV2Model",
                                                   "t5": "T5EncoderModel"}[family]
    scorer = Scorer(model, load_hf_tokenizer(out), manifest["max_seq_len"], manifest["end_of_conversation_token"])
    cache = os.path.join(os.path.dirname(out), "rescore")
    source = DataSource((data,), "0,1,0", 1234, cache, str(REPO_ROOT), log=lambda message: None)
    held_out = score_split(scorer, saved_objective(manifest), DataRequest(source, scorer.max_seq_len), "eval")
    again = held_out.objective.summarize(held_out.table, held_out.source_names)
    final = manifest["final_eval"]
    assert again["chosen"] == pytest.approx(final["chosen"], abs=rounding_tolerance(final["chosen"]))
    if family == "bert":  # ranked lists with Plackett-Luce, learnt in 8 steps from 0.6 to about 0.87
        assert final["accuracy"] >= 0.75 and "top1_accuracy" in final, log[-3000:]


@torch.no_grad()
def test_bert_export_logits_equal_our_scores(trained):
    """OUTPUT/hf loads as BertForSequenceClassification whose logits (pooler, classifier with a zero
    bias) are our scores, in float64, and loads back as a reward model that scores the same."""
    out, manifest, _, _ = trained("bert")
    end_text = manifest["end_of_conversation_token"]
    hf_dir = os.path.join(out, "hf")
    assert manifest["hf_export"] == "hf" and "hf_export_skipped" not in manifest
    classifier = AutoModelForSequenceClassification.from_pretrained(hf_dir).double().eval()
    assert type(classifier).__name__ == "BertForSequenceClassification"
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    ours = load_reward_model(out).double()
    sequences = Scorer(ours, tokenizer, 64, end_text).encode_pairs(PROMPTS, ANSWERS).sequences
    batch = tokenizer.pad({"input_ids": [row.tolist() for row in sequences]}, return_tensors="pt")
    expected = ours.forward_value(batch["input_ids"], batch["attention_mask"])["chosen_end_scores"]
    logits = classifier(**batch).logits[:, 0]
    tolerance = rounding_tolerance(expected, dtype=torch.float64)
    assert logits.tolist() == pytest.approx(expected.tolist(), abs=tolerance)
    reloaded = load_reward_model(hf_dir).double()
    scores = reloaded.forward_value(batch["input_ids"], batch["attention_mask"])["chosen_end_scores"]
    assert scores.tolist() == pytest.approx(expected.tolist(), abs=tolerance)


@pytest.mark.parametrize("family", ["deberta-v2", "t5"])
def test_no_export_is_a_note_when_no_classifier_matches(family, trained, tmp_path, capsys):
    """DeBERTa-v2 and T5 have no sequence classifier for our weights: known in advance, so training
    and the converter end with status 0, a note, and the reason in the manifest; a stale hf/ goes."""
    out, manifest, log, _ = trained(family)
    reason = {"deberta-v2": "ContextPooler", "t5": "no encoder-only T5 sequence classifier"}[family]
    assert manifest["hf_export"] is None and reason in manifest["hf_export_skipped"]
    assert f"note: model type {family} has no Hugging Face export" in log and "error:" not in log
    assert not os.path.exists(os.path.join(out, "hf"))

    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    os.makedirs(os.path.join(copy, "hf"))  # an earlier export, which these weights would not match
    capsys.readouterr()
    assert export.main([copy]) == 0
    assert reason in capsys.readouterr().out
    assert not os.path.exists(os.path.join(copy, "hf")) and reason in load_manifest(copy)["hf_export_skipped"]


def test_per_token_loss_is_refused_in_one_line(encoder_dirs, tmp_path):
    """DeepSpeed-Chat's default loss compares values token by token: refused before any data is read."""
    data = write_source(tmp_path / "data", ranked=False)
    result = run_cli([sys.executable, "step2_reward_model/main.py", "--model_name_or_path", encoder_dirs["bert"],
                      "--data_path", data, "--data_output_path", str(tmp_path / "cache"), *TRAIN_FLAGS])
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--loss per_token" in errors[0] and "pass --loss end_token" in errors[0]
    assert "Traceback" not in result.stderr and "data:" not in result.stdout


def test_process_reward_is_refused_for_encoders(encoder_dirs):
    """A step's value must not see the later steps, which an encoder's does; causal LMs are unaffected."""
    args = parse_training_args(["--model_name_or_path", "m", "--process_reward"])
    with pytest.raises(UserError, match=r"^--objective process .* model type t5 is an encoder"):
        objective_for(args).check_backbone(load_config(encoder_dirs["t5"], False, "--model_name_or_path"))
    objective_for(args).check_backbone(OPTConfig())


def test_rw_eval_scores_an_encoder_output(trained):
    """`rw_eval.py --model_path OUT` on DeBERTa-v2 prints, from its padded batches, the pooled score of
    each text alone (the built-in examples are longer than training's 64 tokens; relative positions
    take any length)."""
    from rw_eval import BUILT_IN_EXAMPLES

    out, manifest, _, _ = trained("deberta-v2")
    result = run_cli([sys.executable, "rw_eval.py", "--model_path", out, "--max_seq_len", "256"],
                     env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    printed = [float(value) for value in re.findall(r"reward: (-?[\d.]+)", result.stdout)]
    model = load_reward_model(out)
    scorer = Scorer(model, load_hf_tokenizer(out), 256, manifest["end_of_conversation_token"])
    with torch.no_grad():
        expected = [model.forward_value(torch.as_tensor(row)[None])["chosen_end_scores"].item()
                    for pair in BUILT_IN_EXAMPLES
                    for row in scorer.encode_pairs([pair["prompt"]] * 2, [pair["chosen"], pair["rejected"]]).sequences]
    assert printed == pytest.approx(expected, abs=5e-5 + rounding_tolerance(expected))
