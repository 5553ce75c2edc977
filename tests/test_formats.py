"""Input formats beyond text pairs: margins and scores, ranked lists, chat messages, pretokenized rows.

Every expected example is written out by hand. Rows go through the adapter for local files
(`columns`) and the cleaning step, and through files on disk where the file layer matters.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import needs_shared_data
from rlhf_reward.utils.data.adapters import columns
from rlhf_reward.utils.data.chat import LAYOUT_MARK, layout_template, load_chat_template, own_template, render
from rlhf_reward.utils.data.examples import Example, judge_rows, row_problem, summarise, tally
from rlhf_reward.utils.data.sources import RawSplits, load_source
from rlhf_reward.utils.data.tokenize import encode_examples, special_affixes
from rlhf_reward.utils.errors import UserError

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tagged(rows) -> list[tuple[str, object]]:
    return [(f"test.jsonl:line {i + 1}", row) for i, row in enumerate(rows)]


def clean(rows, bad_rows: str = "error") -> tuple[list[Example], Counter]:
    return tally(judge_rows(tagged(rows), row_problem(columns, "src"), bad_rows))


def summarised(raw: RawSplits) -> tuple[list[Example], str]:
    """The examples of the train split of `raw` and its summary line, as `utils.data.build.load_examples` logs it."""
    return summarise(raw, "train", raw.train, judge_rows(raw.train, row_problem(raw.adapter, raw.name)))


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def user_error(call, *args) -> str:
    with pytest.raises(UserError) as err:
        call(*args)
    assert "\n" not in str(err.value)
    return str(err.value)


# --------------------------------------------------------------------------------------------
# Pairs: ranks, margins, scores, ties
# --------------------------------------------------------------------------------------------


def test_pairs_get_ranks_0_1_and_the_pair_constructor_still_works():
    hh = {"chosen": "\n\nHuman: Q?\n\nAssistant: yes", "rejected": "\n\nHuman: Q?\n\nAssistant: no"}
    examples, dropped = clean([{"prompt": "Q?", "chosen": " yes", "rejected": " no"}, hh])
    assert not dropped
    assert examples == [{"prompt": "Q?", "responses": [" yes", " no"], "ranks": [0, 1], "source": "src"},
                        {"prompt": "\n\nHuman: Q?\n\nAssistant:", "responses": [" yes", " no"], "ranks": [0, 1],
                         "source": "src"}]
    assert Example(prompt="Q?", responses=[" yes", " no"], source="s") == {"prompt": "Q?",
                                                                          "responses": [" yes", " no"], "source": "s"}


def test_margin_and_score_margin_are_kept_only_when_given():
    rows = [{"prompt": "A?", "chosen": " a", "rejected": " b", "margin": 1.5},
            {"prompt": "B?", "chosen": " a", "rejected": " b", "margin": "0.25"},  # CSV gives text
            {"prompt": "C?", "chosen": " a", "rejected": " b", "score_chosen": 8, "score_rejected": 3.5},
            {"prompt": "D?", "chosen": " a", "rejected": " b", "margin": None, "score_chosen": 8,
             "score_rejected": None},
            {"prompt": "E?", "chosen": " a", "rejected": " b", "margin": 2, "score_chosen": 1, "score_rejected": 4,
             "tie": False}]
    examples, dropped = clean(rows)
    assert not dropped
    extras = [{key: ex[key] for key in ("margin", "score_margin") if key in ex} for ex in examples]
    assert extras == [{"margin": 1.5}, {"margin": 0.25}, {"score_margin": 4.5}, {},
                      {"margin": 2.0, "score_margin": -3.0}]
    assert all(isinstance(value, float) for extra in extras for value in extra.values())


def test_ties_and_bad_numbers_are_dropped_and_counted():
    rows = [{"prompt": "A?", "chosen": " a", "rejected": " b", "score_chosen": 7, "score_rejected": 7.0},
            {"prompt": "B?", "chosen": " a", "rejected": " b", "tie": True},
            {"chosen": "\n\nHuman: C?\n\nAssistant: a", "rejected": "\n\nHuman: C?\n\nAssistant: b", "tie": True},
            {"prompt": "D?", "chosen": " a", "rejected": " b", "margin": "big"},
            {"prompt": "E?", "chosen": " a", "rejected": " b", "margin": "nan"},
            {"prompt": "F?", "chosen": " a", "rejected": " b", "score_chosen": True, "score_rejected": 1},
            {"prompt": "G?", "chosen": " a", "rejected": " b", "tie": "yes"}]  # only a boolean true is a tie
    examples, dropped = clean(rows, "skip")
    assert [ex["prompt"] for ex in examples] == ["G?"]
    assert dropped == Counter({"tie (equal scores)": 3, "field 'margin' is not a finite number": 2,
                               "field 'score_chosen' is not a finite number": 1})
    assert user_error(clean, rows).startswith("test.jsonl, line 4: field 'margin' is not a finite number")


# --------------------------------------------------------------------------------------------
# Ranked lists
# --------------------------------------------------------------------------------------------


def test_ranked_outputs_are_ranked_best_first():
    examples, dropped = clean([{"prompt": "Q?", "ranked_outputs": [" best", " middle", " worst"]}])
    assert not dropped
    assert examples == [{"prompt": "Q?", "responses": [" best", " middle", " worst"], "ranks": [0, 1, 2],
                         "source": "src"}]


@pytest.mark.parametrize("responses, ranks, best_first, dense", [
    ([" a", " b", " c"], [0, 1, 2], [" a", " b", " c"], [0, 1, 2]),
    ([" c", " a", " b"], [2, 0, 1], [" a", " b", " c"], [0, 1, 2]),
    # Gaps and an offset are re-numbered; equal ranks keep their input order.
    ([" c", " a", " b", " d"], [5, 1, 3, 3], [" a", " b", " d", " c"], [0, 1, 1, 2]),
    ([" x", " y"], [-4, 10], [" x", " y"], [0, 1]),
    # Best-of-N where only the best is known.
    ([" w", " best", " v", " u"], [1, 0, 1, 1], [" best", " w", " v", " u"], [0, 1, 1, 1]),
    # Identical responses are fine when they are tied.
    ([" a", " same", " same "], [0, 1, 1], [" a", " same", " same "], [0, 1, 1]),
])
def test_responses_are_sorted_by_rank_and_renumbered(responses, ranks, best_first, dense):
    examples, dropped = clean([{"prompt": "Q?", "responses": responses, "ranks": ranks}])
    assert not dropped
    assert examples == [{"prompt": "Q?", "responses": best_first, "ranks": dense, "source": "src"}]


def test_ranked_rows_drop_reasons_are_counted():
    rows = [
        {"prompt": "Q?", "responses": [" a"], "ranks": [0]},
        {"prompt": "Q?", "ranked_outputs": [" a"]},
        {"prompt": "Q?", "responses": [" a", " b", " c"], "ranks": [2, 2, 2]},
        {"prompt": "Q?", "responses": [" a", " b", " c"], "ranks": [0, 1]},
        {"prompt": "Q?", "responses": [" a", " a ", " c"], "ranks": [0, 1, 2]},
        {"prompt": "Q?", "responses": [" a", "  ", " c"], "ranks": [0, 1, 2]},
        {"prompt": " ", "ranked_outputs": [" a", " b"]},
        {"prompt": "Q?", "responses": [" a", " b"], "ranks": [0, "1"]},
        {"prompt": "Q?", "responses": [" a", " b"], "ranks": [True, False]},
        {"prompt": "Q?", "responses": [" a", 3], "ranks": [0, 1]},
        {"prompt": "Q?", "ranked_outputs": " a b"},
        {"prompt": "Q?", "responses": [" a", " b"]},
        {"prompt": "Q?", "responses": [" a", " b"], "ranks": [1, 0]},
    ]
    examples, dropped = clean(rows, "skip")
    assert examples == [{"prompt": "Q?", "responses": [" b", " a"], "ranks": [0, 1], "source": "src"}]
    assert dropped == Counter({"fewer than 2 responses": 2, "all responses tied": 1,
                               "fields 'ranks' and 'responses' differ in length": 1,
                               "identical responses ranked differently": 1, "empty response": 1, "empty prompt": 1,
                               "an item of field 'ranks' is text": 1, "an item of field 'ranks' is a boolean": 1,
                               "an item of field 'responses' is a number": 1, "field 'ranked_outputs' is text": 1,
                               "missing field 'ranks'": 1})
    assert user_error(clean, rows).startswith("test.jsonl, line 4: fields 'ranks' and 'responses' differ in length")


# --------------------------------------------------------------------------------------------
# Chat messages
# --------------------------------------------------------------------------------------------


def test_chat_pairs_with_an_explicit_prompt():
    rows = [{"prompt": [user("Hi?")], "chosen": [assistant("Hello!")], "rejected": [assistant("Go away.")]},
            {"prompt": "Hi?", "chosen": [assistant("Hello!")], "rejected": [assistant("Go away.")]}]
    examples, dropped = clean(rows)
    assert not dropped
    assert [ex["prompt"] for ex in examples] == [[user("Hi?")], "Hi?"]
    assert all(ex["responses"] == [[assistant("Hello!")], [assistant("Go away.")]] for ex in examples)
    assert all(ex["ranks"] == [0, 1] for ex in examples)


@pytest.mark.parametrize("chosen, rejected, prompt", [
    ([user("Hi?"), assistant("Hello!")], [user("Hi?"), assistant("Go away.")], [user("Hi?")]),
    # A system message and an earlier exchange are shared too; the dialogues may differ in length.
    ([{"role": "system", "content": "Be kind."}, user("A?"), assistant("B."), user("C?"), assistant("D.")],
     [{"role": "system", "content": "Be kind."}, user("A?"), assistant("B."), user("C?"), assistant("E."),
      user("More?"), assistant("No.")],
     [{"role": "system", "content": "Be kind."}, user("A?"), assistant("B."), user("C?")]),
])
def test_chat_pairs_without_prompt_share_their_leading_messages(chosen, rejected, prompt):
    examples, dropped = clean([{"chosen": chosen, "rejected": rejected, "score_chosen": 2, "score_rejected": 1}])
    assert not dropped
    assert examples == [{"prompt": prompt, "responses": [chosen[len(prompt):], rejected[len(prompt):]],
                         "ranks": [0, 1], "score_margin": 1.0, "source": "src"}]


def test_chat_rows_drop_reasons_are_counted():
    hi = [user("Hi?"), assistant("Hello!")]
    rows = [
        {"chosen": [user("Hi?"), assistant("a")], "rejected": [user("Yo?"), assistant("b")]},  # nothing shared
        {"chosen": hi, "rejected": hi + [user("More?"), assistant("No.")]},  # chosen ends where it is shared
        {"chosen": hi, "rejected": list(hi)},
        {"chosen": [{"role": "user", "text": "Hi?"}], "rejected": [user("Hi?")]},  # no content
        {"chosen": [user("Hi?"), "Hello!"], "rejected": hi},
        {"prompt": [user("Hi?")], "chosen": [assistant("a")], "rejected": [{"role": "assistant", "content": 4}]},
        {"prompt": [user("Hi?")], "chosen": [assistant("a")], "rejected": "b"},  # text and chat responses mixed
        {"prompt": [user(" ")], "chosen": [assistant("a")], "rejected": [assistant("b")]},
        {"prompt": [], "chosen": [assistant("a")], "rejected": [assistant("b")]},
        {"prompt": [user("Hi?")], "chosen": [assistant("a")], "rejected": [assistant("\n")]},
        {"prompt": [user("Hi?")], "chosen": [], "rejected": [assistant("b")]},
        {"prompt": [user("Hi?")], "chosen": [assistant(" a")], "rejected": [assistant("a ")]},
        {"prompt": [user("Hi?")], "chosen": [user("a")], "rejected": [assistant("b")]},
        {"chosen": [user("Hi?"), assistant("a"), user("x")], "rejected": [user("Hi?"), assistant("a"), user("y")]},
        {"prompt": [user("Hi?")], "chosen": [assistant("a")], "rejected": [assistant("b")]},
    ]
    examples, dropped = clean(rows, "skip")
    assert [ex["responses"] for ex in examples] == [[[assistant("a")], [assistant("b")]]]
    assert dropped == Counter({"no shared leading messages in chosen/rejected": 1,
                               "no messages after the shared prompt in chosen or rejected": 2,
                               "field 'chosen' is malformed chat messages": 2,
                               "field 'rejected' is malformed chat messages": 1,
                               "fields 'chosen' and 'rejected' mix text and chat messages": 1, "empty prompt": 2,
                               "empty response": 2, "chosen identical to rejected": 1,
                               "response does not start with an assistant message": 2})
    assert user_error(clean, rows) == ("test.jsonl, line 4: field 'chosen' is malformed chat messages (need a list "
                                       "of {role, content} strings) (--bad_rows skip drops such rows and counts them)")


def test_oasst_layout_maps_roles_and_wraps_replies():
    row = {"message_tree_id": "t", "conversation": [{"role": "prompter", "text": "A?"},
                                                    {"role": "assistant", "text": "B."},
                                                    {"role": "prompter", "text": "C?"}],
           "ranked_responses": ["best", "second", "third"], "ranks": [0, 1, 2], "synthetic": [False] * 3}
    bad_role = {**row, "conversation": [{"role": "moderator", "text": "A?"}]}
    mismatch = {**row, "ranks": [0, 1]}
    examples, dropped = clean([row, bad_role, mismatch, {"ranked_responses": ["a", "b"]}], "skip")
    assert examples == [{"prompt": [user("A?"), assistant("B."), user("C?")],
                         "responses": [[assistant("best")], [assistant("second")], [assistant("third")]],
                         "ranks": [0, 1, 2], "source": "src"}]
    assert dropped == Counter({"an item of field 'conversation' is not a {role, text} message": 1,
                               "fields 'ranks' and 'ranked_responses' differ in length": 1,
                               "missing field 'conversation'": 1})


# --------------------------------------------------------------------------------------------
# Pretokenized pairs
# --------------------------------------------------------------------------------------------


def test_pretokenized_pairs_keep_ids_under_mask():
    rows = [{"input_ids_chosen": [5, 6, 7, 0, 0], "attention_mask_chosen": [1, 1, 1, 0, 0],
             "input_ids_rejected": [0, 5, 9], "attention_mask_rejected": [0, 1, 1], "margin": 0.5},
            {"input_ids_chosen": [1, 2], "input_ids_rejected": [1, 3]}]
    examples, dropped = clean(rows)
    assert not dropped
    assert examples == [{"prompt": "", "responses": ["", ""], "ranks": [0, 1], "token_ids": [[5, 6, 7], [5, 9]],
                         "margin": 0.5, "where": "test.jsonl:line 1", "source": "src"},
                        {"prompt": "", "responses": ["", ""], "ranks": [0, 1], "token_ids": [[1, 2], [1, 3]],
                         "where": "test.jsonl:line 2", "source": "src"}]


def test_pretokenized_drop_reasons_are_counted():
    rows = [{"input_ids_chosen": [1, "2"], "input_ids_rejected": [1, 3]},
            {"input_ids_chosen": [1, 2.0], "input_ids_rejected": [1, 3]},
            {"input_ids_chosen": "1 2", "input_ids_rejected": [1, 3]},
            {"input_ids_chosen": [1, 2], "attention_mask_chosen": [1], "input_ids_rejected": [1, 3]},
            {"input_ids_chosen": [1, 2], "attention_mask_chosen": [1, 2], "input_ids_rejected": [1, 3]},
            {"input_ids_chosen": [1, 2], "attention_mask_chosen": [0, 0], "input_ids_rejected": [1, 3]},
            {"input_ids_chosen": [], "input_ids_rejected": [1, 3]},
            {"input_ids_chosen": [1, 2, 0], "attention_mask_chosen": [1, 1, 0], "input_ids_rejected": [1, 2]},
            {"input_ids_chosen": [1, 2], "input_ids_rejected": [1, 3], "score_chosen": 1, "score_rejected": 1},
            {"input_ids_chosen": [1, 2]}]
    examples, dropped = clean(rows, "skip")
    assert not examples
    assert dropped == Counter({"an item of field 'input_ids_chosen' is text": 1,
                               "an item of field 'input_ids_chosen' is a decimal number": 1,
                               "field 'input_ids_chosen' is text": 1,
                               "field 'attention_mask_chosen' is not one 0/1 per input id": 2,
                               "empty token sequence": 2, "chosen identical to rejected": 1, "tie (equal scores)": 1,
                               "missing field 'input_ids_rejected'": 1})


# --------------------------------------------------------------------------------------------
# Files on disk, and the errors of a whole split
# --------------------------------------------------------------------------------------------

FILE_ROWS = {
    "ranked": ([{"prompt": "Q?", "responses": [" b", " a", " c"], "ranks": [1, 0, 1]}],
               {"prompt": "Q?", "responses": [" a", " b", " c"], "ranks": [0, 1, 1]}),
    "ranked_outputs": ([{"prompt": "Q?", "ranked_outputs": [" a", " b"]}],
                       {"prompt": "Q?", "responses": [" a", " b"], "ranks": [0, 1]}),
    "chat": ([{"chosen": [user("Q?"), assistant("a")], "rejected": [user("Q?"), assistant("b")], "margin": 1}],
             {"prompt": [user("Q?")], "responses": [[assistant("a")], [assistant("b")]], "ranks": [0, 1],
              "margin": 1.0}),
    "pretokenized": ([{"input_ids_chosen": [3, 4], "attention_mask_chosen": [1, 1], "input_ids_rejected": [3, 5],
                       "attention_mask_rejected": [1, 1]}],
                     {"prompt": "", "responses": ["", ""], "ranks": [0, 1], "token_ids": [[3, 4], [3, 5]]}),
}


@pytest.mark.parametrize("layout", sorted(FILE_ROWS))
def test_every_layout_loads_from_a_jsonl_file(tmp_path, layout):
    rows, expected = FILE_ROWS[layout]
    name = write_jsonl(tmp_path / f"{layout}.jsonl", rows)
    raw = load_source(name, str(tmp_path))
    examples, summary = summarised(raw)
    where = {"where": f"{name}:line 1"} if "token_ids" in expected else {}
    assert examples == [{**expected, **where, "source": name}]
    assert summary == f"{name} [train]: 1 rows -> 1 examples (dropped: none)"


def test_missing_columns_error_lists_the_accepted_layouts(tmp_path):
    name = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Why?", "responses": ["a", "b"]}])
    raw = load_source(name, str(tmp_path))
    message = user_error(summarised, raw)
    assert name in message and "question, responses" in message
    for layout in ("prompt/chosen/rejected", "prompt/responses/ranks", "prompt/ranked_outputs",
                   "conversation/ranked_responses", "input_ids_chosen/input_ids_rejected"):
        assert layout in message


def test_split_of_only_tied_lists_is_a_user_error(tmp_path):
    name = write_jsonl(tmp_path / "tied.jsonl", [{"prompt": "Q?", "responses": [" a", " b"], "ranks": [0, 0]}] * 2)
    raw = load_source(name, str(tmp_path))
    message = user_error(summarised, raw)
    assert name in message and "no usable pairs or ranked lists" in message and "2 all responses tied" in message


# --------------------------------------------------------------------------------------------
# Rendering chat examples with a chat template
# --------------------------------------------------------------------------------------------


def test_render_cuts_each_response_after_the_rendered_prompt(tokenizers):
    example = Example(prompt=[user("Hi?")], responses=[[assistant("Hello!")], [assistant("Bye."), user("?"),
                                                                               assistant("Bye!")]],
                      ranks=[0, 1], margin=2.0, source="chat.jsonl")
    rendered = render(tokenizers["gpt2"], example, TEMPLATE)
    assert rendered == {"prompt": "<|user|>Hi?\n<|assistant|>",
                        "responses": ["Hello!", "Bye.\n<|user|>?\n<|assistant|>Bye!"],  # trimmed at the end
                        "ranks": [0, 1], "margin": 2.0, "source": "chat.jsonl"}
    assert example["prompt"] == [user("Hi?")]  # a copy: the input is untouched


def test_render_wraps_text_next_to_messages_and_leaves_text_examples(tokenizers):
    tok = tokenizers["opt"]
    mixed = Example(prompt="Hi?", responses=[[assistant("a")], [assistant("b")]], ranks=[0, 1], source="s")
    assert render(tok, mixed, TEMPLATE)["prompt"] == "<|user|>Hi?\n<|assistant|>"
    text = Example(prompt="Hi?", responses=[" a", " b"], ranks=[0, 1], source="s")
    assert render(tok, text) is text  # no template needed for text


def test_render_uses_the_tokenizers_own_template(tokenizers, monkeypatch):
    tok = tokenizers["llama"]
    monkeypatch.setattr(tok, "chat_template", TEMPLATE)
    example = Example(prompt=[user("Hi?")], responses=[[assistant("a")], [assistant("b")]], ranks=[0, 1], source="s")
    assert render(tok, example)["responses"] == ["a", "b"]


def test_render_errors_are_one_line_user_errors(tokenizers):
    tok = tokenizers["gpt2"]
    example = Example(prompt=[user("Hi?")], responses=[[assistant("a")], [assistant("b")]], ranks=[0, 1],
                      source="chat.jsonl")
    no_prefix = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|gen|>{% endif %}"
    message = user_error(render, tok, example, no_prefix)
    assert "chat.jsonl" in message and "prefix" in message
    message = user_error(render, tok, example, "{{ raise_exception('roles must alternate') }}")
    assert "roles must alternate" in message


def test_a_tokenizer_without_a_template_renders_deepspeed_chats_text_layout(tokenizers):
    """Messages for a model without a chat template read exactly like the same conversation written as
    DeepSpeed-Chat text: the template text, tokenised without special tokens, gives the text example's ids."""
    end = "<|endoftext|>"
    for family in ("opt", "gpt2", "llama"):
        tok = tokenizers[family]
        conversation = Example(prompt=[user("What is 2 plus 2?")],
                               responses=[[assistant("It is 4.")], [assistant("Five.")]], ranks=[0, 1], source="s")
        rendered = render(tok, conversation, None, end)
        text = Example(prompt="\n\nHuman: What is 2 plus 2?\n\nAssistant:", responses=[" It is 4.", " Five."],
                       ranks=[0, 1], source="s")
        assert rendered["prompt"].endswith(text["prompt"]) and rendered["responses"][0].startswith(" It is 4." + end)
        template = layout_template(tok, end)
        assert own_template(tok) is None and template.startswith(LAYOUT_MARK)
        ours = encode_examples([conversation, text], tok, 64, end)
        assert ours[0][0] == [] and ours[1][0] == special_affixes(tok)[0]  # the template writes the lead itself
        assert [ours[0][0] + ours[0][1] + r for r in ours[0][2]] == [ours[1][0] + ours[1][1] + r for r in ours[1][2]]
        whole = tok.apply_chat_template(conversation["prompt"] + conversation["responses"][0], tokenize=False,
                                        chat_template=template)
        assert tok(whole, add_special_tokens=False)["input_ids"] == ours[0][0] + ours[0][1] + ours[0][2][0]


def test_prompt_and_response_are_tokenised_as_one_text(tokenizers):
    """A token that spans the end of the prompt text belongs to the response, so each sequence is the
    tokenisation of its whole text, as a framework tokenises prompt + completion."""
    tok = tokenizers["gpt2"]
    example = Example(prompt="Human: Hi! Assistant: ", responses=["Hello there.", "Go away."], ranks=[0, 1],
                      source="s")
    lead, prompt, responses = encode_examples([example], tok, 64, "<|endoftext|>")[0]
    alone = tok(example["prompt"], add_special_tokens=False)["input_ids"]
    assert prompt == alone[:-1]  # " " merges with the answer's first word
    for text, response in zip(example["responses"], responses, strict=True):
        assert lead + prompt + response == tok(example["prompt"] + text + "<|endoftext|>")["input_ids"]


def test_load_chat_template(tmp_path):
    path = tmp_path / "chat.jinja"
    path.write_text(TEMPLATE, encoding="utf-8")
    assert load_chat_template(str(path)) == TEMPLATE
    assert str(tmp_path / "missing.jinja") in user_error(load_chat_template, str(tmp_path / "missing.jinja"))
    (tmp_path / "empty.jinja").write_text("\n")
    assert "empty" in user_error(load_chat_template, str(tmp_path / "empty.jinja"))


# --------------------------------------------------------------------------------------------
# The real OpenAssistant ranked groups (beside the repository only)
# --------------------------------------------------------------------------------------------


def test_real_oasst_groups_become_ranked_chat_examples(tmp_path, tokenizers):
    path = needs_shared_data("oasst_ranked_groups.jsonl")
    raw = load_source(str(path), str(tmp_path))
    examples, summary = summarised(raw)
    assert len(raw.train) == 212
    assert len(examples) == 212, summary  # every group is usable
    for example, (_, row) in zip(examples, raw.train, strict=True):
        assert 2 <= len(example["responses"]) <= 9
        ranks = example["ranks"]
        assert ranks[0] == 0 and all(0 <= b - a <= 1 for a, b in zip(ranks, ranks[1:], strict=False))
        assert [m["role"] for m in example["prompt"]][-1] == "user"
        assert [response[0]["content"] for response in example["responses"]] == row["ranked_responses"]
        rendered = render(tokenizers["gpt2"], example, TEMPLATE)
        assert rendered["responses"] == [reply.rstrip() for reply in row["ranked_responses"]]


# --------------------------------------------------------------------------------------------
# From examples to what the loss sees: margins, response limits, source weights, pretokenized ids
# --------------------------------------------------------------------------------------------


def test_margin_source_picks_the_margin_the_loss_uses():
    from rlhf_reward.utils.data.build import apply_margin

    example = Example(prompt="p", responses=["a", "b"], ranks=[0, 1], margin=1.5, score_margin=3.0, source="s")
    assert apply_margin(example, "column")["margin"] == 1.5
    assert apply_margin(example, "scores")["margin"] == 3.0
    assert apply_margin(example, "none")["margin"] == 0.0
    assert apply_margin(Example(prompt="p", responses=["a", "b"], ranks=[0, 1], source="s"), "scores")["margin"] == 0.0


def test_limit_responses_keeps_best_worst_and_evenly_spaced():
    from rlhf_reward.utils.data.build import limit_responses

    example = Example(prompt="p", responses=list("abcdefg"), ranks=[0, 1, 2, 3, 3, 4, 5], source="s")
    limited = limit_responses(example, 3)
    assert limited["responses"] == ["a", "d", "g"] and limited["ranks"] == [0, 3, 5]
    assert limit_responses(example, 0) is example and limit_responses(example, 7) is example


def test_weigh_sources_resamples_to_shares_deterministically():
    from rlhf_reward.utils.data.build import weigh_sources

    small = [Example(prompt=f"s{i}", responses=["a", "b"], ranks=[0, 1], source="small") for i in range(10)]
    large = [Example(prompt=f"l{i}", responses=["a", "b"], ranks=[0, 1], source="large") for i in range(90)]
    picked, counts = weigh_sources([small, large], (0.5, 0.5), seed=3)
    assert counts == [50, 50] and len(picked) == 100
    assert sum(ex["source"] == "small" for ex in picked) == 50  # grown with replacement
    assert len({ex["prompt"] for ex in picked if ex["source"] == "large"}) == 50  # shrunk without
    assert weigh_sources([small, large], (0.5, 0.5), seed=3)[0] == picked
    assert weigh_sources([small, large], (0.0, 1.0), seed=3)[1] == [0, 100]


def test_pretokenized_examples_split_at_their_shared_prefix(tokenizers):
    from rlhf_reward.utils.data.tokenize import tokenize_examples

    example = Example(prompt="", responses=["", ""], ranks=[0, 1], token_ids=[[5, 6, 7, 8, 9], [5, 6, 7, 4]],
                      source="ids")
    tokenized = tokenize_examples([example], tokenizers["opt"], 16, "<|endoftext|>")
    assert tokenized.prompts[0].tolist() == [5, 6, 7]  # no specials, no end token added
    assert [r.tolist() for r in tokenized.responses[0]] == [[8, 9], [4]]
    short = tokenize_examples([example], tokenizers["opt"], 3, "<|endoftext|>")
    assert short.prompts[0].tolist() == [7] and short.truncated == 1  # the prompt loses its left
    prefix = Example(prompt="", responses=["", ""], ranks=[0, 1], token_ids=[[5, 6], [5, 6, 7]], source="ids")
    kept = tokenize_examples([prefix], tokenizers["opt"], 16, "<|endoftext|>")
    assert kept.prompts[0].tolist() == [5] and [r.tolist() for r in kept.responses[0]] == [[6], [6, 7]]


def test_an_over_long_answer_leaves_a_ranked_list_but_drops_a_pair(tokenizers):
    from rlhf_reward.utils.data.tokenize import tokenize_examples

    tokenizer, long = tokenizers["gpt2"], " word" * 60
    ranked = Example(prompt="Q:", responses=[" good", long, " bad"], ranks=[0, 1, 2], source="s")
    tied_rest = Example(prompt="Q:", responses=[long, " so-so", " bad"], ranks=[0, 1, 1], source="s")
    pair = Example(prompt="Q:", responses=[" good", long], ranks=[0, 1], source="s")
    tokenized = tokenize_examples([ranked, tied_rest, pair], tokenizer, 32, "<|endoftext|>")
    assert len(tokenized) == 1 and tokenized.too_long == 2 and tokenized.responses_dropped == 1
    assert tokenized.ranks[0].tolist() == [0, 2]
    assert [tokenizer.decode(r) for r in tokenized.responses[0]] == [" good<|endoftext|>", " bad<|endoftext|>"]
