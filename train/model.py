"""Build a classifier by name and wrap it for fast DDP training."""

from __future__ import annotations

import importlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .config import ConfigError


def build_model(name: str, num_classes: int, image_size: int) -> nn.Module:
    """A torchvision classification model by name (random init), or `package.module:factory`,
    called as factory(num_classes=...)."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError("model", f"cannot load factory {name!r}: {e}") from None
        return factory(num_classes=num_classes)
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise ConfigError("model", f"unknown torchvision classification model {name!r}; e.g. "
                          + ", ".join(n for n in known if n.startswith(("resnet", "vit_b")))
                          + " or package.module:factory")
    # ViTs fix their input size at construction; convnets take any size.
    extra = {"image_size": image_size} if name.startswith("vit_") else {}
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **extra)


def tiny_cnn(num_classes: int = 10) -> nn.Module:
    """A two-conv network for tests and smoke runs: `model=train.model:tiny_cnn`."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


def wrap(model: nn.Module, device: torch.device, *, distributed: bool, channels_last: bool,
         compile: bool, compile_mode: str, bucket_cap_mb: int) -> tuple[nn.Module, DDP | None]:
    """Move to device, wrap in DDP, then compile: (the module to train, the DDP wrapper or None).

    DDP goes inside torch.compile so that Dynamo's DDPOptimizer can split the graph at bucket
    boundaries and all-reduce overlaps the backward pass."""
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    ddp = None
    net: nn.Module = model
    if distributed:
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                  bucket_cap_mb=bucket_cap_mb,
                  # gradients live in the all-reduce buckets: no copy, less memory
                  gradient_as_bucket_view=True)
        net = ddp
    if compile:
        net = torch.compile(net, mode=None if compile_mode == "default" else compile_mode)
    return net, ddp


def build_optimizer(model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float,
                    device: torch.device) -> torch.optim.Optimizer:
    # Fused kernels update all parameters in a few launches; they exist for CUDA tensors.
    fused = {"fused": True} if device.type == "cuda" else {}
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, **fused)
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay, **fused)
