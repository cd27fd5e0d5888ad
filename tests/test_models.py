"""qsweep.models: the embedded digits ViT, checkpoint loading and build_model's rules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file

from qsweep.config import ConfigError, DigitsDataConfig, ModelConfig
from qsweep.data import build_data
from qsweep.data.bundle import DataBundle
from qsweep.models import CheckpointError, build_model, cache_dir, load_checkpoint, load_digits_vit
from qsweep.files import atomic_write
from qsweep.models.checkpoint import classifier_name, num_classes_of
from qsweep.models.digits_vit import cache_path, cached_metadata, train_digits_vit


def tiny_vit(num_classes: int = 10, seed: int = 0, in_chans: int = 3, img_size: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    m = timm.create_model("vit_tiny_patch16_224", img_size=img_size, patch_size=8, num_classes=num_classes,
                          in_chans=in_chans, pretrained=False)
    return m.eval()


def same_outputs(a: nn.Module, b: nn.Module, shape=(2, 3, 32, 32)) -> bool:
    x = torch.randn(*shape)
    with torch.no_grad():
        return torch.equal(a(x), b(x))


# ---------------------------------------------------------------------------- embedded digits ViT


def test_digits_vit_accuracy(digits_bundle, digits_vit):
    x, y = digits_bundle.test.tensors
    with torch.no_grad():
        acc = (digits_vit(x).argmax(1) == y).float().mean().item()
    assert acc >= 0.95
    assert not digits_vit.training


def test_digits_vit_widths_fit_group_sizes(digits_vit):
    linears = [m for m in digits_vit.modules() if isinstance(m, nn.Linear)]
    assert linears
    for m in linears:
        assert m.in_features % 64 == 0, m


def test_digits_vit_second_load_hits_cache(digits_bundle, digits_vit, qsweep_cache):
    path = cache_path(digits_bundle, qsweep_cache)
    assert path.is_file() and not [p for p in qsweep_cache.iterdir() if ".tmp" in p.name]
    meta = cached_metadata(digits_bundle, qsweep_cache)
    assert float(meta["test_acc"]) >= 0.95 and meta["data"] == digits_bundle.fingerprint
    again = load_digits_vit(digits_bundle, qsweep_cache, progress=False)
    assert again.qsweep_source == "cache" and not again.training  # loaded, not retrained (no timing: busy CPUs)
    ref = digits_vit.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in again.state_dict().items())


def test_digits_vit_cache_key_follows_data(digits_bundle, qsweep_cache):
    other = build_data(DigitsDataConfig(seed=1))
    assert cache_path(other, qsweep_cache) != cache_path(digits_bundle, qsweep_cache)
    assert cache_path(build_data(DigitsDataConfig()), qsweep_cache) == cache_path(digits_bundle, qsweep_cache)


def test_digits_vit_training_is_deterministic(digits_bundle):
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    a, info = train_digits_vit(digits_bundle, progress=False, epochs=1)
    b, _ = train_digits_vit(digits_bundle, progress=False, epochs=1)
    assert torch.equal(torch.get_rng_state(), state)  # caller's RNG untouched
    assert torch.get_num_threads() == threads  # training's thread setting is scoped
    sb = b.state_dict()
    assert all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())
    assert 0.0 <= float(info["test_acc"]) <= 1.0


def test_corrupt_cache_entry_is_retrained(tmp_path, digits_bundle, monkeypatch):
    import qsweep.models.digits_vit as dv

    calls = []
    real_train = dv.train_digits_vit

    def fake_train(bundle, progress=True):
        calls.append(1)
        return real_train(bundle, progress=False, epochs=1)

    monkeypatch.setattr(dv, "train_digits_vit", fake_train)
    path = cache_path(digits_bundle, tmp_path)
    path.write_bytes(b"garbage")
    model = load_digits_vit(digits_bundle, tmp_path, progress=False)
    assert calls == [1] and model.qsweep_source == "trained"
    assert load_digits_vit(digits_bundle, tmp_path, progress=False).qsweep_source == "cache"


def test_build_model_embedded(digits_bundle, digits_vit, qsweep_cache):
    model, tag = build_model(ModelConfig(), digits_bundle, qsweep_cache, progress=False)
    assert tag == "embedded" and not model.training
    x = digits_bundle.test.tensors[0][:8]
    with torch.no_grad():
        assert torch.equal(model(x), digits_vit(x))


def test_digits_vit_needs_digits_data(tmp_path):
    fake = DataBundle("cifar100", None, None, torch.zeros(1, dtype=torch.long), 100, (3, 32, 32), "x")
    with pytest.raises(ConfigError, match="digits"):
        build_model(ModelConfig(name="digits_vit"), fake, tmp_path)


# ---------------------------------------------------------------------------- cache dir


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("QSWEEP_CACHE", str(tmp_path / "env"))
    assert cache_dir(str(tmp_path / "o")) == tmp_path / "o"
    assert cache_dir(None) == tmp_path / "env"
    monkeypatch.delenv("QSWEEP_CACHE")
    assert cache_dir(None) == Path.home() / ".cache" / "qsweep"


def test_atomic_write_cleans_up_on_failure(tmp_path):
    def boom(tmp):
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "sub" / "f.bin", boom)
    assert list((tmp_path / "sub").iterdir()) == []
    atomic_write(tmp_path / "sub" / "f.bin", lambda t: t.write_bytes(b"ok"))
    assert (tmp_path / "sub" / "f.bin").read_bytes() == b"ok"


# ---------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "wrapped_state_dict", "wrapped_model", "dataparallel"])
def test_state_dict_round_trip(tmp_path, fmt):
    src = tiny_vit(seed=1)
    state = src.state_dict()
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "w.pth"
        obj = {
            "pth": state,
            "wrapped_state_dict": {"state_dict": state, "epoch": 7, "best_acc": 0.9},
            "wrapped_model": {"model": state, "optimizer": {}},
            "dataparallel": {f"module.{k}": v for k, v in state.items()},
        }[fmt]
        torch.save(obj, path)
    dst = tiny_vit(seed=2)
    assert not same_outputs(src, dst)
    out = load_checkpoint(path, dst, trust=False)
    assert out is dst and not out.training and same_outputs(src, out)


def test_resnet_round_trip_and_classifier_detection(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("resnet18", num_classes=10, pretrained=False).eval()
    assert classifier_name(src) == "fc" and num_classes_of(src) == 10
    torch.save(src.state_dict(), tmp_path / "r.pt")
    dst = timm.create_model("resnet18", num_classes=10, pretrained=False).eval()
    load_checkpoint(tmp_path / "r.pt", dst, trust=False)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_classifier_fallback_is_last_linear():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    assert classifier_name(net) == "2" and num_classes_of(net) == 3


def test_pickled_module_needs_trust(tmp_path):
    src = tiny_vit(seed=1)
    path = tmp_path / "whole.pth"
    torch.save(src, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, tiny_vit(), trust=False)
    msg = str(err.value)
    assert "whole.pth" in msg and "pickled" in msg and "model.trust_checkpoint=true" in msg and "code" in msg
    loaded = load_checkpoint(path, tiny_vit(seed=2), trust=True)
    assert isinstance(loaded, nn.Module) and not loaded.training and same_outputs(src, loaded)
    assert load_checkpoint(path, None, trust=True) is not None


def test_trusted_pickled_module_class_count_checked(tmp_path):
    path = tmp_path / "whole1000.pth"
    torch.save(tiny_vit(num_classes=1000), path)
    with pytest.raises(CheckpointError, match="checkpoint has 1000 classes but the data has 10"):
        load_checkpoint(path, None, trust=True, num_classes=10)


def test_missing_checkpoint(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="nope.pth.*does not exist"):
        load_checkpoint(path, tiny_vit(), trust=False)


@pytest.mark.parametrize("name", ["junk.pth", "junk.safetensors", "junk.bin"])
def test_corrupt_checkpoint(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match=rf"{name}.*not a readable checkpoint"):
        load_checkpoint(path, tiny_vit(), trust=True)


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save(tiny_vit().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth.*not a readable checkpoint"):
        load_checkpoint(path, tiny_vit(), trust=False)


def test_class_count_mismatch(tmp_path):
    path = tmp_path / "in1k.pth"
    torch.save(tiny_vit(num_classes=1000).state_dict(), path)
    with pytest.raises(CheckpointError, match="checkpoint has 1000 classes but the data has 10") as err:
        load_checkpoint(path, tiny_vit(num_classes=10), trust=False)
    assert "in1k.pth" in str(err.value)


def test_missing_and_unexpected_keys(tmp_path):
    state = tiny_vit().state_dict()
    del state["blocks.0.attn.qkv.weight"]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "odd.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = tiny_vit(seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, model, trust=False)
    msg = str(err.value)
    assert "odd.safetensors" in msg and "blocks.0.attn.qkv.weight" in msg and "extra.weight" in msg
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched


def test_shape_mismatch(tmp_path):
    path = tmp_path / "big.pth"
    torch.save(tiny_vit(img_size=64).state_dict(), path)  # pos_embed has more tokens
    with pytest.raises(CheckpointError, match="pos_embed"):
        load_checkpoint(path, tiny_vit(), trust=False)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="meta.pth.*does not look like a state dict"):
        load_checkpoint(path, tiny_vit(), trust=False)


# ---------------------------------------------------------------------------- build_model rules

TIMM_KW = {"img_size": 16, "patch_size": 4}


def test_build_model_timm_without_weights(digits_bundle, tmp_path):
    with pytest.raises(ConfigError, match=r"model.name=vit_tiny_patch16_224 has no weights.*model.weights=random"):
        build_model(ModelConfig(name="vit_tiny_patch16_224", kwargs=TIMM_KW), digits_bundle, tmp_path)


def test_build_model_unknown_timm_name(digits_bundle, tmp_path):
    with pytest.raises(ConfigError, match=r"resnet81.*resnet18"):
        build_model(ModelConfig(name="resnet81", weights="random"), digits_bundle, tmp_path)


def test_build_model_random(digits_bundle, tmp_path):
    cfg = ModelConfig(name="vit_tiny_patch16_224", weights="random", kwargs=TIMM_KW)
    a, tag = build_model(cfg, digits_bundle, tmp_path)
    b, _ = build_model(cfg, digits_bundle, tmp_path)
    assert tag == "random" and not a.training and num_classes_of(a) == 10
    assert same_outputs(a, b, (2, 1, 16, 16))
    m, tag = build_model(ModelConfig(weights="random"), digits_bundle, tmp_path)
    assert tag == "random" and not list(tmp_path.iterdir())  # digits_vit random: no training, no cache


def test_build_model_rejects_reserved_kwargs(digits_bundle, tmp_path):
    with pytest.raises(ConfigError, match="num_classes"):
        build_model(ModelConfig(name="resnet18", weights="random", kwargs={"num_classes": 5}), digits_bundle, tmp_path)


def test_build_model_from_checkpoint(digits_bundle, tmp_path):
    torch.manual_seed(5)
    src = timm.create_model("vit_tiny_patch16_224", num_classes=10, in_chans=1, **TIMM_KW).eval()
    path = tmp_path / "digits_tiny.pth"
    torch.save({"state_dict": src.state_dict()}, path)
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(ModelConfig(name="vit_tiny_patch16_224", checkpoint=str(path), kwargs=TIMM_KW))
    model, tag = build_model(cfg, digits_bundle, tmp_path)
    assert tag == "checkpoint:digits_tiny.pth"
    assert same_outputs(src, model, (2, 1, 16, 16))


def test_build_model_checkpoint_class_mismatch(digits_bundle, tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("vit_tiny_patch16_224", num_classes=1000, in_chans=1, **TIMM_KW)
    path = tmp_path / "in1k.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    cfg = ModelConfig(name="vit_tiny_patch16_224", checkpoint=str(path), kwargs=TIMM_KW)
    with pytest.raises(CheckpointError, match="checkpoint has 1000 classes but the data has 10"):
        build_model(cfg, digits_bundle, tmp_path)


def test_build_model_pickled_checkpoint_trust(digits_bundle, digits_vit, tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(digits_vit, path)
    cfg = ModelConfig(name="digits_vit", checkpoint=str(path))
    with pytest.raises(CheckpointError, match="trust_checkpoint=true"):
        build_model(cfg, digits_bundle, tmp_path)
    cfg.trust_checkpoint = True
    model, tag = build_model(cfg, digits_bundle, tmp_path)
    assert tag == "checkpoint:whole.pt"
    x = digits_bundle.test.tensors[0][:4]
    with torch.no_grad():
        assert torch.equal(model(x), digits_vit(x))
