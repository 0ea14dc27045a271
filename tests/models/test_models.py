"""Tests for raydefense.models: the Classifier contract for every registered model, the registry,
and weight loading (local files, URIs through a pyarrow filesystem, the pretrained-tag cache)."""
from __future__ import annotations

import copy
import math
import os
import urllib.error

import pyarrow.fs as pafs
import pytest
import torch
import torch.nn.functional as F

from raydefense.errors import ModelError
from raydefense.models import Classifier, create_model, list_models, resize_to_min_size
from raydefense.models import base as models_base
from raydefense.models.facenet import FACENET_URLS

NUM_CLASSES = 3



_CACHE: dict[str, Classifier] = {}


def get_model(name: str) -> Classifier:
    """One eval-mode instance per model name for the whole module (building costs ~0.1-0.4 s)."""
    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = create_model(name, num_classes=NUM_CLASSES).eval()
    return _CACHE[name]


def images(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=gen)


# ------------------------------------------------------------------ contract, for every model
@pytest.mark.parametrize("name", list_models())
class TestClassifierContract:
    def test_shapes_and_attributes(self, name):
        model = get_model(name)
        assert isinstance(model, Classifier)
        assert model.name == name and model.num_classes == NUM_CLASSES
        x = images(model.min_size)
        with torch.no_grad():
            logits, feats = model.forward_with_features(x)
        assert logits.shape == (2, NUM_CLASSES)
        assert feats.shape == (2, model.feature_dim)
        assert torch.isfinite(logits).all() and torch.isfinite(feats).all()

    def test_head_of_features_is_forward(self, name):
        model = get_model(name)
        x = images(64)
        with torch.no_grad():
            logits = model(x)
            assert torch.allclose(model.head(model.features(x)), logits, atol=1e-6)
            logits2, feats2 = model.forward_with_features(x)
            assert torch.allclose(logits2, logits, atol=1e-6)
            assert torch.allclose(feats2, model.features(x), atol=1e-6)
            assert torch.allclose(model.tap(x, layer=-2), feats2) and torch.allclose(model.tap(x, layer=-1), logits)

    def test_split_reproduces_wrapped_network(self, name):
        # trunk + head must be the wrapped architecture's own forward pass, not a different net;
        # and normalisation + resize happen in preprocess, inside the model.
        model = get_model(name)
        x = images(max(model.min_size, 32))
        with torch.no_grad():
            expected = model.net(model.normalize(x))
            assert torch.allclose(model(x), expected, atol=1e-5)

    def test_normalisation_inside(self, name):
        model = get_model(name)
        gray = torch.full((1, 3, model.min_size, model.min_size), 0.5)
        if name == "facenet":  # facenet-pytorch fixed standardisation (x*255 - 127.5) / 128
            expected = torch.zeros(3)
        elif name in ("inception_v3", "googlenet", "small_cnn"):  # (x - 0.5) / 0.5
            expected = torch.zeros(3)
        else:  # ImageNet statistics
            expected = (0.5 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
        out = model.preprocess(gray)
        assert torch.allclose(out[0, :, 0, 0], expected, atol=1e-6)
        ones = model.preprocess(torch.ones(1, 3, model.min_size, model.min_size))
        if name == "facenet":
            assert torch.allclose(ones, torch.full_like(ones, (255 - 127.5) / 128))

    def test_small_inputs_are_resized(self, name):
        model = get_model(name)
        small = images(model.min_size // 2 + 1)
        with torch.no_grad():
            out = model(small)
            up = F.interpolate(small, size=(model.min_size, model.min_size), mode="bilinear", align_corners=False)
            assert out.shape == (2, NUM_CLASSES)
            assert torch.allclose(out, model(up), atol=1e-5)

    def test_gradient_reaches_input(self, name):
        model = get_model(name)
        x = images(model.min_size).requires_grad_(True)
        model(x).logsumexp(dim=1).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        model.zero_grad(set_to_none=True)

    def test_bad_shape_rejected(self, name):
        model = get_model(name)
        with pytest.raises(ValueError, match=name):
            model(torch.rand(3, 32, 32))
        with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
            model(torch.rand(2, 1, 32, 32))

    def test_train_mode_forward(self, name):
        model = copy.deepcopy(get_model(name)).train()  # a copy: training updates BN statistics
        with torch.no_grad():
            logits, feats = model.forward_with_features(images(model.min_size, batch=2))
        assert logits.shape == (2, NUM_CLASSES) and feats.shape == (2, model.feature_dim)
        assert torch.isfinite(logits).all()


# ------------------------------------------------------------------ registry
def test_registry_lists_the_builtin_models():
    assert {"facenet", "inception_v3", "mobilenet_v2", "googlenet", "vgg16", "small_cnn"} <= set(list_models())
    assert list_models() == sorted(list_models())


def test_unknown_model_lists_known_names():
    with pytest.raises(ModelError, match="unknown model 'resnet9000'.*facenet.*small_cnn"):
        create_model("resnet9000", num_classes=2)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_num_classes(bad):
    with pytest.raises(ModelError, match="num_classes"):
        create_model("small_cnn", num_classes=bad)


def test_unknown_option_named():
    with pytest.raises(ModelError, match="'depth'.*small_cnn|small_cnn.*'depth'"):
        create_model("small_cnn", num_classes=2, depth=3)


def test_small_cnn_width_and_size():
    model = create_model("small_cnn", num_classes=10)
    n_params = sum(p.numel() for p in model.parameters())
    assert 80_000 < n_params < 120_000
    narrow = create_model("small_cnn", num_classes=10, width=8)
    assert narrow.feature_dim == 32 and narrow.features(images(16)).shape == (2, 32)
    with pytest.raises(ValueError, match="width"):
        create_model("small_cnn", num_classes=10, width=0)


def test_facenet_feature_dim_and_min_size():
    model = get_model("facenet")
    assert model.feature_dim == 1792 and model.min_size == 75
    # the pooled block8 output, before the 512-d embedding
    assert model.net.last_linear.in_features == model.feature_dim


# ------------------------------------------------------------------ helpers
def test_resize_to_min_size_keeps_aspect_and_identity():
    x = torch.rand(1, 3, 20, 40)
    y = resize_to_min_size(x, 30)
    assert y.shape[-2:] == (30, 60)
    assert resize_to_min_size(x, 20) is x


def test_normalize_follows_device_and_dtype():
    model = create_model("small_cnn", num_classes=2).double()
    assert model.normalize.mean.dtype == torch.float64
    assert "normalize.mean" not in model.state_dict()  # fixed by the architecture, not saved


def test_gradcheck_float64_small_cnn():
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=2, width=2).double().eval()
    x = torch.rand(1, 3, 5, 4, dtype=torch.float64, requires_grad=True)  # below min_size: the resize is included
    assert torch.autograd.gradcheck(lambda t: model(t), (x,), eps=1e-6, atol=1e-5, fast_mode=True)


# ------------------------------------------------------------------ weights
def _backbone_equal(a: Classifier, b: Classifier) -> bool:
    sa, sb = a.net.state_dict(), b.net.state_dict()
    keys = [k for k in sa if not k.startswith(a.head_prefixes)]
    return all(torch.equal(sa[k], sb[k]) for k in keys)


@pytest.fixture(scope="module")
def saved_weights(tmp_path_factory):
    """name -> path of ``get_model(name).state_dict()`` saved once (facenet's is ~90 MB)."""
    folder = tmp_path_factory.mktemp("weights")
    paths = {}

    def save(name: str):
        if name not in paths:
            paths[name] = folder / f"{name}.pt"
            torch.save(get_model(name).state_dict(), paths[name])
        return paths[name]

    return save


@pytest.mark.parametrize("name", ["small_cnn", "facenet"])
def test_state_dict_round_trip_with_other_head(name, saved_weights):
    source, path = get_model(name), saved_weights(name)
    x = images(source.min_size)

    same = create_model(name, num_classes=NUM_CLASSES, pretrained=str(path)).eval()
    with torch.no_grad():
        assert torch.allclose(same(x), source(x), atol=1e-6)
    del same

    torch.manual_seed(2)
    other = create_model(name, num_classes=2, pretrained=path).eval()
    assert other.num_classes == 2 and _backbone_equal(source, other)
    with torch.no_grad():
        assert torch.allclose(other.features(x), source.features(x), atol=1e-6)
        assert other(x).shape == (2, 2)


def test_raw_upstream_and_wrapped_keys_load(tmp_path):
    torch.manual_seed(3)
    source = create_model("small_cnn", num_classes=4)
    raw = tmp_path / "raw.pt"
    torch.save(source.net.state_dict(), raw)  # upstream layout: no "net." prefix
    ddp = tmp_path / "ddp.pt"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}, "step": 3}, ddp)
    for path in (raw, ddp):
        loaded = create_model("small_cnn", num_classes=4, pretrained=path)
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in source.state_dict().items())


def test_head_is_reinitialised_not_kept(tmp_path):
    torch.manual_seed(4)
    source = create_model("small_cnn", num_classes=4)
    sd = source.state_dict()
    sd["net.classifier.1.weight"] = torch.zeros(7, 128)  # a different-size head...
    sd["net.classifier.1.bias"] = torch.zeros(7)
    model = create_model("small_cnn", num_classes=4, pretrained=sd)
    assert model.net.classifier[1].weight.abs().sum() > 0  # ...is not loaded
    with torch.no_grad():
        model.net.classifier[1].weight.fill_(5.0)
    model.load_pretrained(sd)
    assert not (model.net.classifier[1].weight == 5.0).any()  # an old head is re-initialised, not kept


def test_mismatched_backbone_names_the_file(tmp_path):
    source = create_model("small_cnn", num_classes=3)
    sd = source.state_dict()
    sd["net.features.0.0.weight"] = torch.zeros(16, 3, 3, 3)
    bad = tmp_path / "bad_shape.pt"
    torch.save(sd, bad)
    with pytest.raises(ModelError, match=r"bad_shape\.pt.*shape mismatch.*features\.0\.0\.weight"):
        create_model("small_cnn", num_classes=3, pretrained=bad)

    sd = source.state_dict()
    del sd["net.features.1.1.running_mean"]
    sd["net.extra.weight"] = torch.zeros(1)
    missing = tmp_path / "missing_key.pt"
    torch.save(sd, missing)
    with pytest.raises(ModelError, match=r"missing_key\.pt.*missing keys.*running_mean.*unexpected keys.*extra"):
        create_model("small_cnn", num_classes=3, pretrained=missing)

    # a different width is a real mismatch, not a head swap
    with pytest.raises(ModelError, match="do not fit model 'small_cnn'"):
        create_model("small_cnn", num_classes=3, width=8, pretrained=source.state_dict())


def test_unreadable_or_absent_weights(tmp_path):
    with pytest.raises(ModelError, match="nowhere.pt.*neither a known tag"):
        create_model("small_cnn", num_classes=2, pretrained=str(tmp_path / "nowhere.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match="junk.pt"):
        create_model("small_cnn", num_classes=2, pretrained=junk)
    tensor_file = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(ModelError, match="tensor.pt.*not a state dict"):
        create_model("small_cnn", num_classes=2, pretrained=tensor_file)
    with pytest.raises(ModelError, match="must be a tag, path"):
        create_model("small_cnn", num_classes=2, pretrained=3)


def test_uri_through_given_pyarrow_filesystem(tmp_path):
    torch.manual_seed(5)
    source = create_model("small_cnn", num_classes=3)
    (tmp_path / "bucket" / "weights").mkdir(parents=True)
    torch.save(source.state_dict(), tmp_path / "bucket" / "weights" / "w.pt")
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    loaded = create_model("small_cnn", num_classes=3, pretrained="s3://bucket/weights/w.pt", filesystem=fs)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in source.state_dict().items())
    with pytest.raises(ModelError, match="not found: s3://bucket/weights/absent.pt"):
        create_model("small_cnn", num_classes=3, pretrained="s3://bucket/weights/absent.pt", filesystem=fs)


# ------------------------------------------------------------------ published-weights cache (offline)
@pytest.fixture()
def facenet_file(saved_weights):
    return saved_weights("facenet")


def test_facenet_tag_loads_from_cache_offline(tmp_path, monkeypatch, facenet_file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "checkpoints"
    cache.mkdir()
    os.symlink(facenet_file, cache / os.path.basename(FACENET_URLS["vggface2"]))

    def offline(url, timeout):
        raise AssertionError("must not download when the file is cached")

    monkeypatch.setattr(models_base, "_open_url", offline)
    model = create_model("facenet", num_classes=4, pretrained="vggface2")
    assert torch.equal(model.net.conv2d_1a.conv.weight, get_model("facenet").net.conv2d_1a.conv.weight)
    assert model.net.logits.out_features == 4


def test_facenet_tag_offline_and_uncached_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, timeout):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(models_base, "_open_url", offline)
    expected_path = os.path.join(str(tmp_path), "checkpoints", os.path.basename(FACENET_URLS["casia-webface"]))
    with pytest.raises(ModelError, match=r"'casia-webface'.*not in the local cache \(" + expected_path.replace(".", r"\.")):
        create_model("facenet", num_classes=4, pretrained="casia-webface")
    assert os.listdir(tmp_path / "checkpoints") == []  # no half-written file left behind


def test_download_path_fills_cache(tmp_path, monkeypatch, facenet_file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(FACENET_URLS, "vggface2", facenet_file.as_uri())  # a real urlopen, on a file:// URL
    model = create_model("facenet", num_classes=2, pretrained="vggface2")
    cached = tmp_path / "home" / "checkpoints" / facenet_file.name
    assert cached.is_file() and cached.stat().st_size == facenet_file.stat().st_size
    assert torch.equal(model.net.block8.conv2d.weight, get_model("facenet").net.block8.conv2d.weight)


def test_fetch_cached_checks_hash(tmp_path):
    src = tmp_path / "weights-deadbeef.pt"
    src.write_bytes(b"payload")
    with pytest.raises(ModelError, match="does not start with deadbeef"):
        models_base.fetch_cached(src.as_uri(), str(tmp_path / "cache"), check_hash=True)
    assert not (tmp_path / "cache" / src.name).exists()
    assert models_base.fetch_cached(src.as_uri(), str(tmp_path / "cache")) == str(tmp_path / "cache" / src.name)


def test_imagenet_tag_offline_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, timeout):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(models_base, "_open_url", offline)
    with pytest.raises(ModelError, match=r"'imagenet' for model 'mobilenet_v2'.*hub.*checkpoints"):
        create_model("mobilenet_v2", num_classes=3, pretrained="imagenet")


def test_s3_uri_through_moto_server(monkeypatch):
    """A real S3 endpoint (moto's server on loopback), resolved from AWS_ENDPOINT_URL as boto3 does."""
    import io
    import socket

    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        }.items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        client = boto3.client("s3")
        client.create_bucket(Bucket="weights-bucket")
        source = get_model("small_cnn")
        buf = io.BytesIO()
        torch.save(source.state_dict(), buf)
        client.put_object(Bucket="weights-bucket", Key="runs/a/small.pt", Body=buf.getvalue())
        loaded = create_model("small_cnn", num_classes=NUM_CLASSES, pretrained="s3://weights-bucket/runs/a/small.pt")
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in source.state_dict().items())
        with pytest.raises(ModelError, match="not found: s3://weights-bucket/runs/a/absent.pt"):
            create_model("small_cnn", num_classes=NUM_CLASSES, pretrained="s3://weights-bucket/runs/a/absent.pt")
    finally:
        server.stop()


def test_untrained_inception_v3_starts_near_chance_loss():
    """torchvision's std-0.1 init of the 2048 -> C classifier gave initial logits with std ~4
    and a cross-entropy of ~8 (ln 12 = 2.5); the surrogate then trained to 50% on the default
    preset. With PyTorch's default Linear init the first loss is near ln C."""
    torch.manual_seed(0)
    model = create_model("inception_v3", num_classes=12).train()
    with torch.no_grad():
        logits = model(torch.rand(8, 3, 80, 80))
    assert logits.std() < 1.5
    assert torch.nn.functional.cross_entropy(logits, torch.arange(8)) < math.log(12) + 1.0
