"""The RL frameworks score our export as rw_eval.py does, through their own code: TRL (GRPO's reward
computation, PPO's get_reward), OpenRLHF (its reward-model loader with normalize_reward, its remote
reward client against rw_eval.py's server) and verl (its reward-loop text, its custom_reward_function
loader), for DeepSpeed-Chat's layout (a tiny OPT, no chat template) and a tiny Llama with a ChatML
template. Each framework skips with the reason when it is not installed (make test installs them).

Stubs, where a GPU-only import stands in the way on the CPU: OpenRLHF imports flash_attn at module level
(tests/stubs/flash_attn: the names it imports, which raise if called) and loads weights in bf16 or fp16
only (`convert_to_torch_dtype` is made to return float32, so the comparison holds to float32 rounding).
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import threading
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, corpus, rounding_tolerance
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

from step2_reward_model.integrations import RewardFunction, compute_score
from step2_reward_model.model import create_reward_model
from step2_reward_model.output import STATS_NAME, reward_mean_std, save_reward_model
from step2_reward_model.report import reward_statistics
from step2_reward_model.scoring import Scorer, load_scorer
from step2_reward_model.server import make_server
from utils.model_files import END_OF_CONVERSATION_TOKEN, load_hf_tokenizer
from utils.tiny import save_tiny_model

STUBS = str(REPO_ROOT / "tests" / "stubs")
CHATML = ("{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
QUESTIONS = ["What is 17 plus 25?", "Tell me about the sea.", "Hi!", "Why is the sky blue?", "Name a colour."]
CHOSEN = ["It is 42.", "The sea covers most of the planet and is salty.", "Hello, how can I help?",
          "Air scatters blue light more than red light.", "Red."]
REJECTED = ["It is 41.", "No.", "Go away.", "I do not know.", "The sea is a colour."]
LAYOUTS = ("opt", "llama_chat")


def conversation(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def text_prompt(question: str) -> str:
    return f"\n\nHuman: {question}\n\nAssistant:"


def save_chat_llama(folder: str) -> None:
    """A tiny Llama whose tokenizer has ChatML turns, eos = <|im_end|> (as instruction-tuned models) and a
    template that writes the bos token itself."""
    from transformers import AutoModel

    save_tiny_model(folder, corpus(), family="llama", hidden=64, layers=2)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    model = AutoModel.from_pretrained(folder)
    model.resize_token_embeddings(len(tokenizer))
    model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)


def save_with_stats(out: str, model_dir: str) -> str:
    """A random-headed reward model saved as training saves it, with held-out statistics measured on the
    test pairs (so hf/config.json carries a real mean and std)."""
    tokenizer = load_hf_tokenizer(model_dir)
    torch.manual_seed(0)
    model = create_reward_model(model_dir, tokenizer).eval()
    torch.nn.init.normal_(model.v_head.weight, std=1.0)
    scorer = Scorer(model, tokenizer, 128, END_OF_CONVERSATION_TOKEN)
    prompts = [conversation(q) for q in QUESTIONS]
    chosen = scorer.score_ids(scorer.encode_pairs(prompts, [[assistant(a)] for a in CHOSEN]))
    rejected = scorer.score_ids(scorer.encode_pairs(prompts, [[assistant(a)] for a in REJECTED]))
    meta = {"base_model": model_dir, "end_of_conversation_token": END_OF_CONVERSATION_TOKEN, "max_seq_len": 128}
    save_reward_model(model, tokenizer, out, zero_stage=0, rank=0, meta=meta,
                      stats=reward_statistics(chosen, rejected, "test pairs"))
    return out


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def outputs(model_dirs, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("consumers")
    chat_dir = str(root / "tiny-llama_chat")
    save_chat_llama(chat_dir)
    return {"opt": save_with_stats(str(root / "out_opt"), model_dirs["opt"]),
            "llama_chat": save_with_stats(str(root / "out_llama_chat"), chat_dir)}


def ours(out: str, prompts: list, answers: list) -> list[float]:
    """rw_eval.py's rewards: its scorer (`load_scorer`), on the conversations as given."""
    scorer = load_scorer(out, device="cpu")
    return scorer.score_ids(scorer.encode_pairs(prompts, answers))


def close(got, expected) -> None:
    got, expected = [float(x) for x in got], [float(x) for x in expected]
    assert got == pytest.approx(expected, abs=rounding_tolerance(expected)), (got, expected)


def conversations() -> tuple[list, list]:
    prompts = [conversation(q) for q in QUESTIONS] * 2
    answers = [[assistant(a)] for a in CHOSEN + REJECTED]
    return prompts, answers


# --------------------------------------------------------------------------------------------
# The export itself: what every consumer reads
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_export_carries_what_consumers_read(layout, outputs):
    out = outputs[layout]
    hf = os.path.join(out, "hf")
    config = json.load(open(os.path.join(hf, "config.json")))
    mean, std = reward_mean_std(out)
    assert (config["mean"], config["std"]) == (mean, std) and config["value_head_prefix"] == "score"
    pad_ids = {json.load(open(os.path.join(out, "config.json")))["pad_token_id"], config["pad_token_id"],
               json.load(open(os.path.join(out, "reward_model.json")))["pad_token_id"],
               json.load(open(os.path.join(hf, "reward_model.json")))["pad_token_id"],
               AutoTokenizer.from_pretrained(out).pad_token_id, AutoTokenizer.from_pretrained(hf).pad_token_id}
    assert len(pad_ids) == 1, pad_ids
    tokenizer = AutoTokenizer.from_pretrained(hf)
    assert pad_ids.pop() not in (tokenizer.eos_token_id, tokenizer.bos_token_id)
    assert (tokenizer.truncation_side, tokenizer.model_max_length, tokenizer.padding_side) == ("left", 128, "right")
    assert tokenizer.chat_template
    assert json.load(open(os.path.join(out, STATS_NAME)))["all"]["mean"] == mean


@pytest.mark.numerics
@pytest.mark.parametrize("layout", LAYOUTS)
def test_transformers_on_the_template_text_scores_as_rw_eval(layout, outputs):
    """The plain transformers way (what TRL's GRPO and verl do): the export's template, tokenised without
    special tokens, the classifier's logit."""
    hf = os.path.join(outputs[layout], "hf")
    tokenizer = AutoTokenizer.from_pretrained(hf)
    classifier = AutoModelForSequenceClassification.from_pretrained(hf).eval()
    prompts, answers = conversations()
    texts = [tokenizer.apply_chat_template(p + a, tokenize=False) for p, a in zip(prompts, answers, strict=True)]
    batch = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        close(classifier(**batch).logits[:, 0], ours(outputs[layout], prompts, answers))
    if layout == "opt":  # the same conversation written as DeepSpeed-Chat text reads the same
        close(ours(outputs[layout], [text_prompt(q) for q in QUESTIONS] * 2, [" " + a for a in CHOSEN + REJECTED]),
              ours(outputs[layout], prompts, answers))


@pytest.mark.numerics
def test_verl_legacy_worker_class_loads_llama_not_opt(outputs):
    """verl's legacy reward worker loads AutoModelForTokenClassification: a Llama export loads (its missing
    score.bias is zero) and its last-token logit is the reward; transformers has no such class for OPT."""
    hf = os.path.join(outputs["llama_chat"], "hf")
    model = AutoModelForTokenClassification.from_pretrained(hf, num_labels=1).eval()
    assert torch.count_nonzero(model.score.bias) == 0
    tokenizer = AutoTokenizer.from_pretrained(hf)
    prompts, answers = conversations()
    for prompt, answer, expected in zip(prompts, answers, ours(outputs["llama_chat"], prompts, answers), strict=True):
        ids = tokenizer(tokenizer.apply_chat_template(prompt + answer, tokenize=False), add_special_tokens=False,
                        return_tensors="pt")
        with torch.no_grad():
            close([model(**ids).logits[0, -1, 0]], [expected])
    with pytest.raises(ValueError, match="TokenClassification"):
        AutoModelForTokenClassification.from_pretrained(os.path.join(outputs["opt"], "hf"))


# --------------------------------------------------------------------------------------------
# TRL
# --------------------------------------------------------------------------------------------


def grpo_trainer(out: str, model_dir: str, tmp_path, reward_funcs: list):
    """A real GRPOTrainer on a tiny policy (the model folder, its LM head random), CPU, fp32."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    policy = str(tmp_path / "policy")
    AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(policy)
    AutoTokenizer.from_pretrained(os.path.join(out, "hf")).save_pretrained(policy)
    args = GRPOConfig(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=4, max_steps=1, report_to=[], use_cpu=True, bf16=False,
                      save_strategy="no")
    data = Dataset.from_dict({"prompt": [conversation(q) for q in QUESTIONS[:2]]})
    return GRPOTrainer(model=policy, reward_funcs=reward_funcs, args=args, train_dataset=data)


@pytest.mark.numerics
@pytest.mark.parametrize("layout", LAYOUTS)
def test_trl_grpo_rewards_equal_rw_eval(layout, outputs, model_dirs, tmp_path):
    """GRPO's own reward computation (`_calculate_rewards`, shared by RLOO and online DPO), with the export
    as `reward_funcs=<path>` and with `RewardFunction`: conversational prompts through both, text prompts
    through the function."""
    pytest.importorskip("trl")
    out = outputs[layout]
    model_dir = model_dirs["opt"] if layout == "opt" else os.path.join(os.path.dirname(out), "tiny-llama_chat")
    trainer = grpo_trainer(out, model_dir, tmp_path, [os.path.join(out, "hf"), RewardFunction(out)])
    prompts, answers = conversations()
    inputs = [{"prompt": p} for p in prompts]
    rewards = trainer._calculate_rewards(inputs, prompts, answers, [[0]] * len(prompts))
    expected = ours(out, prompts, answers)
    close(rewards[:, 0], expected)
    close(rewards[:, 1], expected)
    if layout == "opt":  # text prompts: the function reads DeepSpeed-Chat's layout as training did
        text_prompts, text_answers = [text_prompt(q) for q in QUESTIONS] * 2, [" " + a for a in CHOSEN + REJECTED]
        trainer.reward_funcs, trainer.reward_processing_classes = [RewardFunction(out)], [None]
        trainer.reward_func_names = ["reward_model"]
        rewards = trainer._calculate_rewards([{"prompt": p} for p in text_prompts], text_prompts, text_answers,
                                             [[0]] * len(text_prompts))
        close(rewards[:, 0], ours(out, text_prompts, text_answers))


@pytest.mark.numerics
@pytest.mark.parametrize("layout", LAYOUTS)
def test_trl_ppo_get_reward_equals_rw_eval(layout, outputs):
    """PPO's get_reward on the policy's sequences: the prompt left-padded, the answer up to and including
    its stop token (here the end of our layout: ChatML's <|im_end|> eos, or the OPT layout's end text),
    then the policy's pad, which is the export's."""
    pytest.importorskip("trl")
    from trl.experimental.utils import get_reward

    out = outputs[layout]
    hf = os.path.join(out, "hf")
    tokenizer = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForSequenceClassification.from_pretrained(hf).eval()
    prompts, answers = conversations()
    full = [tokenizer(tokenizer.apply_chat_template(p + a, tokenize=False), add_special_tokens=False)["input_ids"]
            for p, a in zip(prompts, answers, strict=True)]
    context = [tokenizer(tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(map(len, context))
    responses = [ids[len(c):] for ids, c in zip(full, context, strict=True)]
    assert all(ids[:len(c)] == c for ids, c in zip(full, context, strict=True))
    pad = tokenizer.pad_token_id
    rows = [[pad] * (width - len(c)) + c + r + [pad] * (max(map(len, responses)) - len(r) + 1)
            for c, r in zip(context, responses, strict=True)]
    with torch.no_grad():
        _, rewards, _ = get_reward(model, torch.tensor(rows), pad, width)
    close(rewards[:, 0], ours(out, prompts, answers))


# --------------------------------------------------------------------------------------------
# OpenRLHF
# --------------------------------------------------------------------------------------------


@pytest.fixture
def openrlhf(monkeypatch):
    """OpenRLHF's model module, importable on the CPU (see the module docstring for the stubs)."""
    pytest.importorskip("aiohttp")
    monkeypatch.syspath_prepend(STUBS)
    model = pytest.importorskip("openrlhf.models.model")
    import openrlhf.utils.utils as openrlhf_utils

    monkeypatch.setattr(openrlhf_utils, "convert_to_torch_dtype", lambda dtype: torch.float32)
    return model


@pytest.mark.numerics
@pytest.mark.parametrize("layout", LAYOUTS)
def test_openrlhf_loader_with_normalize_reward(layout, outputs, openrlhf):
    """get_llm_for_sequence_regression loads the export (value head `score` from config.json) and, with
    normalize_reward, gives (reward - mean) / std with the held-out mean and std training measured.
    transformers 5 re-creates its mean/std buffers uninitialised when it loads (OpenRLHF 0.11.2 keeps them
    as non-persistent buffers), so they are set again from the config it read: the workaround the README
    gives."""
    out = outputs[layout]
    model = openrlhf.get_llm_for_sequence_regression(os.path.join(out, "hf"), "reward", normalize_reward=True,
                                                     attn_implementation="sdpa").eval()
    mean, std = reward_mean_std(out)
    assert (model.config.mean, model.config.std) == (mean, std)
    model.mean.fill_(model.config.mean)
    model.std.fill_(model.config.std)
    prompts, answers = conversations()
    scorer = load_scorer(out, device="cpu")
    sequences = scorer.encode_pairs(prompts, answers)
    width = max(map(len, sequences))
    ids = torch.tensor([list(s) + [scorer.tokenizer.pad_token_id] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    with torch.no_grad():
        rewards = model(ids, attention_mask=mask)
    expected = np.asarray(ours(out, prompts, answers))
    close(rewards, (expected - mean) / std)


@contextmanager
def serving(out: str, token: str | None = None, normalize: bool = False):
    server = make_server(load_scorer(out, batch_size=4, device="cpu"), "127.0.0.1", 0, token=token,
                         normalize=reward_mean_std(out) if normalize else None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        thread.join(timeout=10)


@pytest.mark.numerics
@pytest.mark.parametrize("layout", LAYOUTS)
def test_openrlhf_remote_reward_client_gets_rw_evals_rewards(layout, outputs, openrlhf):
    """OpenRLHF's own client (SingleTurnAgentExecutor) posts what its rollout decodes (the policy's
    prompt ids and generated ids, special tokens kept, ending with the policy's eos) to /get_reward,
    with the server's token in the URL; the rewards are rw_eval.py's, normalised when the server is."""
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    out = outputs[layout]
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(out, "hf"))
    prompts, answers = conversations()
    queries, texts = [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        action_ids = tokenizer(" " * (layout == "opt") + answer[0]["content"], add_special_tokens=False)["input_ids"]
        queries.append(tokenizer.decode(prompt_ids + action_ids + [tokenizer.eos_token_id], skip_special_tokens=False))
        texts.append(text)
    expected = np.asarray(ours(out, prompts, answers))
    mean, std = reward_mean_std(out)
    for normalize in (False, True):
        with serving(out, token="s3cret", normalize=normalize) as port:
            client = SingleTurnAgentExecutor(f"http://rm:s3cret@127.0.0.1:{port}/get_reward")
            replies = [asyncio.run(client._fetch_rewards_via_http([q], [t], [None]))[0]
                       for q, t in zip(queries, texts, strict=True)]
        got = [reply["rewards"][0] for reply in replies]
        close(got, (expected - mean) / std if normalize else expected)
        assert [reply["scores"] for reply in replies] == [reply["rewards"] for reply in replies]


# --------------------------------------------------------------------------------------------
# verl
# --------------------------------------------------------------------------------------------


@pytest.mark.numerics
@pytest.mark.parametrize("layout", LAYOUTS)
def test_verl_reward_loop_text_scores_as_rw_eval(layout, outputs):
    """verl's reward loop builds the reward model's text itself (`_preprocess_reward_inputs`: the policy's
    response decoded, its eos removed, the raw prompt + response through the reward tokenizer's template,
    a leading bos string removed) and its server tokenises that with the tokenizer's special tokens; the
    classifier's logit on those ids is rw_eval.py's reward."""
    pytest.importorskip("verl")
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
    from verl.protocol import DataProto

    out = outputs[layout]
    hf = os.path.join(out, "hf")
    tokenizer = AutoTokenizer.from_pretrained(hf)
    classifier = AutoModelForSequenceClassification.from_pretrained(hf).eval()
    worker = RewardLoopWorker.__new__(RewardLoopWorker)
    worker.input_tokenizer, worker.reward_model_tokenizer = tokenizer, copy.deepcopy(tokenizer)
    prompts, answers = conversations()
    got = []
    for prompt, answer in zip(prompts, answers, strict=True):
        response = tokenizer(answer[0]["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        raw_prompt = np.empty(1, dtype=object)
        raw_prompt[0] = prompt
        item = DataProto.from_dict(
            tensors={"responses": torch.tensor([response + [tokenizer.pad_token_id] * 3]),
                     "attention_mask": torch.tensor([[1] * len(response) + [0] * 3])},
            non_tensors={"raw_prompt": raw_prompt})[0]
        text = worker._preprocess_reward_inputs(item)
        ids = tokenizer(text, return_tensors="pt")  # the vLLM / SGLang server's own tokenisation
        with torch.no_grad():
            got.append(classifier(**ids).logits[0, 0])
    close(got, ours(out, prompts, answers))


@pytest.mark.numerics
@pytest.mark.parametrize("layout", LAYOUTS)
def test_verl_custom_reward_function_is_rw_eval(layout, outputs, tmp_path):
    """verl loads `compute_score` from training_scripts/verl/reward.yaml's path and calls it as its naive
    reward manager does: the response alone, the prompt from extra_info."""
    pytest.importorskip("verl")
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn

    out = outputs[layout]
    config = OmegaConf.load(REPO_ROOT / "training_scripts" / "verl" / "reward.yaml")
    config.reward.custom_reward_function.path = str(REPO_ROOT / config.reward.custom_reward_function.path)
    config.reward.custom_reward_function.reward_kwargs.model_path = out
    score = get_custom_reward_fn(config)
    prompts, answers = conversations()
    got = [score(data_source="test", solution_str=answer[0]["content"], ground_truth=None,
                 extra_info={"prompt": np.array(prompt, dtype=object), "index": i})
           for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True))]
    close(got, ours(out, prompts, answers))
    assert score.func.__name__ == compute_score.__name__ if hasattr(score, "func") else True
