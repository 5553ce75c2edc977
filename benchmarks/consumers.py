#!/usr/bin/env python
"""A saved reward model scored by each RL framework's own code, against rw_eval.py's rewards.

    python benchmarks/consumers.py --model_path OUTPUT [--data_path test.jsonl] [--pairs 20] [--dtypes fp32 bf16]

Each consumer below runs the framework's code path on conversations (prompt messages, then the
answer), in the dtype asked for, and returns its rewards beside what rw_eval.py gives for the same
conversations (normalised where the consumer normalises). The table prints, per consumer and dtype,
whether it loads, the largest difference and how many pairs it ranks as rw_eval.py does.
tests/test_consumers.py runs every consumer in float32 against a tiny OPT and a tiny ChatML Llama.

Where the CPU needs it: OpenRLHF imports flash_attn at load time (benchmarks/stubs/flash_attn stands
in: the names it imports, which raise if called) and accepts only bf16 or fp16 weights (its
`convert_to_torch_dtype` is made to return the dtype asked for); verl's reward-model server (vLLM or
SGLang) is the transformers classifier on the ids the server's tokenizer gives.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import importlib
import importlib.util
import json
import os
import sys
import tempfile
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch
from rlhf_reward.utils.files import REPO_ROOT

from step2_reward_model.integrations import RewardFunction
from step2_reward_model.output import HF_DIR, reward_mean_std
from step2_reward_model.scoring import load_scorer
from step2_reward_model.server import in_thread, make_server

FLASH_ATTN_STUB = ("flash_attn", "flash_attn.bert_padding", "flash_attn.utils", "flash_attn.utils.distributed")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
Rewards = tuple[np.ndarray, np.ndarray]  # (the consumer's, rw_eval.py's in the consumer's units)


class Unsupported(Exception):
    """The consumer cannot take this model or dtype (said in the table instead of a number)."""


def float32_only(dtype: torch.dtype) -> None:
    """A consumer that scores through this package's scorer runs in float32, whatever the framework's dtype."""
    if dtype != torch.float32:
        raise Unsupported("scores in float32 (this package's scorer), whatever the trainer's dtype")


def rw_eval_rewards(out: str, prompts: list, answers: list) -> np.ndarray:
    """rw_eval.py's rewards: its scorer, on the conversations as given (computed once per model and
    conversations)."""
    key = (out, json.dumps([prompts, answers]))
    if key not in _REFERENCE:
        scorer = load_scorer(out, device="cpu")
        _REFERENCE[key] = np.asarray(scorer.score_ids(scorer.encode_pairs(prompts, answers)))
    return _REFERENCE[key]


_REFERENCE: dict[tuple[str, str], np.ndarray] = {}


def _texts(tokenizer, prompts: list, answers: list) -> list[str]:
    """Whole conversations through the export's chat template, as TRL and verl render them."""
    return [tokenizer.apply_chat_template(p + a, tokenize=False) for p, a in zip(prompts, answers, strict=True)]


def transformers_classifier(out: str, prompts: list, answers: list, dtype: torch.dtype) -> Rewards:
    """AutoModelForSequenceClassification on the template's text, tokenised without special tokens."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    hf = os.path.join(out, HF_DIR)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForSequenceClassification.from_pretrained(hf, dtype=dtype).eval()
    batch = tokenizer(_texts(tokenizer, prompts, answers), padding=True, add_special_tokens=False,
                      return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits[:, 0].float().numpy(), rw_eval_rewards(out, prompts, answers)


def trl_grpo(out: str, prompts: list, answers: list, dtype: torch.dtype) -> dict[str, Rewards]:
    """TRL's GRPOTrainer._calculate_rewards (RLOO and online DPO share it) with both ways to pass the
    model: `reward_funcs="OUTPUT/hf"` and `reward_funcs=[RewardFunction("OUTPUT")]`."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    hf = os.path.join(out, HF_DIR)
    with tempfile.TemporaryDirectory() as policy:  # a stand-in policy: the backbone with a random LM head
        AutoModelForCausalLM.from_pretrained(hf).save_pretrained(policy)
        AutoTokenizer.from_pretrained(hf).save_pretrained(policy)
        args = GRPOConfig(output_dir=os.path.join(policy, "run"), per_device_train_batch_size=2, num_generations=2,
                          max_completion_length=4, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                          model_init_kwargs={"dtype": dtype})
        functions = [hf, RewardFunction(out)] if dtype == torch.float32 else [hf]  # the function: float32 only
        trainer = GRPOTrainer(model=policy, reward_funcs=functions, args=args,
                              train_dataset=Dataset.from_dict({"prompt": prompts[:2]}))
        rewards = trainer._calculate_rewards([{"prompt": p} for p in prompts], prompts, answers, [[0]] * len(prompts))
    expected = rw_eval_rewards(out, prompts, answers)
    names = ["trl grpo, reward_funcs=OUTPUT/hf", "trl grpo, RewardFunction(OUTPUT)"]
    return {name: (rewards[:, column].float().numpy(), expected) for column, name in enumerate(names[:len(functions)])}


def trl_ppo(out: str, prompts: list, answers: list, dtype: torch.dtype) -> Rewards:
    """TRL PPO's get_reward on the policy's sequences: the prompt left-padded with the pad id, the answer
    up to and including its stop token (the template's end of turn), then pad."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.utils import get_reward

    hf = os.path.join(out, HF_DIR)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForSequenceClassification.from_pretrained(hf, dtype=dtype).eval()
    whole = tokenizer(_texts(tokenizer, prompts, answers), add_special_tokens=False)["input_ids"]
    context = tokenizer([tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts],
                        add_special_tokens=False)["input_ids"]
    if any(ids[:len(c)] != c for ids, c in zip(whole, context, strict=True)):
        raise Unsupported("the prompt's tokens change when the answer follows")
    responses = [ids[len(c):] for ids, c in zip(whole, context, strict=True)]
    width, longest, pad = max(map(len, context)), max(map(len, responses)), tokenizer.pad_token_id
    rows = [[pad] * (width - len(c)) + c + r + [pad] * (longest - len(r) + 1)
            for c, r in zip(context, responses, strict=True)]
    with torch.no_grad():
        rewards = get_reward(model, torch.tensor(rows), pad, width)[1]
    return rewards.reshape(-1).float().numpy(), rw_eval_rewards(out, prompts, answers)


@contextmanager
def openrlhf_on_cpu(dtype: torch.dtype):
    """OpenRLHF's model module, importable on the CPU and loading in `dtype` (see the module docstring)."""
    if importlib.util.find_spec("flash_attn") is None:  # the stand-in, under the names OpenRLHF imports
        for name in FLASH_ATTN_STUB:
            sys.modules.setdefault(name, importlib.import_module(f"rlhf_reward.benchmarks.stubs.{name}"))
    import openrlhf.models.model as model
    import openrlhf.utils.utils as utils

    original = utils.convert_to_torch_dtype
    utils.convert_to_torch_dtype = lambda name: dtype
    try:
        yield model
    finally:
        utils.convert_to_torch_dtype = original


def openrlhf_loader(out: str, prompts: list, answers: list, dtype: torch.dtype) -> Rewards:
    """get_llm_for_sequence_regression with normalize_reward on training's ids, against (reward - mean) /
    std. transformers 5 leaves OpenRLHF's non-persistent mean/std buffers uninitialised when it loads, so
    they are set again from the config it read (the workaround docs/consumers.md gives)."""
    with openrlhf_on_cpu(dtype) as openrlhf:
        model = openrlhf.get_llm_for_sequence_regression(os.path.join(out, HF_DIR), "reward", normalize_reward=True,
                                                         attn_implementation="sdpa").eval()
    model.mean.fill_(model.config.mean)
    model.std.fill_(model.config.std)
    scorer = load_scorer(out, device="cpu")
    encoded = scorer.encode_pairs(prompts, answers)
    sequences = encoded.sequences
    width = max(map(len, sequences))
    ids = torch.tensor([list(s) + [scorer.tokenizer.pad_token_id] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    with torch.no_grad():
        rewards = model(ids, attention_mask=mask).float().numpy()
    mean, std = reward_mean_std(out)
    return rewards, (np.asarray(scorer.score_ids(encoded)) - mean) / std


@contextmanager
def serving(out: str, token: str | None = None, normalize: bool = False):
    """rw_eval.py --serve's server on a free local port, from a thread."""
    with in_thread(make_server(load_scorer(out, batch_size=4, device="cpu"), "127.0.0.1", 0, token=token,
                               normalize=reward_mean_std(out) if normalize else None)) as port:
        yield port


def openrlhf_queries(out: str, prompts: list, answers: list) -> tuple[list[str], list[str]]:
    """What OpenRLHF's rollout posts: the policy's prompt ids and generated ids (the answer, then its eos)
    decoded with special tokens kept, beside the prompt text."""
    from rlhf_reward.utils.data.chat import template_ends
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(out, HF_DIR))
    _, turn_end = template_ends(tokenizer, tokenizer.chat_template)
    queries, texts = [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        generated = tokenizer.apply_chat_template(prompt + answer, tokenize=False)[len(text):]
        action = tokenizer(generated[:len(generated) - len(turn_end)], add_special_tokens=False)["input_ids"]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + action + [tokenizer.eos_token_id]
        queries.append(tokenizer.decode(ids, skip_special_tokens=False))
        texts.append(text)
    return queries, texts


def openrlhf_remote(out: str, prompts: list, answers: list, dtype: torch.dtype, normalize: bool = True) -> Rewards:
    """OpenRLHF's own remote-reward client (SingleTurnAgentExecutor) posting each query to rw_eval.py's
    /get_reward, the token in the URL; the server scores in float32."""
    float32_only(dtype)
    with openrlhf_on_cpu(dtype):
        from openrlhf.utils.agent import SingleTurnAgentExecutor

    queries, texts = openrlhf_queries(out, prompts, answers)
    with serving(out, token="s3cret", normalize=normalize) as port:
        client = SingleTurnAgentExecutor(f"http://rm:s3cret@127.0.0.1:{port}/get_reward")
        replies = [asyncio.run(client._fetch_rewards_via_http([q], [t], [None]))[0]
                   for q, t in zip(queries, texts, strict=True)]
    if any(reply["scores"] != reply["rewards"] for reply in replies):
        raise AssertionError("the server's scores differ from its rewards")
    expected = rw_eval_rewards(out, prompts, answers)
    if normalize:
        mean, std = reward_mean_std(out)
        expected = (expected - mean) / std
    return np.asarray([reply["rewards"][0] for reply in replies]), expected


def verl_reward_loop(out: str, prompts: list, answers: list, dtype: torch.dtype) -> Rewards:
    """verl's reward loop: `RewardLoopWorker._preprocess_reward_inputs` builds the text from the raw prompt
    and the policy's decoded response (its eos removed), the reward model's server tokenises it with its
    special tokens and reads the classifier's last-token logit."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
    from verl.protocol import DataProto

    hf = os.path.join(out, HF_DIR)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForSequenceClassification.from_pretrained(hf, dtype=dtype).eval()
    worker = RewardLoopWorker.__new__(RewardLoopWorker)  # only the two tokenizers are read
    worker.input_tokenizer, worker.reward_model_tokenizer = tokenizer, copy.deepcopy(tokenizer)
    rewards = []
    for prompt, answer in zip(prompts, answers, strict=True):
        response = tokenizer(answer[-1]["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        raw_prompt = np.empty(1, dtype=object)
        raw_prompt[0] = prompt
        item = DataProto.from_dict(tensors={"responses": torch.tensor([response + [tokenizer.pad_token_id] * 2]),
                                            "attention_mask": torch.tensor([[1] * len(response) + [0] * 2])},
                                   non_tensors={"raw_prompt": raw_prompt})
        ids = tokenizer(asyncio.run(worker._preprocess_reward_inputs(item)), return_tensors="pt")
        with torch.no_grad():
            rewards.append(model(**ids).logits[0, 0].float().item())
    return np.asarray(rewards), rw_eval_rewards(out, prompts, answers)


def verl_legacy_worker(out: str, prompts: list, answers: list, dtype: torch.dtype) -> Rewards:
    """verl's legacy reward worker (up to 0.7): AutoModelForTokenClassification, the template's text
    tokenised without special tokens, the logit at the last attended token."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    hf = os.path.join(out, HF_DIR)
    try:
        model, info = AutoModelForTokenClassification.from_pretrained(hf, num_labels=1, dtype=dtype,
                                                                      output_loading_info=True)
    except ValueError:
        raise Unsupported(f"transformers has no token classifier for model type {model_type(hf)}") from None
    missing = [key for key in info["missing_keys"] if not key.endswith(".bias")]  # a zero bias is ours
    if missing:
        raise Unsupported(f"its token classifier for {model_type(hf)} has no {missing[0]} in the export: "
                          "it would score with a random head")
    tokenizer = AutoTokenizer.from_pretrained(hf)
    batch = tokenizer(_texts(tokenizer, prompts, answers), padding=True, add_special_tokens=False,
                      return_tensors="pt")
    last = batch["attention_mask"].sum(1) - 1
    with torch.no_grad():
        logits = model.eval()(**batch).logits[torch.arange(len(last)), last, 0]
    return logits.float().numpy(), rw_eval_rewards(out, prompts, answers)


def model_type(folder: str) -> str:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder).model_type


def verl_custom_function(out: str, prompts: list, answers: list, dtype: torch.dtype) -> Rewards:
    """verl's get_custom_reward_fn on training_scripts/verl/reward.yaml, called as its naive reward
    manager calls it (the response alone; the prompt in extra_info), scoring in float32."""
    float32_only(dtype)
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn

    config = OmegaConf.load(os.path.join(REPO_ROOT, "training_scripts", "verl", "reward.yaml"))
    config.reward.custom_reward_function.path = os.path.join(REPO_ROOT, config.reward.custom_reward_function.path)
    config.reward.custom_reward_function.reward_kwargs.model_path = out
    score = get_custom_reward_fn(config)
    got = [score(data_source="bench", solution_str=answer[-1]["content"], ground_truth=None,
                 extra_info={"prompt": np.array(prompt, dtype=object), "index": index})
           for index, (prompt, answer) in enumerate(zip(prompts, answers, strict=True))]
    return np.asarray(got), rw_eval_rewards(out, prompts, answers)


# name -> (the package it needs, what it calls); a function giving several rows returns a dict of them
CONSUMERS: dict[str, tuple[str, Callable]] = {
    "transformers AutoModelForSequenceClassification": ("transformers", transformers_classifier),
    "trl grpo": ("trl", trl_grpo),
    "trl ppo get_reward": ("trl", trl_ppo),
    "openrlhf get_llm_for_sequence_regression": ("openrlhf", openrlhf_loader),
    "openrlhf remote reward -> rw_eval.py --serve": ("openrlhf", openrlhf_remote),
    "verl reward loop": ("verl", verl_reward_loop),
    "verl legacy worker (TokenClassification)": ("transformers", verl_legacy_worker),
    "verl custom_reward_function": ("verl", verl_custom_function),
}


def run_consumer(name: str, out: str, prompts: list, answers: list, dtype: torch.dtype) -> dict[str, Rewards | str]:
    """The consumer's rows: rewards, or why it could not score."""
    package, call = CONSUMERS[name]
    try:
        result = call(out, prompts, answers, dtype)
    except Unsupported as err:
        return {name: f"no: {err}"}
    except ImportError as err:
        return {name: f"not installed ({package}: {err})"}
    return result if isinstance(result, dict) else {name: result}


def load_conversations(path: str | None, pairs: int) -> tuple[list, list, int]:
    """Prompts and answers (chosen first, then rejected) of the first `pairs` pairs of an HH-style
    JSONL(.gz) file, as chat messages; default: the HH-RLHF sample the real demo ships."""
    from rlhf_reward.utils.data.pair_files import as_chat, read_pairs

    path = path or os.path.join(REPO_ROOT, "training_scripts", "cpu", "data", "hh_rlhf_harmless_sample.jsonl.gz")
    rows = [as_chat(pair) for pair in read_pairs(path)[:pairs]]
    return [r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows], len(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_path", required=True, help="A step-2 OUTPUT folder (with hf/ and reward_stats.json).")
    p.add_argument("--data_path", default=None, help="HH-style pairs (JSONL); default: the real demo's sample.")
    p.add_argument("--pairs", type=int, default=20)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    args = p.parse_args()
    prompts, answers, count = load_conversations(args.data_path, args.pairs)
    spread = rw_eval_rewards(args.model_path, prompts, answers).std()
    print(f"{count} pairs, {model_type(os.path.join(args.model_path, HF_DIR))}; rewards against rw_eval.py's "
          f"(float32, std {spread:.3g} over these answers); 'ranked' counts the pairs whose order matches")
    print(f"{'consumer':58s} {'dtype':5s} {'max |diff|':>10s} {'ranked as rw_eval':>18s}")
    for name in CONSUMERS:
        for dtype in args.dtypes:
            for row, result in run_consumer(name, args.model_path, prompts, answers, DTYPES[dtype]).items():
                if isinstance(result, str):
                    print(f"{row:58s} {dtype:5s} {result}")
                    continue
                got, expected = result
                same = int(((got[:count] > got[count:]) == (expected[:count] > expected[count:])).sum())
                print(f"{row:58s} {dtype:5s} {np.abs(got - expected).max():10.2e} {same:>12d} / {count}")


if __name__ == "__main__":
    main()
