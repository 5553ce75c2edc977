"""The RL frameworks score our export as rw_eval.py does, through their own code (benchmarks/consumers.py
runs each: TRL's GRPO reward computation and PPO's get_reward, OpenRLHF's reward-model loader with
normalize_reward and its remote reward client against rw_eval.py's server, verl's reward-loop text,
legacy worker class and custom_reward_function loader), in float32, for DeepSpeed-Chat's layout (a tiny
OPT, no chat template; and the same with ODIN's quality and length heads, `--length_head`, whose reward
is the quality head alone), a tiny Llama with a ChatML template that writes the bos, and a tiny GPT-2 whose
bos is <|im_start|> (SmolLM2's tokenizer). A framework that is not installed skips with the reason (make
test installs them); the stubs the CPU needs are in benchmarks/consumers.py's docstring."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from conftest import REPO_ROOT, corpus, rounding_tolerance
from rlhf_reward.benchmarks.consumers import CONSUMERS, openrlhf_on_cpu, run_consumer, rw_eval_rewards, serving
from rlhf_reward.utils.model_files import END_OF_CONVERSATION_TOKEN, load_hf_tokenizer
from rlhf_reward.utils.tiny import save_tiny_model
from transformers import AutoConfig, AutoTokenizer

from step2_reward_model.integrations import RewardFunction
from step2_reward_model.model import QUALITY_AND_LENGTH, create_reward_model
from step2_reward_model.output import STATS_NAME, reward_mean_std, save_reward_model
from step2_reward_model.report import reward_statistics
from step2_reward_model.scoring import Scorer

CHATML = ("{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
QUESTIONS = ["What is 17 plus 25?", "Tell me about the sea.", "Hi!", "Why is the sky blue?", "Name a colour."]
CHOSEN = ["It is 42.", "The sea covers most of the planet and is salty.", "Hello, how can I help?",
          "Air scatters blue light more than red light.", "Red."]
REJECTED = ["It is 41.", "No.", "Go away.", "I do not know.", "The sea is a colour."]
LAYOUTS = ("opt", "opt_length_head", "llama_chat", "chatml_bos")


def conversation(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def text_prompt(question: str) -> str:
    return f"\n\nHuman: {question}\n\nAssistant:"


def save_chat_model(folder: str, family: str) -> None:
    """A tiny model whose tokenizer has ChatML turns and eos = <|im_end|> (as instruction-tuned models):
    a Llama whose template writes the bos token itself (and whose tokenizer adds it too), or a GPT-2
    whose bos is <|im_start|>, which only the template writes (SmolLM2's tokenizer)."""
    from transformers import AutoModel

    save_tiny_model(folder, corpus(), family=family, hidden=64, layers=2)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    if family == "llama":
        tokenizer.chat_template = CHATML
    else:
        tokenizer.bos_token = "<|im_start|>"
        tokenizer.chat_template = CHATML.replace("{{ bos_token }}", "")
    tokenizer.save_pretrained(folder)
    model = AutoModel.from_pretrained(folder)
    model.resize_token_embeddings(len(tokenizer))
    model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)


def save_with_stats(out: str, model_dir: str, length_head: bool = False) -> str:
    """A random-headed reward model (with `length_head`, ODIN's two heads) saved as training saves it, with
    held-out statistics measured on the test pairs (so hf/config.json carries a real mean and std)."""
    tokenizer = load_hf_tokenizer(model_dir)
    torch.manual_seed(0)
    model = create_reward_model(model_dir, tokenizer, attributes=QUALITY_AND_LENGTH if length_head else None).eval()
    torch.nn.init.normal_(model.v_head.weight, std=1.0)
    scorer = Scorer(model, tokenizer, 128, END_OF_CONVERSATION_TOKEN)
    prompts = [conversation(q) for q in QUESTIONS]
    chosen = scorer.score_ids(scorer.encode_pairs(prompts, [[assistant(a)] for a in CHOSEN]))
    rejected = scorer.score_ids(scorer.encode_pairs(prompts, [[assistant(a)] for a in REJECTED]))
    meta = {"base_model": model_dir, "end_of_conversation_token": END_OF_CONVERSATION_TOKEN, "max_seq_len": 128}
    save_reward_model(model, tokenizer, out, meta=meta,
                      stats=reward_statistics(chosen, rejected, "test pairs"))
    return out


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def outputs(model_dirs, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("consumers")
    outputs = {"opt": save_with_stats(str(root / "out_opt"), model_dirs["opt"]),
               "opt_length_head": save_with_stats(str(root / "out_odin"), model_dirs["opt"], length_head=True)}
    for layout, family in (("llama_chat", "llama"), ("chatml_bos", "gpt2")):
        save_chat_model(str(root / f"tiny-{layout}"), family)
        outputs[layout] = save_with_stats(str(root / f"out_{layout}"), str(root / f"tiny-{layout}"))
    return outputs


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
def test_a_length_head_model_serves_its_quality_head_alone(outputs):
    """rw_eval.py's reward of an ODIN model is its quality head r_Q (not r_Q + r_L), and so is DeepSpeed-Chat's
    step 3 (one-row `v_head` loaded strictly), in float64; hf/ has one label."""
    from test_handoff import step3_load

    from step2_reward_model.output import load_reward_model

    out = outputs["opt_length_head"]
    model = load_reward_model(out).double()
    assert model.attributes == QUALITY_AND_LENGTH and model.v_head.weight.shape[0] == 2
    scorer = Scorer(model, load_hf_tokenizer(out), 128, END_OF_CONVERSATION_TOKEN)
    ids = scorer.encode_pairs(*conversations()).sequences
    step3 = step3_load(out).double()
    with torch.no_grad():
        heads = torch.stack([model.forward_value(torch.as_tensor(row)[None])["end_attributes"][0] for row in ids])
        served = [step3.forward_value(torch.as_tensor(row)[None])["chosen_end_scores"].item() for row in ids]
    close(rw_eval_rewards(out, *conversations()), heads[:, 0])
    assert (heads[:, 1].abs() > 1e-3).all()  # a sum would differ from r_Q
    close(served, heads[:, 0])
    assert AutoConfig.from_pretrained(os.path.join(out, "hf")).num_labels == 1


@pytest.mark.numerics
def test_deepspeed_chat_text_and_the_same_conversation_read_the_same(outputs):
    """For a model without a chat template, a conversation reads exactly as DeepSpeed-Chat text."""
    prompts, answers = conversations()
    text_prompts, text_answers = [text_prompt(q) for q in QUESTIONS] * 2, [" " + a for a in CHOSEN + REJECTED]
    out = outputs["opt"]
    close(rw_eval_rewards(out, text_prompts, text_answers), rw_eval_rewards(out, prompts, answers))


# --------------------------------------------------------------------------------------------
# Each framework's own code path
# --------------------------------------------------------------------------------------------


@pytest.mark.numerics
@pytest.mark.parametrize("consumer", list(CONSUMERS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_framework_scores_as_rw_eval(consumer, layout, outputs):
    package, _ = CONSUMERS[consumer]
    pytest.importorskip(package, reason=f"{package} is not installed (make test installs it)")
    prompts, answers = conversations()
    rows = run_consumer(consumer, outputs[layout], prompts, answers, torch.float32)
    if consumer.startswith("verl legacy") and layout != "llama_chat":  # Llama, Qwen, Mistral: `score`, as ours
        assert rows[consumer] in ("no: transformers has no token classifier for model type opt",
                                  "no: its token classifier for gpt2 has no classifier.weight in the export: it "
                                  "would score with a random head")
        return
    for name, result in rows.items():
        assert not isinstance(result, str), f"{name}: {result}"
        got, expected = result
        close(got, expected)


@pytest.mark.numerics
def test_trl_reward_function_reads_text_prompts_in_deepspeed_chats_layout(outputs):
    """TRL passes text prompts and completions as they are: RewardFunction reads them as training read
    text examples (the tokenizer's leading tokens, prompt + answer, the end-of-conversation token)."""
    pytest.importorskip("trl")
    out = outputs["opt"]
    prompts, answers = [text_prompt(q) for q in QUESTIONS] * 2, [" " + a for a in CHOSEN + REJECTED]
    rewards = RewardFunction(out)(prompts=prompts, completions=answers, completion_ids=[[0]] * len(prompts))
    close(rewards, rw_eval_rewards(out, prompts, answers))
    close(rewards, rw_eval_rewards(out, *conversations()))


def test_the_server_refuses_openrlhf_requests_it_cannot_read(outputs):
    """/get_reward has /score's token and limits, and one-line errors for what is wrong."""
    import http.client

    with serving(outputs["opt"], token="s3cret") as port:
        def post(body: object, auth: str | None = "Bearer s3cret") -> tuple[int, dict]:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            headers = {"Content-Type": "application/json", **({"Authorization": auth} if auth else {})}
            connection.request("POST", "/get_reward", json.dumps(body), headers)
            response = connection.getresponse()
            return response.status, json.loads(response.read())

        assert post({"query": ["x"]}, auth=None)[0] == 401
        assert post({"query": ["x"]}, auth="Basic " + __import__("base64").b64encode(b"rm:wrong").decode())[0] == 401
        status, reply = post({"query": ["\n\nHuman: Hi\n\nAssistant: Hello."], "prompts": ["p"], "labels": [None]})
        assert status == 200 and reply["rewards"] == reply["scores"] and len(reply["rewards"]) == 1
        assert post({"query": "x"}) == (400, {"error": "query must be an array, not a string"})
        assert post({"query": []}) == (400, {"error": "query is empty"})
        assert post({"query": ["x"], "prompts": ["a", "b"]})[0] == 400
        assert post({"query": ["x"], "extra": 1})[1]["error"].startswith('unknown field "extra"')
        assert post({"query": [1]})[1]["error"] == "query[0] must be a string, not a number"
        assert post({"query": ["x"] * 257})[0] == 413


def doc_blocks(language: str) -> list[str]:
    text = (REPO_ROOT / "docs" / "consumers.md").read_text(encoding="utf-8")
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


@pytest.mark.numerics
def test_the_documented_python_runs_and_gives_rw_evals_rewards(outputs):
    trl_block, openrlhf_block = doc_blocks("python")
    out = outputs["llama_chat"]
    scope: dict = {}
    exec(trl_block.replace('"OUTPUT"', repr(out)), scope)
    prompts, answers = [conversation("What is 2 + 2?")], [[assistant("It is 4.")]]
    close(scope["rewards"], rw_eval_rewards(out, prompts, answers))
    pytest.importorskip("openrlhf")
    with openrlhf_on_cpu(torch.bfloat16):
        exec(openrlhf_block.replace('"OUTPUT/hf"', repr(os.path.join(out, "hf"))), scope)
    assert (scope["model"].mean.item(), scope["model"].std.item()) == pytest.approx(reward_mean_std(out), rel=1e-2)


def test_the_converter_keeps_the_statistics_in_the_export(outputs, tmp_path):
    """export.py rewrites a folder without --data_path: its reward_stats.json still reaches hf/config.json."""
    import shutil

    from step2_reward_model.export import main as export_main

    folder = str(tmp_path / "out")
    shutil.copytree(outputs["opt"], folder)
    shutil.rmtree(os.path.join(folder, "hf"))
    assert export_main([folder]) == 0
    config = json.load(open(os.path.join(folder, "hf", "config.json")))
    assert (config["mean"], config["std"]) == reward_mean_std(outputs["opt"])
