"""The names OpenRLHF imports from flash_attn.bert_padding; calling one is an error."""

from einops import rearrange  # noqa: F401  (flash_attn re-exports it here)


def _unavailable(*args, **kwargs):
    raise NotImplementedError("flash_attn is a test stand-in here: packed samples need the real package")


index_first_axis = pad_input = unpad_input = _unavailable
