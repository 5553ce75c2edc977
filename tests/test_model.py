"""The reward model on tiny random backbones of each family: value-head width, scoring position,
padding invariance, the PPO-step `forward_value`, and saving/loading. No training, no launcher."""

from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pytest
import torch
from conftest import assert_chunks_change_nothing, objective_forward, pair_batch, rounding_tolerance
from rlhf_reward.utils.data.collate import length_chunks
from rlhf_reward.utils.data.synthetic import make_pairs
from rlhf_reward.utils.errors import UserError
from rlhf_reward.utils.model_files import load_hf_tokenizer
from rlhf_reward.utils.tiny import tiny_config
from transformers import AutoModel

from step2_reward_model.model import RewardModel, create_reward_model
from step2_reward_model.objectives.preference import Preference
from step2_reward_model.output import WEIGHTS_NAME, load_reward_model

FAMILIES = ("opt", "gpt2", "gpt_neox", "llama")
HIDDEN = 64
OPT_PROJ = 32  # OPT-350m style: word_embed_proj_dim (512) differs from hidden_size (1024)


def build_backbone(family: str, tokenizer, seed: int = 0):
    config = tiny_config(family, tokenizer, hidden=HIDDEN, layers=2)
    if family == "opt":
        config.word_embed_proj_dim = OPT_PROJ  # adds project_in/project_out, as in facebook/opt-350m
    torch.manual_seed(seed)
    return AutoModel.from_config(config)


@pytest.fixture(scope="module")
def reward_models(tokenizers) -> dict[str, RewardModel]:
    models = {}
    for family in FAMILIES:
        model = RewardModel(build_backbone(family, tokenizers[family]))
        torch.nn.init.normal_(model.v_head.weight, std=1.0)  # scores of order 1, so differences show
        models[family] = model.eval()
    return models


def pair_sequences(tokenizer, count: int = 3) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`count` chosen and `count` rejected token sequences, all of different lengths."""
    rows = make_pairs(count, seed=1)
    chosen_lengths, rejected_lengths = [9, 17, 12], [14, 7, 20]
    chosen, rejected = [], []
    for i, row in enumerate(rows):
        c = tokenizer(row["prompt"] + row["chosen"])["input_ids"]
        r = tokenizer(row["prompt"] + row["rejected"])["input_ids"]
        assert len(c) >= chosen_lengths[i] and len(r) >= rejected_lengths[i]
        chosen.append(torch.tensor(c[:chosen_lengths[i]]))
        rejected.append(torch.tensor(r[:rejected_lengths[i]]))
    return chosen, rejected


def pad(sequences: list[torch.Tensor], pad_id: int, side: str = "right",
        extra: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch, `extra` columns wider than the longest row, with its attention mask."""
    width = max(len(s) for s in sequences) + extra
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[i, span] = seq
        mask[i, span] = 1
    return ids, mask


def pad_id_of(tokenizer) -> int:
    """DeepSpeed-Chat's convention: pad with eos (the test tokenizers for GPT-2/NeoX/Llama have no pad)."""
    return tokenizer.eos_token_id


def assert_scores_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Scores of the same sequences computed in float32 by another route (another batch or padding)."""
    torch.testing.assert_close(actual, expected, atol=rounding_tolerance(expected), rtol=0)


@torch.no_grad()
def score_alone(model: RewardModel, sequence: torch.Tensor) -> torch.Tensor:
    """The end score of one sequence, with no padding at all and no mask."""
    return model.forward_value(sequence[None])["chosen_end_scores"][0]


# --------------------------------------------------------------------------- value head


@pytest.mark.parametrize("family", FAMILIES)
def test_value_head_width(family, reward_models):
    model = reward_models[family]
    config = model.config
    expected = config.word_embed_proj_dim if family == "opt" else config.hidden_size
    if family == "opt":
        assert config.word_embed_proj_dim == OPT_PROJ != config.hidden_size
    assert model.v_head.in_features == expected
    assert model.v_head.out_features == 1
    assert model.v_head.bias is None


# --------------------------------------------------------------------------- forward / forward_value


@pytest.mark.numerics
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("loss", ["per_token", "end_token"])
@torch.no_grad()
def test_forward_scores_match_unpadded_sequences(family, loss, reward_models, tokenizers):
    model, tokenizer = reward_models[family], tokenizers[family]
    chosen, rejected = pair_sequences(tokenizer)
    ids, mask = pad(chosen + rejected, pad_id_of(tokenizer), side="right")
    out = objective_forward(model, pair_batch(ids, mask), Preference(loss_name=loss))
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    assert out["chosen_mean_scores"].shape == (3,) and out["rejected_mean_scores"].shape == (3,)
    expected_chosen = torch.stack([score_alone(model, s) for s in chosen])
    expected_rejected = torch.stack([score_alone(model, s) for s in rejected])
    assert_scores_close(out["chosen_mean_scores"], expected_chosen)
    assert_scores_close(out["rejected_mean_scores"], expected_rejected)


@pytest.mark.parametrize("seed", range(20))
def test_length_chunks_is_the_cheapest_split(seed):
    """Every row in exactly one chunk, cut to its chunk's longest, and no split of the rows (sorted
    by length, cut anywhere) has fewer padded tokens plus chunk costs."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 300, size=int(rng.integers(1, 9))).tolist()
    chunk_tokens = int(rng.choice([0, 32, 256]))
    chunks = length_chunks(lengths, chunk_tokens)
    assert sorted(i for rows, _ in chunks for i in rows) == list(range(len(lengths)))
    assert all(width == 8 * math.ceil(max(lengths[i] for i in rows) / 8) for rows, width in chunks)
    widths = sorted((8 * math.ceil(n / 8) for n in lengths), reverse=True)
    best = min(sum((b - a) * widths[a] + chunk_tokens for a, b in itertools.pairwise((0, *cuts, len(widths))))
               for k in range(len(widths)) for cuts in itertools.combinations(range(1, len(widths)), k))
    assert sum(len(rows) * width + chunk_tokens for rows, width in chunks) == best
    assert len(length_chunks(lengths, 10**9)) == 1


@pytest.mark.numerics
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("loss", ["per_token", "end_token"])
def test_length_chunks_give_the_same_loss_scores_and_gradients(family, loss, tokenizers):
    """Unpacked rows run in chunks of similar length, each cut to its longest row: in float64, loss,
    scores and every gradient equal one forward of the whole padded batch."""
    model = RewardModel(build_backbone(family, tokenizers[family])).double()
    torch.nn.init.normal_(model.v_head.weight, std=1.0)
    rng = np.random.default_rng(0)
    items = [{"prompt": rng.integers(5, model.config.vocab_size, size=prompt),
              "responses": [rng.integers(5, model.config.vocab_size, size=n) for n in answers],
              "ranks": np.arange(2), "margin": 0.0, "source": 0}
             for prompt, answers in ((60, (10, 3)), (5, (4, 25)), (30, (8, 9)), (4, (2, 3)))]
    assert_chunks_change_nothing(model, items, pad_id_of(tokenizers[family]), Preference(loss_name=loss))


@pytest.mark.numerics
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_forward_value_left_and_right_padding_agree(family, reward_models, tokenizers):
    model, tokenizer = reward_models[family], tokenizers[family]
    chosen, rejected = pair_sequences(tokenizer)
    sequences = chosen + rejected
    right = model.forward_value(*pad(sequences, pad_id_of(tokenizer), side="right"))["chosen_end_scores"]
    left = model.forward_value(*pad(sequences, pad_id_of(tokenizer), side="left"))["chosen_end_scores"]
    alone = torch.stack([score_alone(model, s) for s in sequences])
    assert right.shape == left.shape == (6,)
    assert_scores_close(left, right)
    assert_scores_close(left, alone)
    # The pad id itself is irrelevant: only the mask says where a row ends.
    other_pad = model.forward_value(*pad(sequences, 7, side="left"))["chosen_end_scores"]
    assert_scores_close(other_pad, left)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_forward_value_return_value_only(family, reward_models, tokenizers):
    model, tokenizer = reward_models[family], tokenizers[family]
    chosen, rejected = pair_sequences(tokenizer)
    ids, mask = pad(chosen + rejected, pad_id_of(tokenizer), side="right")
    values = model.forward_value(ids, mask, return_value_only=True)
    assert torch.is_tensor(values)
    assert values.shape == ids.shape
    full = model.forward_value(ids, mask)
    assert set(full) == {"values", "chosen_end_scores"}
    torch.testing.assert_close(full["values"], values)
    lengths = mask.sum(-1)
    torch.testing.assert_close(full["chosen_end_scores"], values[torch.arange(len(ids)), lengths - 1])
    # prompt_length and use_cache, as step 3 passes them, change nothing.
    step3 = model.forward_value(ids, mask, prompt_length=4, use_cache=True)
    torch.testing.assert_close(step3["chosen_end_scores"], full["chosen_end_scores"])


# --------------------------------------------------------------------------- scoring position quirks


@pytest.mark.numerics
@torch.no_grad()
def test_opt_scores_last_real_token_when_pad_is_eos_and_bos(model_dirs):
    """OPT after load_hf_tokenizer: `</s>` is bos, eos and pad; every text starts with it and is padded
    with it. A search for the pad id would find position 0 (or the first pad); the mask gives len-1."""
    tokenizer = load_hf_tokenizer(model_dirs["opt"])
    pad_id = tokenizer.pad_token_id
    assert pad_id == tokenizer.eos_token_id == tokenizer.bos_token_id
    assert tokenizer.convert_ids_to_tokens(pad_id) == "</s>"
    rows = make_pairs(4, seed=3)
    texts = [rows[0]["prompt"], rows[1]["prompt"] + rows[1]["chosen"], rows[2]["prompt"] + rows[2]["rejected"],
             rows[3]["prompt"][:12]]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (ids[:, 0] == pad_id).all(), "OPT texts start with </s>"
    lengths = mask.sum(-1)
    assert len(set(lengths.tolist())) == len(texts) and lengths.max() == ids.shape[1]
    for i, length in enumerate(lengths.tolist()):
        assert (ids[i, length:] == pad_id).all(), "right-padded with </s>"

    model = create_reward_model(model_dirs["opt"], tokenizer).eval()
    torch.nn.init.normal_(model.v_head.weight, std=1.0)
    values = model.forward_value(ids, mask, return_value_only=True)
    end = model.forward_value(ids, mask)["chosen_end_scores"]
    rows_ = torch.arange(len(texts))
    torch.testing.assert_close(end, values[rows_, lengths - 1], atol=0, rtol=0)
    # Make sure the check can fail: the first pad-id occurrence (the leading </s>) scores differently.
    first_pad = (ids == pad_id).int().argmax(-1)
    assert (first_pad == 0).all()
    assert not torch.allclose(end, values[rows_, first_pad], atol=1e-3)
    # ... and each end score is the score of the sequence on its own.
    for i, length in enumerate(lengths.tolist()):
        assert_scores_close(end[i], score_alone(model, ids[i, :length]))


@pytest.mark.numerics
@torch.no_grad()
def test_gpt2_scores_final_eos_when_pad_is_eos(model_dirs):
    """GPT-2 style pad == eos: a sequence ending in eos, right-padded with eos, is scored at its eos."""
    tokenizer = load_hf_tokenizer(model_dirs["gpt2"])
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    rows = make_pairs(3, seed=5)
    sequences = [torch.tensor(tokenizer(row["prompt"] + row["chosen"])["input_ids"][:n] + [eos])
                 for row, n in zip(rows, (6, 11, 15), strict=True)]
    ids, mask = pad(sequences, eos, side="right", extra=4)
    lengths = mask.sum(-1)
    assert (ids[torch.arange(3), lengths - 1] == eos).all()
    assert (ids[torch.arange(3), lengths] == eos).all()

    model = create_reward_model(model_dirs["gpt2"], tokenizer).eval()
    torch.nn.init.normal_(model.v_head.weight, std=1.0)
    values = model.forward_value(ids, mask, return_value_only=True)
    end = model.forward_value(ids, mask)["chosen_end_scores"]
    rows_ = torch.arange(3)
    torch.testing.assert_close(end, values[rows_, lengths - 1], atol=0, rtol=0)
    assert not torch.allclose(end, values[rows_, lengths - 2], atol=1e-3), "scored the token before eos"
    train_out = objective_forward(model, pair_batch(torch.cat([ids, ids]), torch.cat([mask, mask])))
    assert_scores_close(train_out["chosen_mean_scores"], end)
    for i, seq in enumerate(sequences):
        assert_scores_close(end[i], score_alone(model, seq))


# --------------------------------------------------------------------------- load_reward_model


def save_by_hand(model: RewardModel, folder, state: dict | None = None) -> None:
    os.makedirs(folder, exist_ok=True)
    torch.save(model.state_dict() if state is None else state, os.path.join(folder, WEIGHTS_NAME))
    model.config.save_pretrained(folder)


def assert_one_line_user_error(excinfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert message and "\n" not in message, f"not a one-line message: {message!r}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_load_reward_model_round_trip(family, reward_models, tokenizers, tmp_path):
    model, tokenizer = reward_models[family], tokenizers[family]
    save_by_hand(model, tmp_path)
    loaded = load_reward_model(str(tmp_path))
    assert isinstance(loaded, RewardModel) and not loaded.training
    assert loaded.v_head.in_features == model.v_head.in_features
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    chosen, rejected = pair_sequences(tokenizer)
    ids, mask = pad(chosen + rejected, pad_id_of(tokenizer))
    expected, got = model.forward_value(ids, mask), loaded.forward_value(ids, mask)
    assert torch.equal(got["chosen_end_scores"], expected["chosen_end_scores"])
    assert torch.equal(got["values"], expected["values"])
    assert torch.equal(objective_forward(loaded, pair_batch(ids, mask))["loss"],
                       objective_forward(model, pair_batch(ids, mask))["loss"])


def test_load_reward_model_missing_folder(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(UserError) as excinfo:
        load_reward_model(str(missing))
    assert_one_line_user_error(excinfo, str(missing))


def test_load_reward_model_folder_without_weights(reward_models, tmp_path):
    reward_models["gpt2"].config.save_pretrained(tmp_path)
    with pytest.raises(UserError) as excinfo:
        load_reward_model(str(tmp_path))
    assert_one_line_user_error(excinfo, WEIGHTS_NAME)


def test_load_reward_model_missing_key(reward_models, tmp_path):
    model = reward_models["gpt2"]
    state = dict(model.state_dict())
    del state["v_head.weight"]
    save_by_hand(model, tmp_path, state)
    with pytest.raises(UserError) as excinfo:
        load_reward_model(str(tmp_path))
    assert_one_line_user_error(excinfo, "v_head.weight")


def test_load_reward_model_extra_key(reward_models, tmp_path):
    model = reward_models["llama"]
    state = dict(model.state_dict())
    state["v_head.bias"] = torch.zeros(1)
    save_by_hand(model, tmp_path, state)
    with pytest.raises(UserError) as excinfo:
        load_reward_model(str(tmp_path))
    assert_one_line_user_error(excinfo, "v_head.bias")


MARKER_ENV = "REWARD_TEST_PICKLE_MARKER"


def _side_effect(path: str) -> dict:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("executed")
    return {}


class _Payload:
    """Unpickling this calls `_side_effect`: code execution, which weights_only must refuse."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (_side_effect, (self.marker,))


@pytest.mark.parametrize("payload", ["object", "function"])
def test_load_reward_model_refuses_pickled_code(payload, reward_models, tmp_path):
    model = reward_models["gpt2"]
    marker = tmp_path / "executed.txt"
    state = dict(model.state_dict())
    state["evil"] = _Payload(str(marker)) if payload == "object" else _side_effect
    folder = tmp_path / "model"
    save_by_hand(model, folder, state)
    with pytest.raises(UserError) as excinfo:
        load_reward_model(str(folder))
    assert not marker.exists(), "the pickle's code ran: torch.load without weights_only=True"
    assert_one_line_user_error(excinfo, "refused")


# --------------------------------------------------------------------------- create_reward_model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("add_eot_token", [False, True])
def test_create_reward_model_embeddings_and_pad(family, add_eot_token, model_dirs):
    tokenizer = load_hf_tokenizer(model_dirs[family], add_eot_token=add_eot_token)
    model = create_reward_model(model_dirs[family], tokenizer)
    rows = model.rwtransformer.get_input_embeddings().weight.shape[0]
    assert rows == 8 * math.ceil(len(tokenizer) / 8)
    assert rows >= len(tokenizer) and rows % 8 == 0
    if family == "llama" or (add_eot_token and family == "opt"):  # [PAD] / <|endoftext|> added: 513 -> 520 rows
        assert len(tokenizer) % 8 != 0 and rows > len(tokenizer)
    assert model.config.vocab_size == rows
    assert model.config.pad_token_id == model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.end_token_id == tokenizer.eos_token_id
    assert model.v_head.in_features == model.config.hidden_size


def test_create_then_load_round_trip(model_dirs, tmp_path):
    """What step 2 saves (resized embeddings, pad = eos) is what load_reward_model rebuilds."""
    tokenizer = load_hf_tokenizer(model_dirs["llama"])
    model = create_reward_model(model_dirs["llama"], tokenizer).eval()
    save_by_hand(model, tmp_path)
    loaded = load_reward_model(str(tmp_path))
    ids = torch.tensor([tokenizer("Human: What is 2 plus 2?")["input_ids"] + [tokenizer.pad_token_id]])
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    with torch.no_grad():
        assert torch.equal(loaded.forward_value(ids, mask)["chosen_end_scores"],
                           model.forward_value(ids, mask)["chosen_end_scores"])


@pytest.mark.numerics
@pytest.mark.parametrize("family", FAMILIES)
def test_create_reward_model_dropout_acts_in_training_only(model_dirs, family):
    """--dropout reaches the backbone's layers (the saved tiny models have none): at 0.25 two training passes
    differ from each other and from evaluation at over 90% of tokens, while two evaluation passes are identical; at 0.0
    (--disable_dropout) every training pass is exactly the evaluation pass."""
    tokenizer = load_hf_tokenizer(model_dirs[family])
    ids, mask = pad(pair_sequences(tokenizer)[0], pad_id_of(tokenizer))
    real = mask.bool()

    def changed(a: torch.Tensor, b: torch.Tensor) -> float:
        """The share of real tokens whose value differs by more than rounding could explain."""
        return ((a - b).abs() > 1e-6 * (1 + a.abs())).float().mean().item()

    for dropout in (0.25, 0.0):
        torch.manual_seed(0)  # the dropout masks
        model = create_reward_model(model_dirs[family], tokenizer, dropout=dropout).double()
        torch.nn.init.normal_(model.v_head.weight, std=1.0, generator=torch.Generator().manual_seed(0))
        passes = {}
        for mode in ("eval", "train"):
            model.train(mode == "train")
            with torch.no_grad():
                passes[mode] = [model.forward_value(ids, mask, return_value_only=True)[real] for _ in range(2)]
        assert torch.equal(*passes["eval"]), f"dropout {dropout}: two evaluation passes differ"
        if dropout:
            assert changed(*passes["train"]) > 0.9, "two training passes agree: dropout is off"
            assert changed(passes["train"][0], passes["eval"][0]) > 0.9, "training agrees with evaluation"
        else:
            assert torch.equal(*passes["train"]), "dropout 0.0: two training passes differ"
            assert torch.equal(passes["train"][0], passes["eval"][0]), "dropout 0.0: training differs from evaluation"


def test_create_reward_model_nonexistent_path(tokenizers, tmp_path):
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(UserError) as excinfo:
        create_reward_model(str(missing), tokenizers["gpt2"])
    assert_one_line_user_error(excinfo, "--model_name_or_path", str(missing))


def test_load_hf_tokenizer_nonexistent_path(tmp_path):
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(UserError) as excinfo:
        load_hf_tokenizer(str(missing))
    assert_one_line_user_error(excinfo, "--model_name_or_path", str(missing))


# A broken folder is a one-line UserError, which rw_eval.py prints as `error: ...`.


def test_load_reward_model_shape_mismatch_is_user_error(tokenizers, tmp_path):
    """Weights of a model of another size under this config.json (same keys, other shapes)."""
    small = RewardModel(AutoModel.from_config(tiny_config("gpt2", tokenizers["gpt2"], hidden=32)))
    big = RewardModel(AutoModel.from_config(tiny_config("gpt2", tokenizers["gpt2"], hidden=64)))
    save_by_hand(big, tmp_path, small.state_dict())
    with pytest.raises(UserError) as excinfo:
        load_reward_model(str(tmp_path))
    assert_one_line_user_error(excinfo, "v_head.weight")


def test_load_reward_model_without_config_is_user_error(reward_models, tmp_path):
    """A folder with pytorch_model.bin but no config.json."""
    torch.save(reward_models["gpt2"].state_dict(), tmp_path / WEIGHTS_NAME)
    with pytest.raises(UserError) as excinfo:
        load_reward_model(str(tmp_path))
    assert_one_line_user_error(excinfo, "config.json")


CUSTOM_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("executed")
from transformers import PretrainedConfig


class TinyCustomConfig(PretrainedConfig):
    model_type = "tiny_custom"
"""


def test_model_code_runs_only_with_trust_remote_code(model_dirs, tmp_path):
    """A model folder whose config points at its own Python file (`auto_map`): refused with a reason
    by training and by loading, unless the user passes --trust_remote_code."""
    import json
    import shutil

    from transformers import AutoConfig

    folder = tmp_path / "custom"
    shutil.copytree(model_dirs["opt"], folder)
    marker = tmp_path / "executed.txt"
    (folder / "custom_config.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="tiny_custom", auto_map={"AutoConfig": "custom_config.TinyCustomConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer = load_hf_tokenizer(model_dirs["opt"])
    with pytest.raises(UserError) as excinfo:
        create_reward_model(str(folder), tokenizer)
    assert_one_line_user_error(excinfo, "--model_name_or_path", "runs only with --trust_remote_code")
    with pytest.raises(UserError) as excinfo:
        load_reward_model(str(folder))
    assert_one_line_user_error(excinfo, "--model_path", "runs only with --trust_remote_code")
    assert not marker.exists(), "the model's own code ran without --trust_remote_code"
    AutoConfig.from_pretrained(str(folder), trust_remote_code=True)  # trusted: the same folder runs its code
    assert marker.exists()
