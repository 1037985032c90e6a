"""Graph passes run on every built decoder, each with one job (onnx-ir pass manager).

The builder emits a straightforward graph; these passes clean it up and enforce the target's rules.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from edgepack.targets.profiles import Target
from onnx_ir.passes import common

from edgepack.errors import EdgepackError


class CheckTargetOpsPass(ir.passes.InPlacePass):
    """Refuse a graph with an op the target cannot run; names the op and the target."""

    def __init__(self, target: Target):
        super().__init__()
        self.target = target

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for node in model.graph.all_nodes():
            if (node.domain, node.op_type) not in self.target.allowed_ops:
                dom = node.domain or "ai.onnx"
                raise EdgepackError(
                    f"op {dom}::{node.op_type} (node {node.name}) is not supported on target {self.target.name}; "
                    "choose another target or a recipe that avoids it"
                )
        return ir.passes.PassResult(model, modified=False)


class DropUnusedOptionalOutputsPass(ir.passes.InPlacePass):
    """Leave optional outputs that nothing reads unnamed, so ONNX Runtime neither computes nor allocates them.

    SkipSimplifiedLayerNormalization's mean and inv_std_var (outputs 1 and 2) are training outputs; named, every
    fused norm wrote two extra tensors per step (mix-llama-14m: 48 per decode step). onnxruntime-genai's builder
    leaves them empty too. Runs after NameFixPass, which would name them again."""

    OPTIONAL = {("com.microsoft", "SkipSimplifiedLayerNormalization"): (1, 2)}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in model.graph.all_nodes():
            for index in self.OPTIONAL.get((node.domain, node.op_type), ()):
                value = node.outputs[index] if index < len(node.outputs) else None
                if value is not None and value.name and not value.uses() and not value.is_graph_output():
                    value.name = ""
                    modified = True
        return ir.passes.PassResult(model, modified=modified)


def target_passes(target: Target) -> ir.passes.PassManager:
    return ir.passes.PassManager(
        [
            common.DeduplicateInitializersPass(),  # repeated shape constants, identical weights
            common.CommonSubexpressionEliminationPass(),  # per-layer copies of the same slice/shape ops
            common.RemoveUnusedNodesPass(),
            common.TopologicalSortPass(),
            common.NameFixPass(),
            DropUnusedOptionalOutputsPass(),
            CheckTargetOpsPass(target),
        ]
    )


def merged_initializers(before: dict[str, ir.TensorProtocol], after: ir.Model) -> dict[str, str]:
    """{name that deduplication dropped: the kept initializer with the same dtype, shape and bytes}.

    DeduplicateInitializersPass stores identical weights once (a random model's all-ones norms, a fold's repeated
    tensors); a reader that looks weights up by their module's name (the torch backend) resolves through this."""
    kept = after.graph.initializers
    aliases = {}
    for name, tensor in before.items():
        if name in kept or name.startswith("const_"):
            continue
        data = tensor.numpy()
        for other in kept.values():
            candidate = other.const_value
            if (
                candidate is not None
                and candidate.dtype == tensor.dtype
                and tuple(candidate.shape) == tuple(tensor.shape)
                and np.array_equal(candidate.numpy(), data)
            ):
                aliases[name] = other.name
                break
    return aliases


def run_target_passes(model: ir.Model, target: Target) -> ir.Model:
    """Run the target's passes in place; ``model.meta["aliases"]`` maps merged initializer names to kept ones."""
    before = {n: v.const_value for n, v in model.graph.initializers.items() if v.const_value is not None}
    try:
        result = target_passes(target)(model).model
        result.meta["aliases"] = merged_initializers(before, result)
        return result
    except ir.passes.PassError as e:  # the pass manager wraps errors; surface ours as the one-line message
        cause = e
        while cause is not None and not isinstance(cause, EdgepackError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
