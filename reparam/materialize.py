"""Turning a folded :class:`~reparam.kernel.Kernel` back into a standard torch module."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.nn.utils import skip_init

from .kernel import Kernel, regroup

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def to_module(k: Kernel, dtype: torch.dtype, device: torch.device | None = None,
              bias: bool = False) -> nn.Module:
    """``nn.Linear``, ``nn.ConvNd`` or ``nn.ConvTransposeNd`` computing ``k``, cast to ``dtype``.

    The module has a bias when ``bias`` is set (the region had one, e.g. from a BN, so a trained
    model's deploy form keeps its shape) or the folded bias is not all zero.
    """
    device = device if device is not None else k.weight.device
    has_bias = bias or k.has_bias
    make = partial(skip_init, device=device, dtype=dtype)  # no random init to overwrite
    if k.nd == 0:
        dense = regroup(k, 1)
        module = make(nn.Linear, k.in_channels, k.out_channels, bias=has_bias)
        weight = dense.weight
    elif k.transposed:
        module = make(_CONV_T[k.nd], k.in_channels, k.out_channels, k.kernel_size, k.stride,
                      k.padding, k.output_padding, k.groups, has_bias, k.dilation)
        weight = k.weight
    else:
        module = make(_CONV[k.nd], k.in_channels, k.out_channels, k.kernel_size, k.stride,
                      k.padding, k.dilation, k.groups, has_bias, k.padding_mode)
        weight = k.weight
    with torch.no_grad():
        module.weight.copy_(weight)  # copy_ casts float64 to the model's dtype
        if has_bias:
            module.bias.copy_(k.bias)
    return module.eval()
