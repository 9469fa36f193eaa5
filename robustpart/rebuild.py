"""The bundle's model again: load it as it was compiled and check it is the same one (by its hash)."""
from __future__ import annotations

from .bundle import Bundle
from .errors import BundleError
from .graph import ModelGraph
from .models import ModelSource, load_graph
from .spec import InputSpec


def graph_of_bundle(bundle: Bundle) -> ModelGraph:
    """Load the bundle's model again and check it is the one that was compiled."""
    source = ModelSource.from_json(bundle.model["source"])
    spec = InputSpec.from_json(bundle.model["identity"]["input_spec"])
    weights = None if source.weights == "default" else source.weights
    if weights is not None and (bundle.path / weights).is_file():     # weights the bundle carries (finetune)
        weights = str(bundle.path / weights)
    graph, _ = load_graph(source.name, weights, spec)
    if graph.source_hash != bundle.model["identity"]["source_hash"]:
        raise BundleError(f"the model {source.name} (weights {source.weights}) has changed since bundle "
                          f"{bundle.path} was compiled; compile it again")
    return graph
