import json
import urllib.error
import warnings

import pytest
import torch
import torchvision

from robustpart.errors import ModelError, WeightsError
from robustpart.graph import trace
from robustpart.models import load_model

SMALL_TV = "squeezenet1_1"


def no_network(monkeypatch, tmp_path):
    """This machine has no internet; make sure a download attempt fails fast the same way anywhere."""
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "urlopen", refuse, raising=False)
    monkeypatch.setattr("urllib.request.urlopen", refuse)


def test_pretrained_weights_without_internet_say_where_to_put_the_file(monkeypatch, tmp_path):
    no_network(monkeypatch, tmp_path)
    with pytest.raises(WeightsError, match=r"cannot download .*copy the file to .*checkpoints/squeezenet1_1-.*\.pth"):
        load_model(SMALL_TV, "DEFAULT")
    with pytest.raises(WeightsError, match="not a weights name"):
        load_model(SMALL_TV, "IMAGENET9K_V7")


def test_local_state_dict_file_is_loaded(tmp_path):
    torch.manual_seed(123)
    source = torchvision.models.get_model(SMALL_TV, weights=None)
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    module, spec, origin = load_model(SMALL_TV, str(path))
    assert spec.shape == (3, 224, 224) and origin.weights == str(path)
    for (name, a), (_, b) in zip(source.state_dict().items(), module.state_dict().items()):
        assert torch.equal(a, b), name


def test_bad_weights_files_are_refused(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_model(SMALL_TV, str(tmp_path / "missing.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        load_model(SMALL_TV, str(garbage))
    wrong = tmp_path / "wrong.pt"
    torch.save(torchvision.models.alexnet().state_dict(), wrong)
    with pytest.raises(WeightsError, match="does not fit"):
        load_model(SMALL_TV, str(wrong))


def test_unknown_model_lists_what_exists():
    with pytest.raises(ModelError, match="unknown model 'vgg17'.*torchvision"):
        load_model("vgg17")


def spec_json(path, shape=(3, 32, 32)):
    path.write_text(json.dumps({"shape": list(shape), "mean": [0.5], "std": [0.25], "num_classes": 10}))


def test_pickled_module_with_spec_beside_it(tmp_path):
    model = torchvision.models.resnet18(num_classes=10).eval()
    torch.save(model, tmp_path / "net.pt")
    with pytest.raises(ModelError, match="without an input spec"):
        load_model(str(tmp_path / "net.pt"))
    spec_json(tmp_path / "net.json")
    module, spec, source = load_model(str(tmp_path / "net.pt"))
    assert spec.shape == (3, 32, 32) and spec.num_classes == 10 and source.kind == "file"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(module(x), model(x))


def test_torchscript_file_is_rebuilt_for_tracing(tmp_path):
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model), tmp_path / "net.ts")
    spec_json(tmp_path / "net.json")
    module, spec, _ = load_model(str(tmp_path / "net.ts"))
    assert not isinstance(module, torch.jit.ScriptModule)
    graph = trace(module, spec)
    assert len(graph.units) == len(trace(model, spec).units)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(module(x), model(x), atol=1e-6)


def test_unreadable_model_file(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"\x00\x01 definitely not a model")
    with pytest.raises(ModelError, match="cannot read model file"):
        load_model(str(path))
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "nothing.pt"))
    torch.save({"w": torch.zeros(1)}, tmp_path / "dict.pt")
    with pytest.raises(ModelError, match="not a model"):
        load_model(str(tmp_path / "dict.pt"))


def test_pretrained_weights_in_the_hub_cache_are_used_offline(monkeypatch, tmp_path):
    """The headline path: `compile vgg16` with the weights file already in torch's hub cache, no internet."""
    no_network(monkeypatch, tmp_path)
    weights = torchvision.models.get_model_weights(SMALL_TV).DEFAULT
    torch.manual_seed(7)
    saved = torchvision.models.get_model(SMALL_TV, weights=None).state_dict()
    cache = tmp_path / "torch-home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(saved, cache / weights.url.rsplit("/", 1)[1])
    module, spec, source = load_model(SMALL_TV, "DEFAULT")
    assert source.weights == "DEFAULT" and spec.num_classes == 1000 and spec.shape == (3, 224, 224)
    assert all(torch.equal(saved[k], v) for k, v in module.state_dict().items())


def test_number_of_classes_is_read_from_the_model_output(tmp_path):
    from robustpart.spec import InputSpec
    path = tmp_path / "net.pt"
    torch.save(torchvision.models.resnet18(num_classes=7).eval(), path)
    _, spec, _ = load_model(str(path), spec=InputSpec(shape=(3, 32, 32), mean=(0.5,), std=(0.25,), num_classes=None))
    assert spec.num_classes == 7
    with pytest.raises(ModelError, match=r"does not run on an input of shape \[1, 32, 32\]"):
        load_model(str(path), spec=InputSpec(shape=(1, 32, 32), mean=(0.5,), std=(0.25,), num_classes=None))
