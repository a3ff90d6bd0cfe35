"""Fusion variants: one interface, RGB strides/channels out, bounded attention, clear config errors."""
import pytest
import torch
import torch.nn.functional as F

from rts_thaw.models import fusion as fusion_mod
from rts_thaw.models.fusion import CrossModalAttention, sine_position_encoding

from model_parts import make_fusion

RGB_CH = [16, 32, 64, 128]


def feats(channels, size=32, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, size // 2 ** i, size // 2 ** i, generator=g) for i, c in enumerate(channels)]


def three_modalities():
    # Auxiliary encoders may be narrower than the RGB one.
    return {"rgb": RGB_CH, "ndvi": [8, 16, 32, 64], "nir": [8, 16, 32, 64]}


@pytest.mark.parametrize("name", ["concat_conv", "cross_attention", "residual_cross_attention",
                                  "gated_local_attention"])
@pytest.mark.parametrize("aux", [["ndvi"], ["ndvi", "nir"], ["ndvi", "nir", "dem", "ndwi"]])
def test_feature_fusions_return_rgb_strides_and_channels_for_any_number_of_aux(name, aux):
    channels = {"rgb": RGB_CH, **{m: [8, 16, 32, 64] for m in aux}}
    fusion = make_fusion(name, channels, **({"num_heads": 4} if "attention" in name else {}))
    inputs = {m: feats(c, seed=i) for i, (m, c) in enumerate(channels.items())}
    out = fusion(inputs)
    assert fusion.out_channels == RGB_CH
    assert [o.shape for o in out] == [f.shape for f in inputs["rgb"]]
    assert all(torch.isfinite(o).all() for o in out)
    sum(o.sum() for o in out).backward()  # differentiable end to end


def test_passthrough_variants():
    rgb = feats(RGB_CH)
    assert make_fusion("none", {"ndvi": RGB_CH})({"ndvi": rgb}) == rgb
    assert make_fusion("data_level", {"stacked": RGB_CH})({"stacked": rgb}) == rgb


@pytest.mark.parametrize("name", ["residual_cross_attention", "gated_local_attention"])
def test_residual_fusion_starts_as_the_rgb_features_and_then_uses_the_aux_modalities(name):
    channels = three_modalities()
    fusion = make_fusion(name, channels)
    inputs = {m: feats(c, seed=i) for i, (m, c) in enumerate(channels.items())}
    for o, r in zip(fusion(inputs), inputs["rgb"]):
        torch.testing.assert_close(o, r)  # stage 2 starts from the stage-1 RGB model
    with torch.no_grad():
        for attn in fusion.attn.values():
            for layer in attn.out_proj.values():
                layer.weight.normal_(std=0.1)
    changed = {**inputs, "ndvi": feats(channels["ndvi"], seed=99)}
    assert not torch.allclose(fusion(inputs)[0], fusion(changed)[0])


def test_plain_cross_attention_has_no_rgb_residual():
    channels = {"rgb": [16], "ndvi": [16]}
    fusion = make_fusion("cross_attention", channels, levels=[0])
    attn = fusion.attn["0"]
    rgb, ndvi = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    # Hand-computed: single-head attention of projected RGB queries over projected NDVI tokens.
    with torch.no_grad():
        attn_single = CrossModalAttention(16, {"ndvi": 16}, num_heads=1, kv_pool_size=16, residual=False)
        attn_single.load_state_dict(attn.state_dict())
        q_tok = rgb.flatten(2).transpose(1, 2)
        kv_tok = attn_single.kv_norm["ndvi"](ndvi.flatten(2).transpose(1, 2))
        pos = sine_position_encoding(4, 4, 16)
        q = attn_single.q_proj(attn_single.q_norm(q_tok)) + pos
        k = attn_single.k_proj["ndvi"](kv_tok) + pos
        v = attn_single.v_proj["ndvi"](kv_tok)
        a = torch.softmax(q @ k.transpose(1, 2) / 4.0, dim=-1) @ v
        expected = attn_single.proj(attn_single.out_proj["ndvi"](a).transpose(1, 2).reshape(1, 16, 4, 4))
        torch.testing.assert_close(attn_single(rgb, {"ndvi": ndvi}), expected, rtol=1e-4, atol=1e-5)


def test_keys_and_values_are_pooled_to_a_bounded_token_count(monkeypatch):
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.shape[-2], k.shape[-2]))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(fusion_mod.F, "scaled_dot_product_attention", spy)
    fusion = make_fusion("residual_cross_attention", {"rgb": RGB_CH, "ndvi": RGB_CH}, kv_pool_size=8, levels=[0, 2])
    fusion({m: feats(RGB_CH, size=128) for m in ("rgb", "ndvi")})
    # Level 0 of a 128 px feature map: 16k query tokens attend to 8x8 pooled tokens;
    # level 2 (32x32) likewise; levels 1 and 3 are not fused.
    assert seen == [(128 * 128, 64), (32 * 32, 64)]


def test_only_configured_levels_are_fused():
    channels = {"rgb": RGB_CH, "ndvi": RGB_CH}
    for name in ("concat_conv", "cross_attention"):
        fusion = make_fusion(name, channels, levels=[1, 3])
        inputs = {m: feats(RGB_CH, seed=i) for i, m in enumerate(channels)}
        out = fusion(inputs)
        assert out[0] is inputs["rgb"][0] and out[2] is inputs["rgb"][2]
        assert not torch.equal(out[1], inputs["rgb"][1])


def test_position_encoding_is_in_image_coordinates_shared_by_full_and_pooled_maps():
    # The centre cell of a 3x3 map and the single cell of a 1x1 map are the same place.
    torch.testing.assert_close(sine_position_encoding(3, 3, 16)[4], sine_position_encoding(1, 1, 16)[0])
    full = sine_position_encoding(8, 8, 16)
    assert full.shape == (64, 16) and torch.unique(full, dim=0).shape[0] == 64  # every cell distinct


@pytest.mark.parametrize("name,params,channels,message", [
    ("residual_cross_attention", {}, {"rgb": RGB_CH}, "needs at least one auxiliary modality"),
    ("concat_conv", {}, {"ndvi": RGB_CH, "nir": RGB_CH}, "uses 'rgb' as its reference"),
    ("none", {}, {"rgb": RGB_CH, "ndvi": RGB_CH}, "fusion 'none' takes one modality"),
    ("cross_attention", {"levels": [4]}, {"rgb": RGB_CH, "ndvi": RGB_CH}, r"levels \[4\] invalid"),
    ("cross_attention", {"num_heads": 3}, {"rgb": RGB_CH, "ndvi": RGB_CH}, "num_heads=3 does not divide"),
])
def test_bad_fusion_configs_are_clear_errors(name, params, channels, message):
    with pytest.raises(ValueError, match=message):
        make_fusion(name, channels, **params)
