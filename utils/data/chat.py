"""Chat-message examples -> the text the reward model reads, through the model's own chat template.

Conversational data only means what the model was tuned on when it is laid out by that model's
template, so messages are rendered with the tokenizer's template (or one given by --chat_template),
where the tokenizer is known. A response's text is what the template adds after the prompt rendered
with its generation prompt: the prompt text stays one shared prefix for every response, as the
tokenisation of examples and the PPO step expect.

A tokenizer without a template (OPT, Llama-2 base, GPT-2: DeepSpeed-Chat's models) gets
`layout_template`: DeepSpeed-Chat's text layout written as a chat template. It renders a conversation
to exactly the text a text example is read as (the tokenizer's leading special tokens,
`\\n\\nHuman: ...\\n\\nAssistant: ...`, the end-of-conversation token and any trailing special tokens),
so conversational data trains such a model too, and a framework that applies the exported tokenizer's
template (TRL, verl) builds the token ids training saw.
"""

from __future__ import annotations

import json

from jinja2 import TemplateError
from rlhf_reward.utils.data.examples import Example
from rlhf_reward.utils.data.fields import Messages
from rlhf_reward.utils.errors import UserError, first_line
from rlhf_reward.utils.model_files import special_affixes


def _as_messages(value: str | Messages, role: str) -> Messages:
    return [{"role": role, "content": value}] if isinstance(value, str) else value


# The first line of `layout_template`'s text: how a template is known to be ours, not the model's.
LAYOUT_MARK = "{#- rlhf-reward: DeepSpeed-Chat text layout -#}"


def is_conversation(example: Example) -> bool:
    """Whether any part of the example is chat messages (rendered with a template) rather than text."""
    return not (isinstance(example["prompt"], str) and all(isinstance(r, str) for r in example["responses"]))


def own_template(tokenizer) -> str | None:
    """The tokenizer's chat template, unless it is none or the layout template this package wrote."""
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) and not template.startswith(LAYOUT_MARK) else None


# The first line of `scoring_template`'s wrapping of a model's own template.
TRIM_MARK = "{#- rlhf-reward: the model's template, ending at the last end-of-turn token -#}"


def scoring_template(tokenizer, chat_template: str | None, end_text: str) -> str:
    """The template a reward model reads conversations through, in training and in every export:
    `chat_template`, else the tokenizer's own, with whitespace after a finished conversation trimmed,
    else `layout_template`. Trimmed, a conversation ends at its end-of-turn token (ChatML's
    `<|im_end|>`, not the newline after it): the token a PPO policy's sequence ends with (its eos)
    is then the token a framework that renders the template scores too."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        return layout_template(tokenizer, end_text)
    if template.startswith((TRIM_MARK, LAYOUT_MARK)):
        return template
    return (f"{TRIM_MARK}{{% set rendered %}}{template}{{% endset %}}"
            "{{- rendered if add_generation_prompt else rendered.rstrip() -}}")


def layout_template(tokenizer, end_text: str) -> str:
    """DeepSpeed-Chat's text layout as a Jinja chat template, for a tokenizer that has none: a
    conversation ending with an assistant turn renders as the leading special tokens, each turn as
    `\\n\\nHuman: text` or `\\n\\nAssistant: text` (a system message as its bare text), then `end_text`
    and the trailing special tokens; the generation prompt is `\\n\\nAssistant:`. Tokenised without
    special tokens, that is the token ids of the same conversation written as a text example."""
    lead, trail = (tokenizer.decode(ids) if ids else "" for ids in special_affixes(tokenizer))
    quote = json.dumps  # a JSON string is a valid Jinja string literal
    return (f"{LAYOUT_MARK}{{{{- {quote(lead)} -}}}}"
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'user' -%}{{- '\\n\\nHuman: ' + message['content'] -}}"
            "{%- elif message['role'] == 'assistant' -%}{{- '\\n\\nAssistant: ' + message['content'] -}}"
            f"{{%- if loop.last -%}}{{{{- {quote(end_text + trail)} -}}}}{{%- endif -%}}"
            "{%- else -%}{{- message['content'] -}}{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- '\\n\\nAssistant:' -}}{%- endif -%}")


def template_ends(tokenizer, template: str) -> tuple[str, str]:
    """What `template` writes before a conversation and after its last assistant turn: for DeepSpeed-Chat's
    layout its leading special tokens, and the end-of-conversation token with the trailing ones; for a
    model's own template nothing before (a PPO step renders that part of the prompt itself) and its
    end-of-turn text (ChatML: `<|im_end|>`)."""
    marker = "rlhf-reward-answer"
    full = tokenizer.apply_chat_template([{"role": "user", "content": "?"}, {"role": "assistant", "content": marker}],
                                         tokenize=False, chat_template=template)
    lead = ""
    if template.startswith(LAYOUT_MARK):
        lead = tokenizer.decode(special_affixes(tokenizer)[0])
    return lead, full[full.rindex(marker) + len(marker):]


def render(tokenizer, example: Example, chat_template: str | None = None, end_text: str = "") -> Example:
    """A copy of `example` with its prompt and responses as text; text-only examples come back as they are.

    The template is `scoring_template`'s (`chat_template`, else the tokenizer's own, else DeepSpeed-Chat's
    layout with `end_text`). A text prompt beside message responses is one user message; a text response beside a
    message prompt is one assistant message."""
    prompt, responses = example["prompt"], example["responses"]
    if not is_conversation(example):
        return example
    source = example.get("source", "data")
    chat_template = scoring_template(tokenizer, chat_template, end_text)
    prompt_messages = _as_messages(prompt, "user")
    try:
        prompt_text = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True,
                                                    chat_template=chat_template)
        full_texts = [tokenizer.apply_chat_template(prompt_messages + _as_messages(response, "assistant"),
                                                    tokenize=False, chat_template=chat_template)
                      for response in responses]
    except TemplateError as err:
        raise UserError(f"{source}: the chat template fails on a conversation: {first_line(err)}") from None
    if not all(full.startswith(prompt_text) for full in full_texts):
        raise UserError(f"{source}: the chat template does not render the prompt (with its generation prompt) as "
                        "a prefix of prompt + response, so the response text cannot be cut out; use a template "
                        "that does (--chat_template FILE)")
    return {**example, "prompt": prompt_text, "responses": [full[len(prompt_text):] for full in full_texts]}


def load_chat_template(path: str) -> str:
    """The Jinja chat template in the file `path` (for --chat_template)."""
    try:
        with open(path, encoding="utf-8") as handle:
            template = handle.read()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--chat_template {path}: cannot be read ({first_line(err)})") from None
    if not template.strip():
        raise UserError(f"--chat_template {path}: the file is empty")
    return template
