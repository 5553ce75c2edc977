"""Chat-message examples -> the text the reward model reads, through the model's own chat template.

Conversational data only means what the model was tuned on when it is laid out by that model's
template, so messages are rendered with the tokenizer's template (or one given by --chat_template),
where the tokenizer is known. A response's text is what the template adds after the prompt rendered
with its generation prompt: the prompt text stays one shared prefix for every response, as the
tokenisation of examples and the PPO step expect.
"""

from __future__ import annotations

from jinja2 import TemplateError

from utils.data.examples import Example
from utils.data.fields import Messages
from utils.errors import UserError, first_line


def _as_messages(value: str | Messages, role: str) -> Messages:
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def render(tokenizer, example: Example, chat_template: str | None = None) -> Example:
    """A copy of `example` with its prompt and responses as text; text-only examples come back as they are.

    A text prompt beside message responses is one user message; a text response beside a message
    prompt is one assistant message."""
    prompt, responses = example["prompt"], example["responses"]
    if isinstance(prompt, str) and all(isinstance(response, str) for response in responses):
        return example
    source = example.get("source", "data")
    if chat_template is None and not tokenizer.chat_template:
        raise UserError(f"{source}: conversational data needs a chat template: the tokenizer has none; "
                        "pass --chat_template FILE")
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
