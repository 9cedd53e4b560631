"""The model and data of examples/ddp/train.py, imported as a sibling (``from toy import ...``)."""
import torch


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)                       # the same start on every rank
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))


def batches(epoch: int, rank: int, steps: int = 8, batch: int = 32):
    """This rank's share of an epoch: a fixed regression problem, different samples per rank."""
    g = torch.Generator().manual_seed(1000 * epoch + rank)
    w = torch.linspace(-1, 1, 16)
    for _ in range(steps):
        x = torch.randn(batch, 16, generator=g)
        yield x, (x @ w).unsqueeze(1) + 0.01 * torch.randn(batch, 1, generator=g)
