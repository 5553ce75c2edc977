"""Run by tests/test_packing.py on two ranks (as the deepspeed launcher starts them): one optimizer step of
ZeRO-3, with gradient checkpointing and two accumulated micro-batches of token-budget packed rows,
through SGD at learning rate 1, so each weight moves by exactly its gradient. Rank 0 saves the
weights before and after the step to the file named by the last argument."""

from __future__ import annotations

import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from rlhf_reward.utils.data.collate import PairCollator
from rlhf_reward.utils.runtime import join_process_group
from test_packing import END_TOKEN, budget_parts, packing_items, reward_model

WORLD_SIZE, ACCUMULATION, BUDGET = 2, 2, 70


def gathered(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {name: param.detach().clone() for name, param in model.named_parameters()}


def main(path: str) -> None:
    join_process_group()
    rank = dist.get_rank()
    model = reward_model("llama").float().train()
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": ACCUMULATION,
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                      config=config)
    engine.module.gradient_checkpointing_enable()
    collate = PairCollator(1, share_prompt=True, arrangement="fit")
    for micro_batch in budget_parts(packing_items(3, seed=11), WORLD_SIZE, ACCUMULATION, BUDGET):
        batch = collate(micro_batch[rank])
        engine.backward(END_TOKEN.loss(engine.module, engine(batch.inputs, batch.layout), batch).loss)
        engine.step()
    after = gathered(engine.module)
    if rank == 0:
        torch.save({"before": before, "after": after}, path)
    # Leave together, and without the interpreter's teardown: in about one run of ten a rank
    # aborted there ("terminate called without an active exception"), after its work was done,
    # with or without destroying the process group first.
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[-1])  # the launcher puts --local_rank first
