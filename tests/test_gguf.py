"""A GGUF file (llama.cpp's single-file format) as --model_name_or_path. The tests write a tiny Llama
to GGUF themselves (F32 tensors, its byte-level BPE vocabulary, a chat template), so what is read
back must equal the original bit for bit; training from it must save an ordinary OUTPUT folder that
rw_eval.py, export.py and the hf/ export load without the GGUF or the hub; and a missing or damaged
file is one `error:` line naming it."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import corpus, rounding_tolerance, run_cli
from rlhf_reward.utils.data.synthetic import write_dataset
from rlhf_reward.utils.errors import UserError
from rlhf_reward.utils.model_files import END_OF_CONVERSATION_TOKEN, load_hf_tokenizer
from rlhf_reward.utils.tiny import tiny_config
from test_train import assert_reproduces, rescore
from transformers import AutoModel

from step2_reward_model import export
from step2_reward_model.model import create_reward_model, load_config
from step2_reward_model.output import load_manifest, load_reward_model, load_scoring_tokenizer
from step2_reward_model.scoring import Scorer

CHAT_TEMPLATE = "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
PROMPT = "\n\nHuman: How do I boil an egg?\n\nAssistant:"
ANSWERS = [" Gladly, here you go. Put it in hot water for ten minutes.", " Whatever, not my problem."]
TRAIN = ["--data_split", "0,1,0", "--dtype", "fp32", "--per_device_train_batch_size", "16",
         "--per_device_eval_batch_size", "16", "--max_seq_len", "128", "--learning_rate", "1e-3", "--deepspeed"]


def permuted(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter reorders the rows of each q/k head (its rotary layout); transformers
    undoes that when it reads a Llama GGUF, so a writer has to do it."""
    half_head = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half_head, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def add_architecture(writer: gguf.GGUFWriter, config) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer) -> None:
    """The vocabulary in id order, its special tokens marked as control tokens, the merges, and a
    BOS in front of every text, as the tiny Llama tokenizer does."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if index in special else gguf.TokenType.NORMAL
                            for index in range(len(tokens))])
    writer.add_token_merges([" ".join(pair) for pair in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHAT_TEMPLATE)


def add_tensors(writer: gguf.GGUFWriter, model) -> None:
    """Every weight in F32 under its GGUF name (`blk.0.attn_q.weight`, ...)."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        module, kind = key.rsplit(".", 1)
        name = f"{names.get_name(module)}.{kind}"
        weight = tensor.numpy()
        if ".attn_q." in name:
            weight = permuted(weight, config.num_attention_heads)
        elif ".attn_k." in name:
            weight = permuted(weight, config.num_key_value_heads)
        writer.add_tensor(name, np.ascontiguousarray(weight, dtype=np.float32))


def write_gguf(path: str, model, tokenizer) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    add_architecture(writer, model.config)
    add_tokenizer(writer, tokenizer)
    add_tensors(writer, model)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tokenizers) -> tuple[str, torch.nn.Module, object]:
    """`(path of tiny.gguf, the Llama it was written from, its tokenizer)`."""
    tokenizer = tokenizers["llama"]
    config = tiny_config("llama", tokenizer)
    config.rms_norm_eps = 2.0 ** -20  # GGUF stores float32: an exact one keeps both models' sums equal
    torch.manual_seed(0)
    model = AutoModel.from_config(config).eval()
    path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    write_gguf(path, model, tokenizer)
    return path, model, tokenizer


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("pairs")
    write_dataset(str(folder), train=96, evaluation=48)
    return str(folder)


def test_backbone_and_tokenizer_read_back_exactly(tiny_gguf):
    path, original, tokenizer = tiny_gguf
    loaded = load_hf_tokenizer(path)
    texts = [*corpus()[:40], "<s> Human: ünïcode \n\n tabs\tand  spaces </s>"]
    assert [loaded(text)["input_ids"] for text in texts] == [tokenizer(text)["input_ids"] for text in texts]
    assert loaded.chat_template == CHAT_TEMPLATE

    backbone = create_reward_model(path, loaded).rwtransformer.eval()
    assert not hasattr(backbone.config, "quantization_config")  # or config.json would ask for the GGUF again
    params, expected = dict(backbone.named_parameters()), original.state_dict()
    assert set(params) == set(expected)
    for name, weight in expected.items():
        assert params[name].dtype == torch.float32 and params[name].requires_grad, name
        assert torch.equal(params[name][:weight.shape[0]], weight), name  # the embedding grew to a multiple of 8
    ids = torch.tensor([tokenizer(texts[0])["input_ids"]])
    with torch.no_grad():
        assert torch.equal(backbone(input_ids=ids).last_hidden_state, original(input_ids=ids).last_hidden_state)


def scorer_for(folder: str) -> Scorer:
    return Scorer(load_reward_model(folder), load_scoring_tokenizer(folder), 128, END_OF_CONVERSATION_TOKEN)


def test_training_from_gguf_saves_an_ordinary_output(tiny_gguf, small_data, tmp_path):
    path, out, cache = tiny_gguf[0], tmp_path / "out", str(tmp_path / "cache")
    result = run_cli([sys.executable, "step2_reward_model/main.py", "--model_name_or_path", path, "--data_path",
                      small_data, "--data_output_path", cache, "--output_dir", str(out), *TRAIN],
                     env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = load_manifest(str(out))
    assert manifest["base_model"] == path and manifest["hf_export"] == "hf"
    # the GGUF's own template, trimmed after the last end-of-turn token (utils.data.chat.scoring_template)
    assert manifest["chat_template"] == "the model's own" and CHAT_TEMPLATE in load_scoring_tokenizer(out).chat_template
    assert manifest["chat_template_sha256"] == hashlib.sha256(
        load_scoring_tokenizer(out).chat_template.encode()).hexdigest()
    for folder in (out, out / "hf"):
        assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    # training evaluated with the GGUF's tokenizer and weights; OUTPUT alone gives the same numbers
    assert_reproduces(manifest["final_eval"], rescore(out, small_data, cache), torch.float32)

    expected = scorer_for(str(out)).score_answers(PROMPT, ANSWERS)
    cli = run_cli([sys.executable, "rw_eval.py", "--model_path", str(out), "--prompt", PROMPT, "--chosen", ANSWERS[0],
                   "--rejected", ANSWERS[1]], env={"HF_HUB_OFFLINE": "1"})
    assert cli.returncode == 0, cli.stderr[-3000:]
    reported = [float(value) for value in re.findall(r"reward: (-?[\d.]+)", cli.stdout)]
    assert reported == pytest.approx(expected, abs=1e-4)  # printed to 4 decimals
    tolerance = rounding_tolerance(expected)
    assert scorer_for(str(out / "hf")).score_answers(PROMPT, ANSWERS) == pytest.approx(expected, abs=tolerance)

    converted = tmp_path / "converted"
    assert export.main([str(out), "--output_dir", str(converted)]) == 0
    assert scorer_for(str(converted / "hf")).score_answers(PROMPT, ANSWERS) == pytest.approx(expected, abs=tolerance)


def damaged(kind: str, good: str, folder: Path) -> str:
    """The path of a GGUF that is `missing`, `not_gguf` (JSON text) or `truncated`."""
    path = folder / "bad.gguf"
    if kind == "not_gguf":
        path.write_text('{"model_type": "llama"}')
    elif kind == "truncated":  # an interrupted download: the tensor data ends early
        data = Path(good).read_bytes()
        path.write_bytes(data[:len(data) * 3 // 4])
    return str(path)


@pytest.mark.parametrize("kind", ["missing", "not_gguf", "truncated"])
def test_a_bad_gguf_is_one_line_naming_it(kind, tiny_gguf, tmp_path):
    path, tokenizer = damaged(kind, tiny_gguf[0], tmp_path), tiny_gguf[2]
    reason = "no such GGUF file" if kind == "missing" else "not a readable GGUF file"
    loaders = (load_hf_tokenizer, lambda source: load_config(source, False, "--model_name_or_path"),
               lambda source: create_reward_model(source, tokenizer))
    for load in loaders:
        with pytest.raises(UserError) as raised:
            load(path)
        message = str(raised.value)
        assert message.startswith(f"--model_name_or_path '{path}': {reason}") and "\n" not in message


def test_training_from_a_bad_gguf_exits_with_one_error_line(tiny_gguf, small_data, tmp_path):
    path = damaged("truncated", tiny_gguf[0], tmp_path)
    result = run_cli([sys.executable, "step2_reward_model/main.py", "--model_name_or_path", path, "--data_path",
                      small_data, "--data_output_path", str(tmp_path / "cache"), *TRAIN], env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    expected = f"error: --model_name_or_path '{path}': not a readable GGUF file"
    assert len(errors) == 1 and errors[0].startswith(expected), result.stderr
    assert "Traceback" not in result.stderr
