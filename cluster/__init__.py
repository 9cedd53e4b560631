"""Orchestration of multi-node PyTorch DDP runs: local, SSH fan-out and SLURM backends."""
