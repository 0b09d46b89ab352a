"""Spatial Group-wise Enhance (Li, Hu, Yang 2019).

For x of shape (B, C, H, W) split into G groups of K = C/G channels, per sample and group:

    m   = mean of x_g over the H*W positions                  (K,)
    c_i = <m, x_g,i>                                           (H*W,)
    n   = (c - mean(c)) / (unbiased_std(c) + 1e-5)
    y_g = x_g * sigmoid(gamma_g * n + beta_g)

gamma (`weight`, init 0) and beta (`bias`, init 1) have shape (1, G, 1, 1), so parameter names
and shapes equal the authors' release files (`layerX.Y.sge.weight`).

The paper's ablations are module arguments: `weight_init` / `bias_init` (the initial gamma /
beta of every group) and `normalize=False`, which drops the spatial normalisation (n = c: the
raw similarity goes into the affine step).

This module is the formula, step by step in eager torch ops (`sge_reference`: the documentation
and the test oracle), and the paper's defaults. The module with the parameters is
`attention.SpatialGroupEnhance`; the fast implementations sit behind one dispatch in sge_fast.py.
"""

from __future__ import annotations

import torch

from sge_repro.errors import UserError

SGE_EPS = 1e-5
DEFAULT_GROUPS = 64  # the paper's G; every other default of the SGE groups refers to this one
DEFAULT_WEIGHT_INIT = 0.0  # the paper's initial gamma: every block starts as a sigmoid(1)-scaled plain block
DEFAULT_BIAS_INIT = 1.0  # the paper's initial beta
DEFAULT_NORMALIZE = True  # the paper's spatial normalisation of the similarity
SGE_IMPLS = ("fast", "reference", "triton")


def sge_reference_gate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                       normalize: bool = DEFAULT_NORMALIZE) -> torch.Tensor:
    """The paper's spatial gate sigmoid(gamma * n + beta), shape (B, G, H, W), one step per line
    (eager, autograd); weight and bias have shape (1, G, 1, 1) like the module's parameters.
    normalize=False: n is the raw similarity c (the ablation without spatial normalisation)."""
    batch, channels, height, width = x.shape
    xg = x.reshape(batch * groups, channels // groups, height, width)
    pooled = xg.mean(dim=(2, 3), keepdim=True)
    similarity = (xg * pooled).sum(dim=1)  # (B*G, H, W)
    if not normalize:
        return torch.sigmoid(similarity.reshape(batch, groups, height, width) * weight + bias)
    flat = similarity.reshape(batch * groups, height * width)
    centered = flat - flat.mean(dim=1, keepdim=True)
    normalized = centered / (centered.std(dim=1, keepdim=True) + SGE_EPS)
    normalized = normalized.reshape(batch, groups, height, width)
    return torch.sigmoid(normalized * weight + bias)


def sge_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                  normalize: bool = DEFAULT_NORMALIZE) -> torch.Tensor:
    """The formula of the paper, one step per line (eager, autograd)."""
    batch, channels, height, width = x.shape
    gate = sge_reference_gate(x, weight, bias, groups, normalize)
    xg = x.reshape(batch * groups, channels // groups, height, width)
    out = xg * gate.reshape(batch * groups, 1, height, width)
    return out.reshape(batch, channels, height, width)


def check_spatial_size(x: torch.Tensor) -> None:
    """SGE normalises over the H*W positions with the unbiased std: one position gives 0/0 = NaN
    (in the authors' code too). Say so instead of training on NaN."""
    if x.shape[-1] * x.shape[-2] < 2:
        raise UserError(
            f"SGE input of {x.shape[-2]}x{x.shape[-1]} positions: the spatial std needs at least 2; "
            "expected larger input images (a ResNet's last stage is 1/32 of the input: use >= 64 px)"
        )
