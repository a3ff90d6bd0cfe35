"""The whole detector from Hydra configs: output contract, frozen encoders, staged init, learning, config errors."""
import pytest
import torch
from torch import nn
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torchvision.models.detection.image_list import ImageList
from torchmetrics.detection import MeanAveragePrecision

from rts_thaw.models.detector import MultiModalDetector
from rts_thaw.models.encoders import check_tile_size
from rts_thaw.models.summary import format_summary

SIZE = 64
CHANNELS = {"rgb": 3, "ndvi": 1, "nir": 1}
LOSSES_CASCADE = {"loss_objectness", "loss_rpn_box_reg", "loss_mask",
                  *(f"loss_{p}_stage{k}" for p in ("cls", "box_reg") for k in (1, 2, 3))}
LOSSES_MASKRCNN = {"loss_objectness", "loss_rpn_box_reg", "loss_mask", "loss_cls_stage1", "loss_box_reg_stage1"}


def model_cfg(model="cascade_mvit", fusion="none", *overrides, tile=SIZE):
    with initialize_config_module("rts_thaw.conf", version_base=None):
        cfg = compose(overrides=[f"+model={model}", f"model/fusion={fusion}", f"+data.tile_size={tile}", *overrides])
    return cfg


def build(model="cascade_mvit", fusion="none", modalities=("rgb",), *overrides) -> MultiModalDetector:
    torch.manual_seed(0)
    return instantiate(model_cfg(model, fusion, *overrides).model)(modality_channels={m: CHANNELS[m] for m in modalities})


def make_tiles(n=4, seed=0):
    """Ellipse 'slumps' that are brighter in every modality, on noise; 1 or 2 per tile."""
    g = torch.Generator().manual_seed(seed)
    images = {m: torch.randn(n, c, SIZE, SIZE, generator=g) * 0.3 for m, c in CHANNELS.items()}
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    targets = []
    for i in range(n):
        count = 1 + i % 2
        masks = torch.zeros(count, SIZE, SIZE, dtype=torch.uint8)
        boxes = []
        for j in range(count):
            h, w = torch.randint(12, 26, (2,), generator=g).tolist()
            y, x = torch.randint(2, SIZE - 28, (2,), generator=g).tolist()
            if j == 1:  # keep the second one apart from the first
                y, x = (y + 32) % (SIZE - 28), (x + 32) % (SIZE - 28)
            inside = ((yy - y - h / 2) / (h / 2)) ** 2 + ((xx - x - w / 2) / (w / 2)) ** 2 <= 1
            masks[j] = inside
            ys, xs = torch.where(inside)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            for m in images:
                images[m][i, :, inside] += 1.5
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32),
                        "labels": torch.ones(count, dtype=torch.int64), "masks": masks})
    return images, targets


def mask_ap50(detector, images, targets) -> float:
    detector.eval()
    with torch.no_grad():
        out = detector(images, [(SIZE, SIZE)] * len(targets))
    metric = MeanAveragePrecision(iou_type="segm", iou_thresholds=[0.5])
    metric.update([{"masks": o["masks"] > 0.5, "scores": o["scores"], "labels": o["labels"]} for o in out],
                  [{"masks": t["masks"].bool(), "labels": t["labels"]} for t in targets])
    return metric.compute()["map_50"].item()


def check_train_and_eval_contract(detector, losses_expected):
    images, targets = make_tiles(n=2)
    images = {m: images[m] for m in detector.modalities}
    detector.train()
    losses = detector(images, [(SIZE, SIZE), (SIZE, SIZE)], targets)
    assert set(losses) == losses_expected
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    detector.eval()
    sizes = [(SIZE, SIZE), (56, 40)]  # the second image is padded in the batch
    with torch.no_grad():
        out = detector(images, sizes)
    assert len(out) == 2
    for det, (h, w) in zip(out, sizes):
        n = len(det["boxes"])
        assert det["boxes"].shape == (n, 4) and det["boxes"].dtype == torch.float32
        assert det["scores"].shape == (n,) and ((det["scores"] >= 0) & (det["scores"] <= 1)).all()
        assert det["labels"].dtype == torch.int64 and (det["labels"] == 1).all()
        assert det["masks"].shape == (n, h, w) and det["masks"].dtype == torch.float32
        assert ((det["masks"] >= 0) & (det["masks"] <= 1)).all()
        assert (det["boxes"][:, 2] <= w).all() and (det["boxes"][:, 3] <= h).all()


@pytest.mark.parametrize("model,losses", [("cascade_mvit", LOSSES_CASCADE), ("maskrcnn_mvit", LOSSES_MASKRCNN)])
@pytest.mark.parametrize("fusion", ["none", "data_level", "concat_conv", "cross_attention", "residual_cross_attention",
                                    "gated_local_attention", "stacked_gated_local_attention"])
def test_every_fusion_with_both_head_types_follows_the_output_contract(model, losses, fusion):
    modalities = ("rgb",) if fusion == "none" else ("rgb", "ndvi", "nir")
    detector = build(model, fusion, modalities)
    assert detector.modalities == list(modalities)
    encoders = {"data_level": ["stacked"], "stacked_gated_local_attention": ["stacked", "ndvi", "nir"]}
    assert list(detector.encoders) == encoders.get(fusion, list(modalities))
    check_train_and_eval_contract(detector, losses)


# Paper-scale heads keep their layers and widths; only the RoI counts shrink to fit a CPU test.
FEW_ROIS = ("model.heads.rpn.post_nms_top_n_train=32", "model.heads.rpn.post_nms_top_n_test=32",
            "model.heads.roi.batch_size_per_image=32")


@pytest.mark.parametrize("model,overrides,losses", [
    ("maskrcnn_r50", (), LOSSES_MASKRCNN),
    ("cascade_mvit", ("model/encoder=mvitv2_tiny",), LOSSES_CASCADE),
    ("cascade_mvit", ("model/heads=cascade", *FEW_ROIS), LOSSES_CASCADE),
    ("cascade_mvit", ("model/heads=cascade_2fc", *FEW_ROIS), LOSSES_CASCADE),
    ("maskrcnn_mvit", ("model/heads=maskrcnn", *FEW_ROIS), LOSSES_MASKRCNN),
])
def test_other_encoders_and_paper_scale_heads_follow_the_output_contract(model, overrides, losses):
    check_train_and_eval_contract(build(model, "none", ("ndvi",), *overrides), losses)


@pytest.mark.parametrize("encoder", ["mvitv2_small", "mvitv2_base"])
def test_larger_mvit_encoders_build_with_their_widths(encoder):
    detector = build("cascade_mvit", "none", ("rgb",), f"model/encoder={encoder}")
    width = 96  # timm's small and base share the tiny widths and add depth
    assert detector.encoders["rgb"].out_channels == [width, 2 * width, 4 * width, 8 * width]
    assert detector.fusion.out_channels == detector.encoders["rgb"].out_channels


def test_frozen_encoders_get_no_gradients_and_stay_bit_identical_while_the_rest_learns():
    with pytest.warns(UserWarning, match="frozen encoders with random weights"):
        detector = build("cascade_mvit", "residual_cross_attention", ("rgb", "ndvi", "nir"), "model.encoder.frozen=true")
    before = {k: v.clone() for k, v in detector.state_dict().items()}
    optimizer = torch.optim.AdamW(detector.parameters(), lr=1e-2)  # all parameters, frozen ones included
    images, targets = make_tiles(n=2)
    detector.train()
    assert not any(m.training for encoder in detector.encoders.values() for m in encoder.modules())
    sum(detector(images, [(SIZE, SIZE)] * 2, targets).values()).backward()
    assert all(p.grad is None for p in detector.encoders.parameters())
    optimizer.step()
    after = detector.state_dict()
    for key, value in before.items():
        if key.startswith("encoders."):
            assert torch.equal(value, after[key]), key
    for part in ("fusion", "neck", "rpn", "roi_heads"):
        assert any(not torch.equal(v, after[k]) for k, v in before.items() if k.startswith(part + ".")), part
    summary = detector.summary()
    assert summary["encoders"]["trainable"] == 0 and summary["encoders"]["total"] > 0
    assert summary["all"]["trainable"] == sum(p.numel() for p in detector.parameters() if p.requires_grad)


def test_summary_counts_every_part_and_prints_beside_the_paper():
    detector = build("cascade_mvit", "residual_cross_attention", ("rgb", "ndvi", "nir"))
    summary = detector.summary()
    assert set(summary) == {"encoders", "fusion", "neck", "rpn", "roi_heads", "all"}
    assert summary["all"]["total"] == sum(p.numel() for p in detector.parameters())
    text = format_summary(summary, num_encoders=3)
    assert "roi_heads" in text and "230M total" in text and "78M trainable" in text


def lightning_checkpoint(detector, path):
    torch.save({"state_dict": {f"detector.{k}": v for k, v in detector.state_dict().items()}}, path)
    return str(path)


def hydra_dict(d):
    return "{" + ",".join(f"{k}:'{v}'" for k, v in d.items()) + "}"


@pytest.mark.parametrize("fusion", ["residual_cross_attention", "gated_local_attention"])
def test_stage2_model_starts_as_the_stage1_rgb_model(tmp_path, fusion):
    """Encoders from stage-1 checkpoints, neck/RPN/heads from the RGB one, residual fusion at identity."""
    rgb_model = build("cascade_mvit", "none", ("rgb",))
    rgb_ckpt = lightning_checkpoint(rgb_model, tmp_path / "rgb.ckpt")
    weights = {"rgb": rgb_ckpt}
    for m in ("ndvi", "nir"):
        weights[m] = lightning_checkpoint(build("cascade_mvit", "none", (m,)), tmp_path / f"{m}.ckpt")
    fused = build("cascade_mvit", fusion, ("rgb", "ndvi", "nir"), "model.encoder.frozen=true",
                  f"model.encoder.weights={hydra_dict(weights)}", f"model.init_from='{rgb_ckpt}'")
    images, _ = make_tiles(n=2)
    rgb_model.eval(), fused.eval()
    with torch.no_grad():
        expected = rgb_model({"rgb": images["rgb"]}, [(SIZE, SIZE)] * 2)
        got = fused(images, [(SIZE, SIZE)] * 2)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g["boxes"], e["boxes"])
        torch.testing.assert_close(g["scores"], e["scores"])

    with pytest.raises(ValueError, match=r"has no encoder for modality 'nir' \(it holds encoders for: \['rgb'\]\)"):
        build("cascade_mvit", "residual_cross_attention", ("rgb", "ndvi", "nir"),
              f"model.encoder.weights={hydra_dict({**weights, 'nir': rgb_ckpt})}")
    with pytest.raises(FileNotFoundError, match="init_from checkpoint not found"):
        build("cascade_mvit", "none", ("rgb",), f"model.init_from='{tmp_path / 'missing.ckpt'}'")


def test_stacked_query_stage2_starts_as_the_data_level_model(tmp_path):
    """The stacked encoder and heads from the data_level stage-1 model, the auxiliary encoders from
    their unimodal ones, the fusion at identity: the same detections as the data_level model."""
    modalities = ("rgb", "ndvi", "nir")
    stacked_model = build("cascade_mvit", "data_level", modalities)
    stacked_ckpt = lightning_checkpoint(stacked_model, tmp_path / "stacked.ckpt")
    weights = {"stacked": stacked_ckpt}
    for m in ("ndvi", "nir"):
        weights[m] = lightning_checkpoint(build("cascade_mvit", "none", (m,)), tmp_path / f"{m}.ckpt")
    fused = build("cascade_mvit", "stacked_gated_local_attention", modalities, "model.encoder.frozen=true",
                  f"model.encoder.weights={hydra_dict(weights)}", f"model.init_from='{stacked_ckpt}'")
    assert fused.encoders["stacked"].out_channels == stacked_model.encoders["stacked"].out_channels
    images, _ = make_tiles(n=2)
    stacked_model.eval(), fused.eval()
    with torch.no_grad():
        expected = stacked_model(images, [(SIZE, SIZE)] * 2)
        got = fused(images, [(SIZE, SIZE)] * 2)
    assert sum(len(e["boxes"]) for e in expected) > 0
    for e, g in zip(expected, got):
        torch.testing.assert_close(g["boxes"], e["boxes"])
        torch.testing.assert_close(g["scores"], e["scores"])


def test_a_stacked_query_needs_every_modality():
    """Its encoder reads every modality stacked: it cannot leave one out, so it refuses to."""
    detector = build("cascade_mvit", "stacked_gated_local_attention", ("rgb", "ndvi", "nir")).eval()
    assert detector.optional_modalities == []
    images, _ = make_tiles(n=2)
    with pytest.raises(ValueError, match=r"the batch lacks \['ndvi'\].*cannot map without any of them"):
        detector({"rgb": images["rgb"], "nir": images["nir"]}, [(SIZE, SIZE)] * 2)
    with pytest.raises(ValueError, match=r"the batch lacks \['nir'\]"):
        detector(images, [(SIZE, SIZE)] * 2, available={"nir": torch.tensor([True, False])})
    assert build("cascade_mvit", "gated_local_attention", ("rgb", "ndvi", "nir")).optional_modalities == ["ndvi", "nir"]


@pytest.mark.parametrize("fusion", ["data_level", "stacked_gated_local_attention"])
def test_a_stacked_encoder_trained_with_modality_dropout_maps_without_a_modality(fusion):
    """Trained so (`learned_missing`), the stacked encoder may run without an auxiliary modality:
    an image without NDVI is encoded exactly as one whose NDVI channels are the normalised mean."""
    modalities = ("rgb", "ndvi", "nir")
    torch.manual_seed(0)
    detector = instantiate(model_cfg("cascade_mvit", fusion).model)(
        modality_channels={m: CHANNELS[m] for m in modalities}, learned_missing=True).eval()
    assert detector.optional_modalities == ["ndvi", "nir"]
    images, _ = make_tiles(n=2)
    mean_filled = {**images, "ndvi": images["ndvi"].clone()}
    mean_filled["ndvi"][1] = 0.0
    with torch.no_grad():
        flagged = detector._stacked(images, {"ndvi": torch.tensor([True, False])})
        torch.testing.assert_close(flagged, detector._stacked(mean_filled, None))
        without = detector.extract_features(images, {"ndvi": torch.tensor([True, False])})
        full = detector.extract_features(images)
        absent = detector({"rgb": images["rgb"], "nir": images["nir"]}, [(SIZE, SIZE)] * 2)
    for level in full:  # image 0 has NDVI: untouched; image 1 does not: other features
        torch.testing.assert_close(without[level][0], full[level][0])
        assert not torch.allclose(without[level][1], full[level][1])
    assert len(absent) == 2


@pytest.mark.slow  # a long end-to-end run: `make test` runs it, `make test-fast` does not
@pytest.mark.parametrize("model,fusion,modalities", [
    ("cascade_mvit", "residual_cross_attention", ("rgb", "ndvi", "nir")),  # the paper's model
    ("cascade_mvit", "gated_local_attention", ("rgb", "ndvi", "nir")),
    ("maskrcnn_r50", "none", ("rgb",)),  # Table 1 CNN baseline
    ("cascade_mvit", "data_level", ("rgb", "ndvi", "nir")),
])
def test_model_overfits_a_handful_of_tiles_to_high_mask_ap50(model, fusion, modalities):
    detector = build(model, fusion, modalities, "model.heads.roi.detections_per_img=20")  # <= 2 slumps per tile
    images, targets = make_tiles(n=4)
    images = {m: images[m] for m in modalities}
    optimizer = torch.optim.AdamW([p for p in detector.parameters() if p.requires_grad], lr=2e-3, weight_decay=0)
    ap50 = mask_ap50(detector, images, targets)
    assert ap50 < 0.5  # an untrained model does not already solve it
    for step in range(1, 61):
        detector.train()
        loss = sum(detector(images, [(SIZE, SIZE)] * 4, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= 20 and step % 10 == 0:
            ap50 = mask_ap50(detector, images, targets)
            if ap50 >= 0.9:
                break
    assert ap50 >= 0.9, f"mask AP50 {ap50:.2f} after {step} steps"


@pytest.mark.parametrize("model", ["cascade_mvit", "maskrcnn_mvit"])
def test_boxes_stay_float32_under_bf16_autocast(model):
    """Proposals and boxes are decoded from float32 deltas: decoded in bfloat16 they would sit on
    a 1-2 px grid at tile coordinates of 128-512, and every mask pasted from them with them."""
    size = 256
    torch.manual_seed(0)
    detector = instantiate(model_cfg(model, tile=size).model)(modality_channels={"rgb": 3}).eval()
    detector.roi_heads.score_thresh = 0.0
    images = {"rgb": torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = detector.extract_features(images)
        proposals, _ = detector.rpn(ImageList(images["rgb"], [(size, size)]), features)
        boxes = detector(images, [(size, size)])[0]["boxes"]
    for name, b in (("proposals", proposals[0]), ("boxes", boxes)):
        assert b.dtype == torch.float32 and len(b) > 10, name
        off_grid = (b != b.bfloat16().float()).float().mean().item()
        assert off_grid > 0.5, f"{name}: {off_grid:.0%} of coordinates are off the bfloat16 grid"


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match="needs at least one auxiliary modality besides 'rgb'"):
        build("cascade_mvit", "residual_cross_attention", ("rgb",))
    with pytest.raises(ValueError, match=r"encoder weights given for unknown modality \['dem'\]"):
        build("cascade_mvit", "none", ("rgb",), "model.encoder.weights={dem: /x.ckpt}")
    cfg = model_cfg("cascade_mvit", "none", "model.img_size=64", tile=128)
    with pytest.raises(ValueError, match="Tile size 128 px is larger than the mvitv2_micro encoder's img_size 64"):
        check_tile_size(cfg.data.tile_size, cfg.model.encoder, cfg.model.img_size)
    detector = build("cascade_mvit", "concat_conv", ("rgb", "ndvi"))
    images, _ = make_tiles(n=1)
    with pytest.raises(ValueError, match=r"the batch lacks \['ndvi'\]"):
        detector({"rgb": images["rgb"]}, [(SIZE, SIZE)])
    with pytest.raises(ValueError, match=r"modality 'ndvi' must be \[B,1,H,W\]"):
        detector({"rgb": images["rgb"], "ndvi": images["rgb"]}, [(SIZE, SIZE)])
    with pytest.raises(ValueError, match="needs targets in training mode"):
        detector.train()({"rgb": images["rgb"], "ndvi": images["ndvi"]}, [(SIZE, SIZE)])


def test_rpn_test_proposals_caps_eval_proposals_and_adds_no_state():
    """`rpn.test_proposals` (what tiling.proposals sets) is the eval-time count torchvision keeps
    after NMS; training keeps the config's training count, and the state dict is torchvision's."""
    from torchvision.models.detection.rpn import RegionProposalNetwork

    detector = build("cascade_mvit", "none", ("rgb",))
    rpn = detector.rpn
    plain = RegionProposalNetwork(rpn.anchor_generator, rpn.head, 0.7, 0.3, 8, 0.5, {"training": 1, "testing": 1},
                                  {"training": 1, "testing": 1}, 0.7)
    assert list(rpn.state_dict()) == list(plain.state_dict())
    images, targets = make_tiles(n=2)
    image_list = ImageList(images["rgb"], [(SIZE, SIZE)] * 2)
    with torch.no_grad():
        pyramid = detector.extract_features({"rgb": images["rgb"]})
        for count in (3, 1):
            rpn.eval()
            rpn.test_proposals = count
            assert [len(p) for p in rpn(image_list, pyramid)[0]] == [count, count]
        rpn.train()
        trained = rpn(image_list, pyramid, targets)[0]
    assert max(len(p) for p in trained) > 3  # the training count, not test_proposals


@pytest.mark.parametrize("model,norm_type", [("maskrcnn_r50", torch.nn.BatchNorm2d),
                                             ("cascade_mvit", torch.nn.LayerNorm)])
def test_weight_decay_skips_every_norm_layer_of_the_detector(model, norm_type):
    from rts_thaw.training.optim import param_groups

    detector = build(model, "none", ("rgb",))
    norms = [m for m in detector.modules() if isinstance(m, norm_type)]
    assert norms
    decayed = {id(p) for p in param_groups(detector, 0.05)[0]["params"]}
    assert not any(id(p) in decayed for m in norms for p in m.parameters())


def test_a_fusion_parameter_it_does_not_have_is_a_clear_error():
    with pytest.raises(ValueError, match="bad parameter for fusion ConcatConvFusion"):
        build("cascade_mvit", "concat_conv", ("rgb", "ndvi"), "+model.fusion.heads=2")


def test_a_model_config_of_the_named_fusion_era_still_builds_its_detector():
    """Checkpoints written before the parts became Hydra targets store `fusion: {name: ...}` and
    plain encoder and heads settings; they rebuild the same detector."""
    from rts_thaw.models.checkpoint import upgraded_model_config

    today = model_cfg("cascade_mvit", "residual_cross_attention").model
    legacy = OmegaConf.to_container(today, resolve=True)
    for part in ("encoder", "heads"):
        for key in ("_target_", "_partial_", "_convert_"):
            legacy[part].pop(key)
    legacy["fusion"] = {"name": "residual_cross_attention",
                        **{k: v for k, v in legacy["fusion"].items() if k not in ("_target_", "_partial_", "residual")}}
    channels = {"rgb": 3, "ndvi": 1}
    torch.manual_seed(0)
    old = instantiate(upgraded_model_config(OmegaConf.create(legacy)))(modality_channels=channels)
    torch.manual_seed(0)
    new = instantiate(today)(modality_channels=channels)
    assert old.fusion.skips_missing and type(old.fusion) is type(new.fusion)
    assert {k: v.shape for k, v in old.state_dict().items()} == {k: v.shape for k, v in new.state_dict().items()}


class _StridedConvs(nn.Module):
    """An encoder of one's own: four feature maps at strides 4 to 32, its channels told."""

    def __init__(self, in_chans):
        super().__init__()
        self.out_channels = [8, 16, 32, 64]
        widths = [in_chans, *self.out_channels]
        self.stages = nn.ModuleList(nn.Conv2d(a, b, 3, stride=4 if k == 0 else 2, padding=1)
                                    for k, (a, b) in enumerate(zip(widths, widths[1:])))

    def forward(self, x):
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def strided_convs(in_chans, img_size, modality, weights=None):
    return _StridedConvs(in_chans)


def test_an_encoder_of_ones_own_is_one_target():
    """architecture.md: a new encoder is a builder named as the `_target_` of model/encoder."""
    from model_parts import part

    from rts_thaw.models.detector import build_detector

    encoder = instantiate({"_target_": f"{__name__}.strided_convs", "_partial_": True})
    detector = build_detector({"rgb": 3}, encoder, part("fusion", "none"), part("heads", "cascade_light"), SIZE)
    out = detector.eval()({"rgb": torch.randn(1, 3, SIZE, SIZE)}, [(SIZE, SIZE)])
    assert isinstance(detector.encoders["rgb"], _StridedConvs) and set(out[0]) >= {"boxes", "scores", "masks"}
