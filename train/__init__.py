"""train: the DDP trainer every rank runs, on every backend.

    python -m train [--config FILE.yaml|.json] [key=value ...]          # one process, world size 1
    torchrun --standalone --nproc-per-node 2 -m train data=synthetic-learnable
    srun --ntasks-per-node 4 python -m train ...   # MASTER_ADDR/MASTER_PORT set by the launcher

Modules: config (keys, stdlib only), dist (identity, init/cleanup), data, model, checkpoint,
metrics (files the cluster reads), loop (the training loop).
"""
