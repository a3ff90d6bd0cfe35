"""Gated local cross-attention: window bookkeeping on odd sizes, attention within windows
only, the gate's identity start, and modalities left out per image."""
import math

import pytest
import torch

from rts_thaw.models.local_fusion import GatedLocalAttention, squared_offsets, window_merge, window_partition

from model_parts import make_fusion, part


@pytest.mark.parametrize("size", [(8, 8), (13, 11), (1, 1), (5, 17)])
@pytest.mark.parametrize("window", [1, 4, 8])
def test_window_partition_round_trips_and_marks_padding(size, window):
    x = torch.randn(2, 3, *size)
    tokens, real, grid = window_partition(x, window)
    nh, nw = math.ceil(size[0] / window), math.ceil(size[1] / window)
    assert grid == (nh, nw) and tokens.shape == (2, nh * nw, window * window, 3)
    assert int(real.sum()) == size[0] * size[1]  # every real cell once, padding marked
    assert (tokens.abs().sum(-1)[:, ~real] == 0).all()  # padded cells are zeros
    torch.testing.assert_close(window_merge(tokens, window, grid, size), x)


def _naive(attn: GatedLocalAttention, query, aux):
    """The same computation window by window, over the real cells only (no padding, no masks)."""
    _, c, h, w = query.shape
    win = min(attn.window_size, max(h, w))
    heads, d = attn.num_heads, c // attn.num_heads
    decay = torch.nn.functional.softplus(attn.decay)
    out = query.clone()
    for r0 in range(0, h, win):
        for c0 in range(0, w, win):
            rows, cols = range(r0, min(r0 + win, h)), range(c0, min(c0 + win, w))
            cells = [(r, cc) for r in rows for cc in cols]
            q_tok = torch.stack([query[0, :, r, cc] for r, cc in cells])  # [n, C]
            q = attn.q_proj(attn.q_norm(q_tok)).view(-1, heads, d).transpose(0, 1)
            dist = torch.tensor([[(a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2 for b in cells] for a in cells]).float()
            update = torch.zeros_like(q_tok)
            for mod, feat in aux.items():
                kv = attn.kv_norm[mod](torch.stack([feat[0, :, r, cc] for r, cc in cells]))
                k = attn.k_proj[mod](kv).view(-1, heads, d).transpose(0, 1)
                v = attn.v_proj[mod](kv).view(-1, heads, d).transpose(0, 1)
                logits = q @ k.transpose(1, 2) / math.sqrt(d) - decay[:, None, None] * dist
                a = (logits.softmax(-1) @ v).transpose(0, 1).reshape(-1, c)
                a = attn.out_proj[mod](a)
                update = update + torch.sigmoid(attn.gate[mod](torch.cat([q_tok, a], -1))) * a
            for i, (r, cc) in enumerate(cells):
                out[0, :, r, cc] = q_tok[i] + update[i]
    return out


@pytest.mark.parametrize("size", [(8, 8), (13, 11), (3, 5)])
def test_windowed_attention_equals_a_per_window_reference_on_odd_sizes(size):
    torch.manual_seed(0)
    attn = GatedLocalAttention(16, {"ndvi": 8, "nir": 8}, num_heads=4, window_size=4)
    with torch.no_grad():
        for layer in attn.out_proj.values():
            layer.weight.normal_(std=0.2)
    query = torch.randn(1, 16, *size)
    aux = {"ndvi": torch.randn(1, 8, *size), "nir": torch.randn(1, 8, *size)}
    with torch.no_grad():
        torch.testing.assert_close(attn(query, aux), _naive(attn, query, aux), rtol=1e-4, atol=1e-5)


def test_attention_stays_inside_its_window():
    torch.manual_seed(0)
    attn = GatedLocalAttention(16, {"ndvi": 16}, num_heads=4, window_size=4)
    with torch.no_grad():
        attn.out_proj["ndvi"].weight.normal_(std=0.2)
    query, ndvi = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8)
    changed = ndvi.clone()
    changed[..., 4:, 4:] = torch.randn(1, 16, 4, 4)  # only the bottom-right window's auxiliary features
    with torch.no_grad():
        a, b = attn(query, {"ndvi": ndvi}), attn(query, {"ndvi": changed})
    assert torch.equal(a[..., :4, :], b[..., :4, :]) and torch.equal(a[..., :, :4], b[..., :, :4])
    assert not torch.allclose(a[..., 4:, 4:], b[..., 4:, 4:])


def test_heads_start_local_to_contextual():
    attn = GatedLocalAttention(16, {"ndvi": 16}, num_heads=4, window_size=4)
    decay = torch.nn.functional.softplus(attn.decay)
    assert decay[0] > decay[1] > decay[2] > decay[3] > 0
    assert squared_offsets(2).tolist() == [[0, 1, 1, 2], [1, 0, 2, 1], [1, 2, 0, 1], [2, 1, 1, 0]]


def test_a_missing_modality_is_left_out_per_image_not_faked():
    torch.manual_seed(0)
    channels = {"rgb": [16, 32], "ndvi": [16, 32], "nir": [16, 32]}
    for name in ("gated_local_attention", "residual_cross_attention"):
        fusion = make_fusion(name, channels, levels=[0, 1], num_heads=4)
        with torch.no_grad():
            for attn in fusion.attn.values():
                for layer in attn.out_proj.values():
                    layer.weight.normal_(std=0.2)
        inputs = {m: [torch.randn(2, c, 8 // 2 ** i, 8 // 2 ** i) for i, c in enumerate(ch)]
                  for m, ch in channels.items()}
        available = {"ndvi": torch.tensor([True, False])}
        with torch.no_grad():
            mixed = fusion(inputs, available)
            # Image 1 without NDVI equals a fusion that never saw NDVI (NDVI's weights unused).
            without = make_fusion(name, {"rgb": [16, 32], "nir": [16, 32]}, levels=[0, 1], num_heads=4)
            without.load_state_dict(fusion.state_dict(), strict=False)
            alone = without({m: inputs[m] for m in ("rgb", "nir")})
            full = fusion(inputs)
        for lvl in range(2):
            torch.testing.assert_close(mixed[lvl][1], alone[lvl][1], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(mixed[lvl][0], full[lvl][0], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(mixed[0][1], full[0][1])


def test_modality_dropout_withholds_auxiliary_modalities_at_its_rate():
    from rts_thaw.models.detector import build_detector
    from rts_thaw.training.module import DetectionModule

    def detector(fusion):
        return build_detector({"rgb": 3, "ndvi": 1, "nir": 1}, part("encoder", "mvitv2_micro"),
                              part("fusion", fusion), part("heads", "cascade_light"), 64)

    module = DetectionModule(detector("gated_local_attention"), modality_dropout=0.3)
    assert module.droppable == ["ndvi", "nir"]  # never the RGB query
    torch.manual_seed(0)
    batch = {"image": {"rgb": torch.zeros(4, 3, 64, 64)}, "image_sizes": [(64, 64)] * 4}
    drawn = torch.stack([torch.stack(list(module._dropped(batch).values())) for _ in range(500)])
    assert abs(1 - drawn.float().mean().item() - 0.3) < 0.03
    assert DetectionModule(detector("gated_local_attention"))._dropped(batch) is None  # off by default
    for stacked in ("data_level", "stacked_gated_local_attention"):  # their stacked encoder learns the gap
        assert DetectionModule(detector(stacked), modality_dropout=0.3).droppable == ["ndvi", "nir"]
    with pytest.raises(ValueError, match="modality_dropout=0.3 needs a model that can learn to run without"):
        DetectionModule(detector("concat_conv"), modality_dropout=0.3)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        DetectionModule(detector("gated_local_attention"), modality_dropout=1.0)
