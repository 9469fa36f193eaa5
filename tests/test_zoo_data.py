"""The data module (Fashion-MNIST idx reader, bundled slice, normalisation) and the reference model zoo."""
from __future__ import annotations

import gzip

import numpy as np
import pytest

from robustpart import data
from robustpart.errors import DataError, ModelError, WeightsError
from robustpart.spec import InputSpec

torch = pytest.importorskip("torch")
zoo = pytest.importorskip("robustpart.zoo")


# ---------------------------------------------------------------- data

def _write_idx(path, array: np.ndarray, magic: int, compress: bool) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


def _fake_split(root, prefix: str, n: int, compress: bool = True):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    ext = ".gz" if compress else ""
    _write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", images, 2051, compress)
    _write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labels, 2049, compress)
    return images, labels


def test_load_fashion_mnist_missing_root_is_a_helpful_data_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        data.load_fashion_mnist("test", root=missing)
    message = str(info.value)
    assert str(missing) in message
    assert "apt-get install dataset-fashion-mnist" in message and "--data" in message
    assert "\n" not in message


def test_load_fashion_mnist_missing_file_names_the_file(tmp_path):
    _fake_split(tmp_path, "t10k", 5)
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        data.load_fashion_mnist("train", root=tmp_path)


def test_load_fashion_mnist_rejects_bad_magic_and_unknown_split(tmp_path):
    _fake_split(tmp_path, "t10k", 5)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + bytes(100)))
    with pytest.raises(DataError, match="magic"):
        data.load_fashion_mnist("test", root=tmp_path)
    with pytest.raises(DataError, match="'train' or 'test'"):
        data.load_fashion_mnist("validation", root=tmp_path)


@pytest.mark.parametrize("compress", [True, False])
def test_load_fashion_mnist_reads_gzipped_and_plain_idx(tmp_path, compress):
    images, labels = _fake_split(tmp_path, "t10k", 7, compress=compress)
    got_images, got_labels = data.load_fashion_mnist("test", root=str(tmp_path))
    assert got_images.dtype == np.uint8 and got_images.shape == (7, 28, 28)
    assert got_labels.dtype == np.int64 and got_labels.shape == (7,)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_bundled_eval_slice_is_the_first_2000_test_images():
    images, labels = data.bundled_eval_slice()
    assert images.shape == (2000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (2000,) and labels.dtype == np.int64
    assert set(np.unique(labels)) == set(range(10))
    if (data.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        test_images, test_labels = data.load_fashion_mnist("test")
        np.testing.assert_array_equal(images, test_images[:2000])
        np.testing.assert_array_equal(labels, test_labels[:2000])


def test_bundled_calibration_returns_n_images_and_refuses_too_many():
    calib = data.bundled_calibration(64)
    assert calib.shape == (64, 28, 28) and calib.dtype == np.uint8
    np.testing.assert_array_equal(calib, data.bundled_calibration(512)[:64])
    other = data.bundled_calibration(64, seed=3)
    assert other.shape == (64, 28, 28)
    np.testing.assert_array_equal(other, data.bundled_calibration(64, seed=3))
    with pytest.raises(DataError, match="512"):
        data.bundled_calibration(513)
    with pytest.raises(DataError):
        data.bundled_calibration(0)


def test_normalize_shape_dtype_and_values():
    spec = zoo.FMNIST_SPEC
    images = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)  # (1, 2, 2)
    small = InputSpec(shape=(1, 2, 2), mean=spec.mean, std=spec.std, num_classes=10)
    out = data.normalize(images, small)
    assert out.shape == (1, 1, 2, 2) and out.dtype == np.float32
    expected = (np.array([[0.0, 1.0], [0.2, 0.4]]) - 0.2860) / 0.3530
    np.testing.assert_allclose(out[0, 0], expected, rtol=1e-6, atol=1e-6)

    rgb = InputSpec(shape=(3, 2, 2), mean=(0.5, 0.0, 1.0), std=(0.5, 1.0, 2.0), num_classes=2)
    full = np.full((2, 3, 2, 2), 255, dtype=np.uint8)
    out = data.normalize(full, rgb)
    assert out.shape == (2, 3, 2, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0], 1.0)
    np.testing.assert_allclose(out[:, 1], 1.0)
    np.testing.assert_allclose(out[:, 2], 0.0)

    with pytest.raises(DataError, match="channels"):
        data.normalize(full, small)


def test_load_image_folder_errors_and_reads(tmp_path):
    from robustpart.evaldata import FolderStream
    from robustpart.spec import InputSpec
    spec = InputSpec(shape=(3, 8, 8), mean=(0.0,), std=(1.0,), num_classes=2)

    def read(root, limit=None):
        batches = list(FolderStream(root, transforms.ToTensor(), spec, limit, batch_size=8, workers=0))
        return np.concatenate([b[0].numpy() for b in batches]), np.concatenate([b[1].numpy() for b in batches])

    pytest.importorskip("PIL.Image")
    from torchvision import transforms
    with pytest.raises(DataError, match="does not exist"):
        read(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError):
        read(tmp_path / "empty")

    from PIL import Image
    root = tmp_path / "tree"
    for cls, value in (("cat", 10), ("dog", 200)):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(root / cls / f"{i}.png")
    images, labels = read(root, limit=3)
    assert images.shape == (3, 3, 8, 8) and images.dtype == np.float32
    assert labels.dtype == np.int64 and labels.tolist() == [0, 0, 1]
    np.testing.assert_allclose(images[2], 200 / 255, rtol=1e-6)


def test_eval_data_checks_shapes():
    ok = data.EvalData(images=np.zeros((2, 1, 28, 28), np.float32), labels=np.zeros(2, np.int64), source="x")
    assert len(ok) == 2
    with pytest.raises(DataError):
        data.EvalData(images=np.zeros((2, 28, 28), np.float32), labels=np.zeros(2, np.int64), source="x")
    with pytest.raises(DataError):
        data.EvalData(images=np.zeros((2, 1, 28, 28), np.float32), labels=np.zeros(3, np.int64), source="x")


# ---------------------------------------------------------------- zoo

EXPECTED_CLASSES = {
    "fmnist_vgg16_bn": "torchvision.models.vgg.VGG",
    "fmnist_resnet18": "torchvision.models.resnet.ResNet",
    "fmnist_alexnet": "torchvision.models.alexnet.AlexNet",
    "fmnist_mobilenet_v2": "torchvision.models.mobilenetv2.MobileNetV2",
    "fmnist_convnext": "torchvision.models.convnext.ConvNeXt",
}


def test_reference_names_and_spec():
    assert zoo.reference_names() == list(EXPECTED_CLASSES)
    assert zoo.FMNIST_SPEC.shape == (1, 28, 28) and zoo.FMNIST_SPEC.num_classes == 10
    assert len(zoo.FMNIST_SPEC.labels) == 10


@pytest.mark.parametrize("name", list(EXPECTED_CLASSES))
def test_every_reference_model_builds_as_its_torchvision_class(name):
    import importlib

    module_name, cls_name = EXPECTED_CLASSES[name].rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), cls_name)
    torch.manual_seed(0)
    model = zoo.build(name)
    assert isinstance(model, cls)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) < 3_000_000


def test_resnet_uses_real_basic_blocks():
    from torchvision.models.resnet import BasicBlock

    model = zoo.build("fmnist_resnet18")
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 8
    assert [layer[0].conv1.out_channels for layer in (model.layer1, model.layer2, model.layer3, model.layer4)] \
        == [16, 32, 64, 128]


def test_unknown_model_names_the_available_ones():
    with pytest.raises(ModelError) as info:
        zoo.load_reference("fmnist_nope")
    assert "fmnist_vgg16_bn" in str(info.value) and "fmnist_convnext" in str(info.value)
    with pytest.raises(ModelError):
        zoo.build("resnet50")


def test_missing_checkpoint_says_how_to_train(monkeypatch, tmp_path):
    monkeypatch.setattr(zoo, "checkpoint_dir", lambda: tmp_path)
    with pytest.raises(WeightsError, match="python -m robustpart.zoo.train fmnist_alexnet"):
        zoo.load_reference("fmnist_alexnet")


@pytest.fixture(scope="module")
def eval_slice():
    images, labels = data.bundled_eval_slice()
    return torch.from_numpy(data.normalize(images, zoo.FMNIST_SPEC)), labels


@pytest.mark.parametrize("name", list(EXPECTED_CLASSES))
def test_reference_checkpoint_is_accurate_on_the_bundled_slice(name, eval_slice):
    images, labels = eval_slice
    model = zoo.load_reference(name)
    assert not model.training and not any(m.training for m in model.modules())
    with torch.no_grad():
        predictions = torch.cat([model(images[i:i + 500]).argmax(1) for i in range(0, len(images), 500)])
    accuracy = float((predictions.numpy() == labels).mean())
    assert accuracy >= 0.88, f"{name}: {accuracy:.4f} on the 2000-image slice"
    record = zoo.training_record(name)
    assert record["latest"]["test_images"] == 10000
