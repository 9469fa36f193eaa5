"""Find the model a user names: a reference model, a torchvision classifier, or a saved file.

Returns the module, its input spec, and a `ModelSource` record that says how to load it again (the
bundle keeps it, so `evaluate BUNDLE` rebuilds exactly the compiled model and checks its hash).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .errors import ModelError, WeightsError
from .graph import ModelGraph, describe_rejection, trace
from .spec import IMAGENET_SPEC, InputSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    kind: str            # "reference", "torchvision" or "file"
    name: str            # reference/torchvision name, or the file path
    weights: str         # "default" (reference), a torchvision weights name, a state_dict path, or "none"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ModelSource":
        return cls(kind=data["kind"], name=data["name"], weights=data["weights"])

    @property
    def display_name(self) -> str:
        return Path(self.name).stem if self.kind == "file" else self.name


def torchvision_classifiers() -> list[str]:
    import torchvision.models as tvm
    return sorted(tvm.list_models(module=tvm))


def load_model(name: str, weights: str | None = None, spec: InputSpec | None = None
               ) -> tuple[nn.Module, InputSpec, ModelSource]:
    """Resolve `name` (see module doc). `spec` overrides or supplies the input spec (required for a
    model file unless a `<file>.json` spec sits beside it); a spec without `num_classes` gets it from the
    model's output, and a given one must match it."""
    given = spec is not None
    module, spec, source = _resolve(name, weights, spec)
    if spec.num_classes is None:
        spec = dataclasses.replace(spec, num_classes=_output_classes(module, spec, name))
    elif given or source.kind == "file":          # the user's count (an option, a JSON file) is checked
        _output_classes(module, spec, name, expected=spec.num_classes)
    return module, spec, source


def _output_classes(module: nn.Module, spec: InputSpec, name: str, expected: int | None = None) -> int:
    """The number of classes: the size of the model's (1, K) output on one input of the spec's shape.
    With `expected` (a --num-classes the user gave), a (1, K) output of another size is refused."""
    try:
        with torch.no_grad():
            out = run_naming_layer(module.eval(), torch.zeros((1,) + tuple(spec.shape)))
    except LayerRejected as exc:        # any layer may reject the shape
        raise ModelError(f"model '{name}' does not run on an input of shape {list(spec.shape)}: {exc}; check "
                         f"--input-shape") from exc
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] >= 1:
        if expected is not None and int(out.shape[1]) != expected:
            raise ModelError(f"--num-classes {expected} does not match model '{name}', which returns "
                             f"{int(out.shape[1])} outputs per image; give --num-classes {int(out.shape[1])} or leave "
                             f"it out (it is read from the model)")
        return int(out.shape[1])
    if expected is not None:
        return expected             # not (batch, classes) logits: the user's count stands
    shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    raise ModelError(f"model '{name}' returns {shape}, not (batch, classes) logits; give --num-classes")


class LayerRejected(Exception):
    """A layer raised while the model ran; the message names the layer, its type and its input shapes."""


def run_naming_layer(module: nn.Module, x: torch.Tensor):
    """`module(x)`; if it raises, a LayerRejected that says which layer rejected which input shape (the
    innermost module running when the error came) and the error's first line."""
    running: list[tuple[str, nn.Module, tuple]] = []

    def enter(qualname):
        def hook(mod, args):
            running.append((qualname, mod, args))
        return hook

    def leave(mod, args, out):
        if running:
            running.pop()

    handles = []
    try:
        for qualname, sub in module.named_modules():
            handles.append(sub.register_forward_pre_hook(enter(qualname)))
            handles.append(sub.register_forward_hook(leave))
        try:
            return module(x)
        except Exception as exc:
            where = None
            if running:
                qualname, layer, args = running[-1]
                where = (qualname, type(layer).__name__, [list(a.shape) for a in args if isinstance(a, torch.Tensor)])
            raise LayerRejected(describe_rejection(where, exc)) from exc
    finally:
        for h in handles:
            h.remove()


def _resolve(name: str, weights: str | None, spec: InputSpec | None
             ) -> tuple[nn.Module, InputSpec, ModelSource]:
    from . import zoo
    if name in zoo.reference_names():
        if weights not in (None, "default", "DEFAULT", "none"):
            module = zoo.build(name)
            _load_state_dict(module, Path(weights), name)
        else:
            module = _seeded(zoo.build, name) if weights == "none" else zoo.load_reference(name)
        source = ModelSource("reference", name, weights or "default")
        return module.eval(), spec or zoo.FMNIST_SPEC, source
    path = Path(name)
    if path.suffix or path.exists() or "/" in name:
        return _load_file(path, weights, spec)
    if name in torchvision_classifiers():
        return _load_torchvision(name, weights or "DEFAULT", spec)
    raise ModelError(f"unknown model '{name}': give a reference model ({', '.join(zoo.reference_names())}), "
                     f"a torchvision classification model (e.g. vgg16, resnet18; see "
                     f"torchvision.models.list_models()), or a path to a saved model")


def _seeded(build, *args, **kwargs) -> nn.Module:
    """Weights "none" means a random initialisation, made reproducible (seed 0) so that a bundle compiled
    from it can be evaluated later against the same model."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build(*args, **kwargs)


def _load_torchvision(name: str, weights: str, spec: InputSpec | None
                      ) -> tuple[nn.Module, InputSpec, ModelSource]:
    import torchvision.models as tvm
    source = ModelSource("torchvision", name, weights)
    if weights.lower() == "none":
        return _seeded(tvm.get_model, name, weights=None).eval(), spec or IMAGENET_SPEC, source
    if Path(weights).suffix or Path(weights).exists():
        module = tvm.get_model(name, weights=None)
        _load_state_dict(module, Path(weights), name)
        return module.eval(), spec or IMAGENET_SPEC, source
    enum = tvm.get_model_weights(name)
    try:
        w = enum.DEFAULT if weights.upper() == "DEFAULT" else enum[weights]
    except KeyError:
        raise WeightsError(f"'{weights}' is not a weights name of {name}; choose from "
                           f"{', '.join(['DEFAULT', *enum.__members__])}, a state_dict file, or none") from None
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
    try:
        module = tvm.get_model(name, weights=w)
    except Exception as exc:  # URLError, socket errors, HTTP errors...
        raise WeightsError(f"cannot download {name} weights {w} ({type(exc).__name__}: {exc}); with no "
                           f"internet, copy the file to {file} or pass --weights path/to/state_dict.pt") from exc
    return module.eval(), spec or _spec_of_weights(w), source


def weights_transforms(source: ModelSource):
    """The evaluation transform that ships with a torchvision weights enum (resize, crop, normalise), or
    None when the model has no such weights."""
    if source.kind != "torchvision" or source.weights.lower() == "none" or Path(source.weights).suffix:
        return None
    import torchvision.models as tvm
    enum = tvm.get_model_weights(source.name)
    w = enum.DEFAULT if source.weights.upper() == "DEFAULT" else enum[source.weights]
    return w.transforms()


def _spec_of_weights(w) -> InputSpec:
    t = w.transforms()
    crop = getattr(t, "crop_size", [224])
    size = crop[0] if isinstance(crop, (list, tuple)) else crop
    return InputSpec(shape=(3, int(size), int(size)), mean=tuple(t.mean), std=tuple(t.std),
                     num_classes=len(w.meta["categories"]))


def _load_state_dict(module: nn.Module, path: Path, name: str) -> None:
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; give an existing state_dict file, a "
                           f"torchvision weights name, or none")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read weights file {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise WeightsError(f"weights file {path} does not fit {name}: {first}") from exc


def _load_file(path: Path, weights: str | None, spec: InputSpec | None
               ) -> tuple[nn.Module, InputSpec, ModelSource]:
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            scripted = torch.jit.load(str(path), map_location="cpu")
        except Exception:  # not a TorchScript archive: try a pickled module
            scripted = None
    if scripted is not None:
        module = unscript(scripted)
    else:
        scripted = None
        try:
            module = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ModelError(f"cannot read model file {path}: {exc}; save the model with "
                             f"torch.save(model, path) or torch.jit.save(torch.jit.script(model), path)") from exc
    if not isinstance(module, nn.Module):
        raise ModelError(f"{path} holds a {type(module).__name__}, not a model; to use a state_dict, give the "
                         f"architecture's name and pass the file with --weights")
    if weights not in (None, "default", "none"):
        _load_state_dict(module, Path(weights), str(path))
    spec = spec or _spec_beside(path)
    if scripted is not None:
        _check_same_outputs(scripted, module, spec, path)
    return module.eval(), spec, ModelSource("file", str(path.resolve()), weights or "default")


def _check_same_outputs(scripted, module: nn.Module, spec: InputSpec, path: Path) -> None:
    """The rebuilt module must compute what the TorchScript archive computes."""
    x = torch.randn((2,) + tuple(spec.shape), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            same = torch.allclose(scripted.eval()(x), module.eval()(x), rtol=1e-4, atol=1e-5)
    except Exception as exc:
        raise ModelError(f"TorchScript model {path} could not be rebuilt as a Python module ({exc}); save it "
                         f"with torch.save(model, path) instead") from exc
    if not same:
        raise ModelError(f"TorchScript model {path} could not be rebuilt faithfully; save it with "
                         f"torch.save(model, path) instead")


def _spec_beside(path: Path) -> InputSpec:
    for candidate in (path.with_suffix(".json"), path.with_name(path.name + ".json")):
        if candidate.is_file():
            return InputSpec.load(candidate)
    raise ModelError(f"model file {path} comes without an input spec: give --input-shape C,H,W --mean M "
                     f"--std S --num-classes K, or write {path.with_suffix('.json')} with "
                     f'{{"shape": [1, 28, 28], "mean": [0.286], "std": [0.353], "num_classes": 10}}')


_MANGLE = re.compile(r"\.___torch_mangle_\d+")


def unscript(script_module) -> nn.Module:
    """Rebuild a plain nn.Module from a TorchScript module whose classes are importable (torchvision
    models and torch.nn layers are), so torch.fx can trace it."""
    qualified = _MANGLE.sub("", script_module._c._type().qualified_name()).removeprefix("__torch__.")
    module_path, _, class_name = qualified.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_path), class_name)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"TorchScript model uses class {qualified}, which cannot be imported here; install "
                         f"the package that defines it, or save the model with torch.save(model, path)") from exc
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for name, child in script_module.named_children():
        module.add_module(name, unscript(child))
    for name, p in script_module.named_parameters(recurse=False):
        module.register_parameter(name, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
    for name, b in script_module.named_buffers(recurse=False):
        module.register_buffer(name, b.detach().clone())
    constants = set(getattr(cls, "__constants__", ()))
    script_attrs = set(re.findall(r"self\.(\w+)", "\n".join(_method_code(script_module)))) | constants
    python_attrs = set(re.findall(r"self\.(\w+)", _python_source(cls)))
    for attr in script_attrs | python_attrs:
        if hasattr(module, attr):   # submodules, parameters, buffers, class and instance attributes
            continue
        if script_module._c.hasattr(attr):
            value = getattr(script_module, attr)
            setattr(module, attr, tuple(value) if isinstance(value, list) and attr in constants else value)
        else:
            setattr(module, attr, None)   # TorchScript drops attributes that are None (e.g. downsample)
    module.train(False)
    return module


def _python_source(cls: type) -> str:
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return ""


def _method_code(script_module) -> list[str]:
    out = []
    for method in script_module._c._method_names():
        try:
            out.append(script_module._c._get_method(method).code)
        except RuntimeError:
            pass
    return out


def load_graph(name: str, weights: str | None = None, spec: InputSpec | None = None) -> tuple[ModelGraph, ModelSource]:
    """Load model `name` (see `load_model`) and trace it."""
    module, spec, source = load_model(name, weights, spec)
    return trace(module, spec, source.display_name), source
