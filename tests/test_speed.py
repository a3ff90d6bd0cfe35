"""Speed switches (rts_thaw/models/speed.py): channels-last and torch.compile change how a detector
runs, not what it computes or how its checkpoints look; training and prediction take them from
their configs and refuse unknown parts before any work. torch.compile runs with its `aot_eager`
backend here (dynamo's graph capture and AOT autograd, without inductor's minutes of C++ builds
on a CPU); the GPU benchmarks use inductor."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from rts_thaw.core.checkpoints import read_checkpoint
from rts_thaw.models.checkpoint import detector_from_checkpoint
from rts_thaw.models.detector import build_detector
from rts_thaw.models.speed import COMPILABLE_PARTS, apply_speed, check_compile_parts, part_modules
from rts_thaw.training.optim import build_optimizer
from rts_thaw.training.single_run import fit_and_test

from model_parts import part
from tiny_run import compose_train, tiny_overrides

CHANNELS = {"rgb": 3, "ndvi": 1, "nir": 1}
FAST_COMPILE = {"backend": "aot_eager"}


def small_detector(seed: int = 0):
    torch.manual_seed(seed)
    return build_detector(CHANNELS, part("encoder", "mvitv2_micro"), part("fusion", "gated_local_attention"),
                          part("heads", "cascade_light"), img_size=64)


def batch(size: int = 64):
    g = torch.Generator().manual_seed(1)
    images = {m: torch.randn(2, c, size, size, generator=g) for m, c in CHANNELS.items()}
    boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]])
    masks = torch.zeros(2, size, size, dtype=torch.uint8)
    masks[0, 6:40, 4:30] = 1
    masks[1, 10:50, 20:60] = 1
    targets = [{"boxes": boxes, "labels": torch.ones(2, dtype=torch.int64), "masks": masks} for _ in range(2)]
    return images, [(size, size)] * 2, targets


def test_every_part_names_modules_of_the_detector():
    detector = small_detector()
    counts = {name: len(part_modules(detector, name)) for name in COMPILABLE_PARTS}
    stages = detector.roi_heads.num_stages
    assert counts == {"encoders": 3, "fusion": 1, "neck": 1, "rpn_head": 1, "box_heads": 2 * stages, "mask_head": 1}


def test_unknown_parts_are_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"training.speed.compile=\['fpn'\]: unknown part\(s\) \['fpn'\]; choose from"):
        check_compile_parts(["fpn"], "training.speed.compile")
    assert check_compile_parts(None) == []


@pytest.mark.parametrize("switches", [{"channels_last": True},
                                      {"compile": list(COMPILABLE_PARTS), "compile_options": FAST_COMPILE},
                                      {"channels_last": True, "compile": ["fusion", "mask_head"],
                                       "compile_options": FAST_COMPILE}])
def test_switches_keep_the_losses_the_gradients_and_the_checkpoint_keys(switches):
    plain, fast = small_detector(), small_detector()
    apply_speed(fast, **switches)
    assert list(fast.state_dict()) == list(plain.state_dict())  # checkpoints load both ways
    images, sizes, targets = batch()
    losses = {}
    for name, detector in (("plain", plain), ("fast", fast)):
        detector.train()
        torch.manual_seed(3)  # the same proposal and RoI sampling
        out = detector(images, sizes, targets)
        sum(out.values()).backward()
        losses[name] = out
    for key, value in losses["plain"].items():
        assert torch.allclose(value, losses["fast"][key], rtol=1e-4, atol=1e-5), key
    fast_grads = dict(fast.named_parameters())
    for name, param in plain.named_parameters():
        if param.grad is not None:
            assert torch.allclose(param.grad, fast_grads[name].grad, rtol=1e-3, atol=1e-5), name
    plain.eval(), fast.eval()
    with torch.no_grad():
        expected, got = plain(images, sizes)[0], fast(images, sizes)[0]
    assert torch.allclose(expected["scores"], got["scores"], atol=1e-5)
    assert torch.allclose(expected["boxes"], got["boxes"], atol=1e-3)


def test_the_switches_take_effect():
    """Channels-last moves the convolution weights to NHWC; compile hands each chosen part's forward
    to torch.compile (a backend that records the graphs it is given stands in for inductor)."""
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    detector = apply_speed(small_detector(), channels_last=True, compile=["neck", "mask_head"],
                           compile_options={"backend": recording_backend})
    conv = detector.roi_heads.mask_head.layers[0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    images, sizes, targets = batch()
    detector.train()
    detector(images, sizes, targets)
    assert len(graphs) >= 2  # at least one graph of the FPN and one of the mask head
    plain = small_detector()
    plain.train()
    plain(images, sizes, targets)
    assert not plain.roi_heads.mask_head.layers[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_bfloat16_autocast_trains_and_returns_float32_detections():
    detector = small_detector()
    images, sizes, targets = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = detector(images, sizes, targets)
        sum(losses.values()).backward()
        detector.eval()
        with torch.no_grad():
            detections = detector(images, sizes)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    for key in ("boxes", "scores", "masks"):  # what evaluation and mapping read
        assert detections[0][key].dtype == torch.float32, key


def test_fused_adamw_is_asked_for():
    model = torch.nn.Linear(4, 2)
    optimizer, _ = build_optimizer(model, lr=0.1, weight_decay=0.0, fused=True)
    assert optimizer.defaults["fused"] is True
    plain, _ = build_optimizer(model, lr=0.1, weight_decay=0.0)
    assert not plain.defaults["fused"]


@pytest.mark.slow  # real Lightning training with every switch and bf16, then prediction with them
def test_training_and_prediction_run_with_the_switches(tiny_world_config, tmp_path):
    # bf16 with the fused optimizer: Lightning's mixed-precision plugin alone would refuse to clip
    speed = ["trainer.precision=bf16-mixed", "training.speed.channels_last=true", "training.speed.fused_optimizer=true",
             "training.speed.compile=[fusion,neck,box_heads,mask_head]",
             "+training.speed.compile_options={backend: aot_eager}"]
    overrides = tiny_overrides(tiny_world_config, tmp_path / "cache", experiment="end_to_end_fusion", epochs=1,
                               logger="none")
    results = fit_and_test(compose_train([*overrides, *speed]), tmp_path / "run")
    assert results["global_step"] == 2 and "segm_AP50" in results["test"]
    # the checkpoint is an ordinary one: a detector without the switches loads it
    checkpoint = read_checkpoint(results["last_checkpoint"], "test")
    detector = detector_from_checkpoint(checkpoint)
    assert set(detector.state_dict()) == {k[len("detector."):] for k in checkpoint["state_dict"]}

    scenes = tiny_world_config["path"]
    done = subprocess.run([sys.executable, "-m", "rts_thaw.predict", f"ckpt_path={results['last_checkpoint']}",
                           f"scenes={scenes}", f"output_dir={tmp_path / 'maps'}", "device=cpu", "progress=false",
                           "tiling.overlap=16",
                           "speed.channels_last=true", "speed.compile=[fusion,box_heads]",
                           "+speed.compile_options={backend: aot_eager}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "maps").glob("*.gpkg"))


@pytest.mark.faults
def test_unknown_compile_parts_stop_training_and_prediction_before_any_work(tmp_path):
    for module, setting in (("rts_thaw.train", "training.speed.compile=[fpn]"),
                            ("rts_thaw.predict", "speed.compile=[fpn]")):
        extra = ["ckpt_path=none.ckpt", f"scenes={tmp_path / 'none.yaml'}"] if module == "rts_thaw.predict" else []
        done = subprocess.run([sys.executable, "-m", module, setting, *extra], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300, env={"RTS_THAW_LOG_DIR": str(tmp_path / "out"),
                                                           "RTS_THAW_CACHE": str(tmp_path / "cache"),
                                                           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
        assert done.returncode != 0
        assert "unknown part(s) ['fpn']" in done.stderr, done.stderr[-2000:]
        assert not (tmp_path / "cache").exists()  # no world was generated
