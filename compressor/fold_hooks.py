"""Forward hooks on decoder blocks for depth folding: read a block's input/output, gate or skip its branch.

Everything here is a context manager that removes its hooks on exit, so the model is left as it was found.
A block's "residual contribution" is ``out - in`` of the whole decoder layer (attention + MLP branches).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from edgepack.errors import EdgepackError
from edgepack.families import family_of


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a registered family's ``*ForCausalLM`` (the family's ``layers``), or a clear error."""
    fam = family_of(model)
    layers = model.get_submodule(fam.layers)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise EdgepackError(f"{type(model).__name__} has no decoder blocks at {fam.layers}; nothing to fold")
    return layers


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder layer was called with (positional or keyword)."""
    return args[0] if args else kwargs["hidden_states"]


def block_output(output) -> torch.Tensor:
    """The hidden states a decoder layer returned (a tensor in transformers 5, a tuple before)."""
    return output[0] if isinstance(output, tuple) else output


def with_block_output(output, hidden: torch.Tensor):
    """``output`` with its hidden states replaced by ``hidden``, keeping the layer's return type."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def captured(
    layers: nn.ModuleList, which: list[int], inputs: bool = False
) -> Iterator[dict[int, torch.Tensor]]:
    """Record the output (or input) hidden states of blocks ``which`` on every forward: {block: (B, T, C)}."""
    seen: dict[int, torch.Tensor] = {}

    def make(i: int):
        def hook(module, args, kwargs, output):
            seen[i] = block_input(args, kwargs) if inputs else block_output(output)

        return hook

    handles = [layers[i].register_forward_hook(make(i), with_kwargs=True) for i in which]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@contextmanager
def gated(layers: nn.ModuleList, gate: Callable[[int], torch.Tensor]) -> Iterator[None]:
    """Run every block ``i`` as ``x + gate(i) * (F_i(x) - x)``: a scalar gate on its residual contribution."""

    def make(i: int):
        def hook(module, args, kwargs, output):
            x = block_input(args, kwargs)
            return with_block_output(output, x + gate(i) * (block_output(output) - x))

        return hook

    handles = [layer.register_forward_hook(make(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def skipped(layers: nn.ModuleList, i: int) -> Iterator[None]:
    """Run the model with block ``i`` bypassed (its output replaced by its input)."""

    def hook(module, args, kwargs, output):
        return with_block_output(output, block_input(args, kwargs))

    handle = layers[i].register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def trainable_only(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Freeze every parameter of ``model`` except ``params``; restore all ``requires_grad`` flags on exit."""
    before = {id(p): (p, p.requires_grad) for p in model.parameters()}
    keep = {id(p) for p in params}
    for p, _ in before.values():
        p.requires_grad_(id(p) in keep)
    try:
        yield
    finally:
        for p, flag in before.values():
            p.requires_grad_(flag)
