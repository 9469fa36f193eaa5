"""Batch norms folded into the convolutions before them, for passes that read a BatchNorm's output but never
its input (compensation's calibration passes: their fit points sit after the BN).

In eval mode a BatchNorm is a per-channel affine, so conv -> BN is one convolution with scaled weights and a
bias: the pass skips one read and one write of every such activation (a fifth of ResNet-50's forward time on
a CPU). The exporter folds the same way, so the folded pass is what the boards' shards compute.
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
FOLDED_PREFIX = "_robustpart_folded_"


def fold_batchnorms(module: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule computing what `module` computes in eval mode, with each BatchNorm that reads a
    convolution's output, and is its only reader, folded into a copy of that convolution. Every other
    submodule is `module`'s own object, so what is set on them later (the simulator's masks and affines)
    holds for both; `module` itself is not changed."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(module.graph, {}))
    folded = fx.GraphModule(module, graph)
    count = 0
    for node in list(graph.nodes):
        source = node.args[0] if node.op == "call_module" and node.args else None
        if not (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1):
            continue
        norm, conv = folded.get_submodule(node.target), folded.get_submodule(source.target)
        if not (isinstance(norm, _NORMS) and isinstance(conv, _CONVS) and len(node.args) == 1 and not node.kwargs
                and norm.track_running_stats and norm.running_mean is not None
                and not norm.training and not conv.training):
            continue
        name = f"{FOLDED_PREFIX}{count}"
        count += 1
        folded.add_submodule(name, fuse_conv_bn_eval(conv, norm))
        source.target = name
        node.replace_all_uses_with(source)
        graph.erase_node(node)
    folded.recompile()
    return folded
