import dataclasses

import pytest

from distgan import config as C
from distgan.config import UserError


def test_round_trip_is_exact():
    cfg = C.apply_overrides(C.Config(), {"optim.lr_d": 1e-4, "model.arch": "resnet", "loss.name": "hinge"})
    d = C.to_dict(cfg)
    again = C.from_dict(d)
    assert again == cfg
    assert C.to_dict(again) == d
    assert d["optim"]["lr_d"] == 1e-4 and d["model"]["arch"] == "resnet"


def test_yaml_holds_only_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr_g: 0.001\nmodel:\n  width: 32\n")
    cfg = C.load(f)
    assert cfg.optim.lr_g == 0.001 and cfg.model.width == 32
    assert cfg.optim.lr_d == C.OptimConfig().lr_d  # untouched keys keep code defaults


def test_unknown_key_names_key_and_lists_valid(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr_dd: 0.1\n")
    with pytest.raises(UserError) as e:
        C.load(f)
    msg = str(e.value)
    assert "optim.lr_dd" in msg and "lr_d" in msg and "beta1" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(UserError, match="unknown config key 'optimizer'"):
        C.from_dict({"optimizer": {}})


def test_wrong_type_names_key_expected_and_given():
    with pytest.raises(UserError) as e:
        C.from_dict({"train": {"steps": "many"}})
    assert "train.steps" in str(e.value) and "int" in str(e.value) and "str" in str(e.value)
    with pytest.raises(UserError, match="expects int, got bool"):
        C.from_dict({"train": {"steps": True}})


def test_int_accepted_for_float():
    assert C.from_dict({"optim": {"lr_g": 1}}).optim.lr_g == 1.0


def test_dotted_overrides_parse_yaml_scalars():
    o = C.parse_overrides(["optim.lr_d=1e-4", "model.spectral_norm=true", "model.arch=resnet", "train.steps=10"])
    assert o == {"optim.lr_d": 1e-4, "model.spectral_norm": True, "model.arch": "resnet", "train.steps": 10}
    cfg = C.load(None, o)
    assert cfg.optim.lr_d == 1e-4 and cfg.model.spectral_norm is True


def test_bad_override_forms():
    with pytest.raises(UserError, match="key=value"):
        C.parse_overrides(["optim.lr_d"])
    with pytest.raises(UserError, match="unknown config key 'optim.lrd'"):
        C.load(None, {"optim.lrd": 1.0})


@pytest.mark.parametrize("key,value,match", [
    ("model.arch", "vit", "dcgan, resnet"),
    ("loss.name", "wgan", "ns, hinge, wgan-gp, lsgan"),
    ("optim.beta1", 1.5, "beta1"),
    ("cluster.k", 1, "at least 2"),
    ("optim.diffaugment", "color,flip", "translation"),
])
def test_validation(key, value, match):
    with pytest.raises(UserError, match=match):
        C.load(None, {key: value})


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        C.Config().train.steps = 3  # type: ignore[misc]


@pytest.mark.parametrize("name", ["digits.yaml", "dcgan_mnist.yaml", "dcgan_fashion.yaml", "resnet_cifar10.yaml"])
def test_shipped_configs_load_and_their_read_out_fits_their_objective(name):
    from pathlib import Path

    from distgan.config import reads_head

    cfg = C.load(Path(__file__).resolve().parents[1] / "jobs" / "configs" / name)  # validated as `train` loads it
    C.parse_readout(cfg.cluster.readout)
    # the measured recipes (README, Embedding quality): the MNIST / Fashion-MNIST configs read the
    # contrastive head beside the grid, which only a contrastive D has
    assert reads_head(cfg.cluster.readout) == (name in ("dcgan_mnist.yaml", "dcgan_fashion.yaml"))
    assert not reads_head(cfg.cluster.readout) or cfg.objective.name == "contrastive"
