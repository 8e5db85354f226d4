import re

import pytest
import torch

from detector.errors import ConfigError
from detector.model import SEClassifier, SqueezeExcitation, upsampling_residual
from detector.module import DetectorModule


def test_resnet50_se_parameter_count_matches_the_seed():
    net = SEClassifier("resnet50")
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert 24.29e6 <= trainable <= 24.31e6
    assert net.backbone.num_features == 2048
    assert net.se.fc1.out_features == 2048 // 16


@pytest.mark.parametrize("size", [32, 64])
def test_output_is_one_logit_per_image(size):
    net = SEClassifier("test_resnet").eval()
    out = net(torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8))
    assert out.shape == (3,)
    assert torch.isfinite(out).all()


def test_uint8_and_unit_float_inputs_agree():
    net = SEClassifier("test_resnet").eval()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(net(x), net(x.float() / 255), rtol=1e-5, atol=1e-5)


def test_normalisation_uses_the_backbone_mean_and_std():
    net = SEClassifier("resnet50")
    torch.testing.assert_close(net.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    torch.testing.assert_close(net.std.flatten(), torch.tensor([0.229, 0.224, 0.225]))


def test_se_gate_scales_each_channel_by_a_weight_in_0_1():
    se = SqueezeExcitation(32, reduction=4)
    x = torch.rand(2, 32, 5, 5) + 0.1
    gate = se.gate(x)
    assert gate.shape == (2, 32, 1, 1)
    assert ((gate > 0) & (gate < 1)).all()
    torch.testing.assert_close(se(x), x * gate)
    # A gate that depends on the input: two different images get different channel weights.
    assert not torch.allclose(gate[0], gate[1])


def test_se_reduction_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match="model.se_reduction=64"):
        SqueezeExcitation(32, reduction=64)


def test_unknown_backbone_names_the_setting():
    with pytest.raises(ConfigError, match="model.backbone='resnet_does_not_exist'"):
        SEClassifier("resnet_does_not_exist")


def test_pretrained_without_network_or_file_fails_fast_naming_both_options(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("detector.weights._hub_reachable", lambda *a, **k: False)
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        SEClassifier("test_resnet", pretrained=True)
    assert time.monotonic() - start < 30
    assert "model.weights_file=PATH" in str(info.value)
    assert "cache" in str(info.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_loads_a_backbone_state_dict(tmp_path, suffix):
    source = SEClassifier("test_resnet")
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.backbone.state_dict(), path)
    else:
        torch.save(source.backbone.state_dict(), path)
    loaded = SEClassifier("test_resnet", weights_file=str(path))
    for key, value in source.backbone.state_dict().items():
        torch.testing.assert_close(loaded.backbone.state_dict()[key], value)


def test_missing_weights_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="model.weights_file=.*nope.safetensors"):
        SEClassifier("test_resnet", weights_file=str(tmp_path / "nope.safetensors"))


def test_batchnorm_uses_running_stats_in_eval_mode():
    module = DetectorModule(backbone="test_resnet", image_size=32).eval()
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    bn = next(m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    with torch.no_grad():
        single = torch.stack([module(x[i : i + 1])[0] for i in range(4)])
        batch = module(x)
    # Eval mode: running stats untouched, and an image's score does not depend on its batch.
    torch.testing.assert_close(bn.running_mean, before)
    torch.testing.assert_close(single, batch, rtol=1e-4, atol=1e-4)


def test_hyperparameters_rebuild_the_module_without_config(tmp_path):
    import lightning as L

    module = DetectorModule(
        backbone="test_resnet", se_reduction=8, dropout=0.3, image_size=48, flip_average=True
    )
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(module)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = DetectorModule.load_from_checkpoint(path)
    assert loaded.hparams.backbone == "test_resnet"
    assert loaded.hparams.se_reduction == 8
    assert loaded.hparams.image_size == 48
    assert loaded.net.flip_average is True
    assert list(loaded.hparams.class_names) == ["FAKE", "REAL"]


def test_flip_average_scores_the_mean_of_an_image_and_its_mirror_outside_training():
    torch.manual_seed(0)
    plain = SEClassifier("test_resnet", dropout=0.0).eval()
    averaged = SEClassifier("test_resnet", dropout=0.0, flip_average=True).eval()
    averaged.load_state_dict(plain.state_dict())
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected = (plain(x) + plain(x.flip(-1))) / 2
        got = averaged(x)
        assert got.shape == (5,)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(averaged(x.flip(-1)), got, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(plain(x), expected, atol=1e-4)  # the mirror image does count
    # Training sees each image once, as it comes (flips are the loader's augmentation).
    plain.train(), averaged.train()
    torch.testing.assert_close(averaged(x), plain(x), rtol=1e-5, atol=1e-5)


def test_label_smoothing_softens_training_targets_only():
    torch.manual_seed(0)
    module = DetectorModule(backbone="test_resnet", label_smoothing=0.2, image_size=32)
    module.log_dict = module.log = lambda *a, **k: None  # no Trainer to log to
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    targets = torch.tensor([0, 1, 1, 0])
    module.eval()  # the same logits in both calls (dropout off)
    logits = module(module.prepare(images)).float()
    train_loss, _ = module._step((images, targets), module.train_metrics, "train")
    val_loss, _ = module._step((images, targets), module.val_metrics, "val")
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    soft = torch.tensor([0.1, 0.9, 0.9, 0.1])
    torch.testing.assert_close(train_loss, bce(logits, soft))
    torch.testing.assert_close(val_loss, bce(logits, targets.float()))
    assert not torch.isclose(train_loss, val_loss)


def test_drop_path_rate_reaches_the_backbone_blocks():
    net = SEClassifier("resnet50", drop_path_rate=0.1)
    rates = [m.drop_prob for m in net.backbone.modules() if type(m).__name__ == "DropPath"]
    # timm: rising linearly with depth over the 16 blocks, the first one (rate 0) without
    assert len(rates) == 15 and rates == sorted(rates) and rates[-1] == pytest.approx(0.1)
    assert not any(type(m).__name__ == "DropPath" for m in SEClassifier("resnet50").modules())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"label_smoothing": 1.0}, "model.label_smoothing=1.0 must be in [0, 1)"),
        ({"drop_path_rate": -0.1}, "model.drop_path_rate=-0.1 must be in [0, 1)"),
    ],
)
def test_regularisation_settings_out_of_range_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        DetectorModule(backbone="test_resnet", **kwargs)


def test_drop_path_on_a_backbone_without_it_names_both_settings():
    with pytest.raises(ConfigError, match=r"model.drop_path_rate=0.1: model.backbone='vgg11'"):
        SEClassifier("vgg11", drop_path_rate=0.1)


def test_npr_input_filter_feeds_the_backbone_the_upsampling_residual():
    blocky = torch.rand(2, 3, 16, 16).repeat_interleave(2, -2).repeat_interleave(2, -1)
    assert upsampling_residual(blocky).abs().max() == 0  # nearest 2x upsampling: no residual
    x = torch.rand(2, 3, 33, 32)  # odd sizes keep their shape
    residual = upsampling_residual(x)
    assert residual.shape == x.shape and residual[..., ::2, ::2].abs().max() == 0
    plain = SEClassifier("test_resnet").eval()
    npr = SEClassifier("test_resnet", input_filter="npr").eval()
    npr.load_state_dict(plain.state_dict())  # same weights, no new ones
    seen = []
    npr.backbone.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert not torch.allclose(npr(images), plain(images))
    torch.testing.assert_close(seen[0], upsampling_residual(npr.normalize(images)))
    module = DetectorModule(backbone="test_resnet", input_filter="npr")
    assert module.hparams.input_filter == "npr" and module.net.input_filter == "npr"
    assert DetectorModule(backbone="test_resnet").hparams.input_filter == "none"
    with pytest.raises(ConfigError, match=r"model.input_filter='srm': one of none, npr, image_"):
        SEClassifier("test_resnet", input_filter="srm")


def test_image_and_npr_input_feeds_the_backbone_six_channels(tmp_path):
    net = SEClassifier("test_resnet", input_filter="image_and_npr").eval()
    seen = []
    net.backbone.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    logits = net(images)
    assert logits.shape == (2,) and seen[0].shape == (2, 6, 32, 32)
    x = net.normalize(images)
    torch.testing.assert_close(seen[0], torch.cat([x, upsampling_residual(x)], 1))
    # only the stem differs from a three-channel network's weights
    plain = SEClassifier("test_resnet").state_dict()
    differ = [k for k, v in net.state_dict().items() if v.shape != plain[k].shape]
    assert len(differ) == 1 and net.state_dict()[differ[0]].shape[1] == 6
    # a three-channel weights file still loads: timm repeats the stem's RGB filters, scaled
    rgb = SEClassifier("test_resnet").backbone.state_dict()
    torch.save(rgb, tmp_path / "rgb.pth")
    six = SEClassifier(
        "test_resnet", weights_file=str(tmp_path / "rgb.pth"), input_filter="image_and_npr"
    ).backbone.state_dict()
    stem = differ[0].removeprefix("backbone.")
    torch.testing.assert_close(six[stem], torch.cat([rgb[stem], rgb[stem]], 1) / 2)
