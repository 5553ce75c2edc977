"""The documentation stays true to the code: docs/flags.md is what `flags.py` generates."""

from __future__ import annotations

from conftest import REPO_ROOT

from step2_reward_model import flags

REGENERATE = "python -m step2_reward_model.flags > docs/flags.md"


def test_the_flag_reference_is_up_to_date():
    written = (REPO_ROOT / "docs" / "flags.md").read_text(encoding="utf-8")
    assert written == flags.flag_reference(), f"docs/flags.md is out of date with flags.py: run `{REGENERATE}`"


def test_every_flag_is_in_a_group_of_the_reference():
    names = list(flags.FLAGS)
    assert names[0] in flags.GROUPS, "the first flag of FLAGS must start a group (flags.GROUPS)"
    assert set(flags.GROUPS) <= set(flags.FLAGS)
    assert set(flags.TRAINING_FLAGS) | set(flags.EVAL_FLAGS) <= set(flags.FLAGS)
    reference = flags.flag_reference()
    for name in set(flags.TRAINING_FLAGS) | set(flags.EVAL_FLAGS):
        assert f"`--{name}" in reference
