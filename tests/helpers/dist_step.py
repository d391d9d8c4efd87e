"""One training step on a fixed global batch of 8 per MLM condition, for tests/test_distributed.py.

Run alone (one process, the whole batch) or under ``torchrun --nproc_per_node N`` (each rank
takes its 8/N rows): ``python tests/helpers/dist_step.py OUT_FILE [MLM_CONDITION...]`` saves
``{condition: one_step(condition)}`` from rank 0. The MLM's equality is under test, so SimCLR
(the default, whose negatives are each rank's own) is off.
"""
import sys

import torch

from clipalign.train import TrainConfig, Trainer

GLOBAL_BATCH = 8


def one_step(mlm_condition: str = "none") -> dict:
    """This rank's step on its rows of the batch: ``{"world_size", "logs", "grads"}``."""
    cfg = TrainConfig(data="", out="", model="ca-nano", batch_size=GLOBAL_BATCH, precision="fp32", grad_clip=0.0,
                      mlm_weight=0.5, mlm_condition=mlm_condition, image_ssl="none", tensorboard=False)
    trainer = Trainer(cfg)
    env = trainer.env
    g = torch.Generator().manual_seed(1234)
    texts = trainer.tokenizer([f"caption number {i} of a {'red' if i % 2 else 'blue'} shape" for i in range(GLOBAL_BATCH)])
    masked, labels = trainer._masker(texts, generator=g)
    batch = {"image": torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g), "text": texts,
             "masked_text": masked, "mlm_labels": labels}
    rows = slice(env.rank * GLOBAL_BATCH // env.world_size, (env.rank + 1) * GLOBAL_BATCH // env.world_size)
    logs = trainer.train_step({k: v[rows] for k, v in batch.items()})
    grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
    return {"world_size": env.world_size, "rank": env.rank, "logs": logs, "grads": grads}


def main(out_file: str, *conditions: str) -> None:
    steps = {condition: one_step(condition) for condition in conditions or ("none",)}
    if next(iter(steps.values()))["rank"] == 0:
        torch.save(steps, out_file)


if __name__ == "__main__":
    main(*sys.argv[1:])
