"""Encoders: feature contract, tile-size checks, freezing, and weight loading from files the tests write."""
import functools

import pytest
import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg
from timm.models.mvitv2 import MultiScaleVit

from rts_thaw.models.encoders import ENCODERS, build_encoder, check_tile_size

SIZE = 64


@pytest.mark.parametrize("name,channels,in_chans", [("mvitv2_micro", [32, 64, 128, 256], 1),
                                                    ("mvitv2_micro", [32, 64, 128, 256], 3),
                                                    ("resnet50", [256, 512, 1024, 2048], 2)])
def test_features_at_strides_4_to_32_with_declared_channels(name, channels, in_chans):
    enc = build_encoder(name, in_chans, SIZE, "rgb")
    feats = enc(torch.randn(2, in_chans, SIZE, 48))  # non-square and smaller than img_size works
    assert enc.out_channels == channels
    # Odd sizes round up (48 / 32 -> 2), as for strided convolutions.
    assert [tuple(f.shape) for f in feats] == [(2, c, SIZE // s, -(-48 // s)) for c, s in zip(channels, (4, 8, 16, 32))]
    assert all(f.dtype == torch.float32 for f in feats)


def test_tile_larger_than_mvit_img_size_is_refused_before_and_during_work():
    with pytest.raises(ValueError, match="Tile size 256 px is larger than the mvitv2_micro encoder's img_size 128"):
        check_tile_size(256, {"name": "mvitv2_micro"}, img_size=128)
    check_tile_size(128, {"name": "mvitv2_micro"}, img_size=128)
    check_tile_size(1024, {"name": "resnet50"}, img_size=128)  # a CNN has no fixed input size
    enc = build_encoder("mvitv2_micro", 3, SIZE, "rgb")
    with pytest.raises(ValueError, match="larger than the mvitv2_micro encoder's img_size 64"):
        enc(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match="Unknown encoder 'vit_huge'"):
        check_tile_size(64, {"name": "vit_huge"})


def test_frozen_encoder_has_no_trainable_params_stays_in_eval_and_builds_no_graph():
    enc = build_encoder("mvitv2_micro", 1, SIZE, "ndvi", frozen=True)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    feats = enc(torch.randn(1, 1, SIZE, SIZE, requires_grad=True))
    assert all(f.grad_fn is None and not f.requires_grad for f in feats)


def test_frozen_resnet_keeps_its_batch_norm_statistics():
    enc = build_encoder("resnet50", 3, SIZE, "rgb", frozen=True)
    stats = enc.body.bn1.running_mean.clone()
    enc.train()
    enc(torch.randn(2, 3, 32, 32) * 5 + 3)
    assert torch.equal(enc.body.bn1.running_mean, stats)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build_encoder("mvitv2_micro", 3, SIZE, "rgb")
    ckpt = build_encoder("mvitv2_micro", 3, SIZE, "rgb", grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    assert all(stage.grad_checkpointing for stage in ckpt.body.model.stages)
    x = torch.randn(1, 3, SIZE, SIZE)
    for enc in (plain, ckpt):
        sum(f.sum() for f in enc(x)).backward()
    torch.testing.assert_close(ckpt.body.model.patch_embed.proj.weight.grad,
                               plain.body.model.patch_embed.proj.weight.grad)


def linearly_resized_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """A [L, C] relative-position table linearly interpolated along L to `length` rows
    (what timm's MViTv2 checkpoint filter does; align_corners=False)."""
    return F.interpolate(table.T[None], size=length, mode="linear")[0].T


def assert_loaded_with_resized_rel_pos(loaded: dict, saved: dict) -> None:
    """`loaded` holds `saved`'s weights: rel-pos tables resized to the loaded size, the rest bit-identical."""
    assert set(loaded) == set(saved)
    resized = 0
    for key, value in loaded.items():
        if "rel_pos" in key and value.shape != saved[key].shape:
            torch.testing.assert_close(value, linearly_resized_rel_pos(saved[key], value.shape[0]), msg=key)
            resized += 1
        else:
            assert torch.equal(value, saved[key]), key
    assert resized > 0  # the sizes differ, so some tables must have been resized


def test_timm_state_dict_file_is_loaded_into_an_mvit(tmp_path):
    # A timm classifier checkpoint at another input size (relative-position tables
    # resized on loading), of the micro configuration to keep the test fast.
    source = build_model_with_cfg(MultiScaleVit, "mvitv2_tiny", pretrained=False,
                                  model_cfg=ENCODERS["mvitv2_micro"].mvit_cfg, img_size=96, num_classes=10)
    path = tmp_path / "mvitv2_micro.pth"
    torch.save(source.state_dict(), path)
    enc = build_encoder("mvitv2_micro", 3, SIZE, "rgb", weights=str(path))
    # The features-only encoder has no classifier and no final norm.
    backbone = {k: v for k, v in source.state_dict().items() if not k.startswith(("head.", "norm."))}
    assert_loaded_with_resized_rel_pos(enc.body.model.state_dict(), backbone)
    # One channel: timm sums the RGB patch-embedding filters.
    ndvi = build_encoder("mvitv2_micro", 1, SIZE, "ndvi", weights=str(path))
    torch.testing.assert_close(ndvi.body.model.patch_embed.proj.weight,
                               source.patch_embed.proj.weight.sum(1, keepdim=True))


def test_torchvision_resnet50_state_dict_file_is_loaded(tmp_path):
    import torchvision

    source = torchvision.models.resnet50()
    path = tmp_path / "resnet50.pth"
    torch.save(source.state_dict(), path)
    enc = build_encoder("resnet50", 2, SIZE, "dem", weights=str(path))
    torch.testing.assert_close(enc.body.layer3[0].conv2.weight, source.layer3[0].conv2.weight)
    assert enc.body.conv1.weight.shape[1] == 2


def test_encoder_is_extracted_by_modality_from_a_lightning_checkpoint(tmp_path):
    torch.manual_seed(0)
    trained = build_encoder("mvitv2_micro", 1, SIZE, "nir")
    state = {f"detector.encoders.nir.{k}": v for k, v in trained.state_dict().items()}
    state["detector.neck.inner.weight"] = torch.zeros(1)
    path = tmp_path / "stage1_nir.ckpt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    loaded = build_encoder("mvitv2_micro", 1, SIZE, "nir", weights=str(path), frozen=True)
    for (k, a), b in zip(trained.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k

    # A stage-1 model trained on smaller tiles loads into a larger encoder: relative-position
    # tables are resized, every other weight is the saved one.
    larger = build_encoder("mvitv2_micro", 1, 2 * SIZE, "nir", weights=str(path))
    assert_loaded_with_resized_rel_pos(larger.state_dict(), trained.state_dict())

    with pytest.raises(ValueError, match=r"has no encoder for modality 'ndvi' \(it holds encoders for: \['nir'\]\)"):
        build_encoder("mvitv2_micro", 1, SIZE, "ndvi", weights=str(path))
    with pytest.raises(ValueError, match="do not fit the 'nir' encoder"):
        build_encoder("mvitv2_micro", 3, SIZE, "nir", weights=str(path))


def test_missing_or_wrong_weight_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Encoder weights for modality 'rgb' not found: .*nope.pth"):
        build_encoder("mvitv2_micro", 3, SIZE, "rgb", weights=str(tmp_path / "nope.pth"))
    bad = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, bad)
    with pytest.raises(ValueError, match=f"{bad.name} do not fit the 'rgb'"):
        build_encoder("mvitv2_micro", 3, SIZE, "rgb", weights=str(bad))
    with pytest.raises(ValueError, match="no published weights"):
        build_encoder("mvitv2_micro", 3, SIZE, "rgb", pretrained=True)


def test_resnet_encoder_keeps_torchvisions_keys_and_stage_outputs():
    """The ResNet body has the classifier's state-dict keys without `fc`, in the same order,
    and returns layer1..layer4 as torchvision's feature extractor does."""
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    enc = build_encoder("resnet50", 3, SIZE, "rgb").eval()
    net = torchvision.models.resnet50().eval()
    assert list(enc.body.state_dict()) == [k for k in net.state_dict() if not k.startswith("fc.")]
    net.load_state_dict({**net.state_dict(), **enc.body.state_dict()})
    stages = create_feature_extractor(net, {f"layer{i}": str(i) for i in range(1, 5)})
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        for ours, theirs in zip(enc(x), stages(x).values(), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_a_pretrained_file_initialises_every_modality_offline(tmp_path):
    """model.encoder.pretrained_file: ImageNet-style weights in timm's format, written here, into
    each modality's encoder, the patch embedding adapted to 1, 2 and 4 channels as timm adapts it."""
    from timm.models import adapt_input_conv

    from rts_thaw.models.detector import build_encoders

    source = build_model_with_cfg(MultiScaleVit, "mvitv2_tiny", pretrained=False,
                                  model_cfg=ENCODERS["mvitv2_micro"].mvit_cfg, img_size=SIZE, num_classes=10)
    path = tmp_path / "imagenet.pth"
    torch.save(source.state_dict(), path)
    partial = functools.partial(build_encoder, name="mvitv2_micro", pretrained_file=str(path))
    encoders = build_encoders({"rgb": 3, "ndvi": 1, "sar": 2, "multi": 4}, partial,
                              keys=["rgb", "ndvi", "sar", "multi"], img_size=SIZE)
    rgb_weight = source.patch_embed.proj.weight
    for modality, channels in {"rgb": 3, "ndvi": 1, "sar": 2, "multi": 4}.items():
        got = encoders[modality].body.model.patch_embed.proj.weight
        torch.testing.assert_close(got, adapt_input_conv(channels, rgb_weight) if channels != 3 else rgb_weight)
        torch.testing.assert_close(encoders[modality].body.model.stages[1].blocks[0].attn.qkv.weight,
                                   source.stages[1].blocks[0].attn.qkv.weight)
    with pytest.raises(ValueError, match="pretrained: true .* or pretrained_file, not both"):
        build_encoder("mvitv2_micro", 3, SIZE, "rgb", pretrained=True, pretrained_file=str(path))


def test_a_training_run_starts_from_a_pretrained_file(tiny_world_config, tmp_path):
    from rts_thaw.core.checkpoints import read_checkpoint
    from rts_thaw.training.single_run import fit_and_test

    from tiny_run import compose_train, tiny_overrides

    source = build_model_with_cfg(MultiScaleVit, "mvitv2_tiny", pretrained=False,
                                  model_cfg=ENCODERS["mvitv2_micro"].mvit_cfg, img_size=64, num_classes=10)
    path = tmp_path / "imagenet.pth"
    torch.save(source.state_dict(), path)
    overrides = [*tiny_overrides(tiny_world_config, tmp_path / "cache", experiment="unimodal", logger="none",
                                 modalities=["ndvi"]),
                 f"model.encoder.pretrained_file={path}", "training.optimizer.lr=1e-9"]
    results = fit_and_test(compose_train(overrides), tmp_path / "run")
    state = read_checkpoint(results["last_checkpoint"], "test")["state_dict"]
    # one step at a vanishing learning rate: the encoder still holds the file's weights, adapted to 1 channel
    torch.testing.assert_close(state["detector.encoders.ndvi.body.model.patch_embed.proj.weight"],
                               source.patch_embed.proj.weight.sum(1, keepdim=True), atol=1e-6, rtol=0)
