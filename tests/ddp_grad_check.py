"""Run by tests/test_distributed.py under torchrun: one training step's gradients under DDP against the
same step in one process. Rank 0 writes the largest differences as JSON to argv[1].

    torchrun --standalone --nproc_per_node=2 tests/ddp_grad_check.py out.json bpr|infonce|allaction [N0,N1]

With N0,N1 each rank holds only its own users (training on own cache shards): rank 0 the batch's first N0
users, rank 1 the next N1 (N0 may be 0: a rank without a user in the step), against one process's step on
all of them.
"""
import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import demo_data  # noqa: E402
import distributed  # noqa: E402
import train  # noqa: E402


def grads(model) -> dict:
    return {k: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone()
            for k, p in model.named_parameters() if p.grad is not None}


def main(out: str, loss: str, own: str = "") -> None:
    ctx, device = distributed.init("cpu")
    cfg = train.parse_args(["--item_embedding_dim", "16", "--category_embedding_dim", "8", "--width", "16",
                            "--hidden_dim", "8", "--depth", "1", "--heads", "2", "--head_dim", "8",
                            "--moe_experts", "4", "--moe_hidden", "16", "--n_min", "8", "--n_max", "24",
                            "--k_min", "2", "--k_max", "6", "--dropout", "0", "--loss", loss, "--tau", "0.5"])
    log = Path(out).with_suffix(".csv")
    if ctx.is_main:
        demo_data.write_log(log, n_users=40, n_days=6, seed=5)
    distributed.barrier(ctx)
    events, _ = data.read_events(str(log), progress=False)
    vocab = data.Vocab.fit(events)
    seqs = data.build_sequences(events, vocab)
    torch.manual_seed(0)
    model = train.build_model(cfg, vocab)
    single = copy.deepcopy(model)
    users = np.asarray(seqs.trainable)[:23]  # an odd batch: the shards differ in size

    net = distributed.wrap(model, ctx, device)
    if own:
        sizes = [int(n) for n in own.split(",")]
        users = users[:sum(sizes)]
        mine = users[sum(sizes[:ctx.rank]):sum(sizes[:ctx.rank + 1])]
        loss_ddp, value_ddp = train.batch_forward(net, seqs, mine, 5, cfg, device, ctx, sizes=sizes)
    else:
        loss_ddp, value_ddp = train.batch_forward(net, seqs, users, 5, cfg, device, ctx)
    loss_ddp.backward()
    got = grads(model)
    if ctx.is_main:
        loss_one, value_one = train.batch_forward(single, seqs, users, 5, cfg, device)
        loss_one.backward()
        want = grads(single)
        diff = {k: float((got[k] - want[k]).abs().max()) for k in want}
        scale = {k: float(want[k].abs().max()) for k in want}
        Path(out).write_text(json.dumps({"diff": diff, "scale": scale, "missing": sorted(set(want) - set(got)),
                                         "value": [value_ddp, value_one]}))
    # rank 1 waits while rank 0 computes the reference: tearing the group down under a busy peer aborted
    # rank 1 now and then ("terminate called without an active exception"). The DDP reducer goes first, while
    # the group it talks through still exists.
    del net, loss_ddp
    distributed.barrier(ctx)
    distributed.close(ctx)


if __name__ == "__main__":
    main(*sys.argv[1:4])
    # Even so, C++ destructors at interpreter exit (Gloo's threads) aborted a rank once in a while after the
    # check had finished and written its result; leave without them: the result is on disk, flushed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
