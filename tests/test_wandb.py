"""`logger=wandb` with no account: an offline run whose files hold config, metrics and images."""

import json
import struct
import time
from pathlib import Path

import pytest
from wandb.proto import wandb_internal_pb2

from rts_thaw.training.single_run import fit_and_test

from tiny_run import compose_train, tiny_overrides


def wandb_records(path):
    """The protobuf records of an offline `.wandb` file (a LevelDB-style log of 32 KiB blocks)."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, pending = 7, b""  # after the file's 7-byte identifier
    while position + 7 <= len(data):
        left_in_block = 32768 - position % 32768
        if left_in_block < 7:  # block trailer: padding
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:  # zero fill to the end of the block
            position += left_in_block
            continue
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full, first / middle, last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_logs_offline_without_an_api_key(tiny_world_config, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    cfg = compose_train(tiny_overrides(tiny_world_config, tmp_path / "cache", experiment="unimodal", epochs=1,
                                       logger="wandb") + ["trainer.log_every_n_steps=1"])
    run_dir = tmp_path / "run"
    with caplog.at_level("WARNING"):
        results = fit_and_test(cfg, run_dir)
    assert "logging offline" in caplog.text

    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    # The W&B service writes the file in the background; its last record is `exit`.
    deadline = time.time() + 60
    while time.time() < deadline:
        records = list(wandb_records(run_file))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.5)
    group, config, logged = None, {}, {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            group = record.run.run_group
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            logged.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    assert group == "unimodal"
    assert config["model"]["encoder"]["name"] == "mvitv2_micro" and config["data"]["modalities"] == ["rgb"]
    assert logged["params/total"] == results["params/total"] > 0
    assert logged["params/trainable"] == results["params/trainable"]
    assert logged["test/segm_AP50"] == pytest.approx(results["test"]["segm_AP50"], rel=1e-6)  # float32
    for key in ("val/segm_AP50", "train/loss", "train/loss_mask", "perf/train_images_per_s", "perf/wall_s"):
        assert key in logged, key
    assert logged["val/predictions/_type"] == "images/separated"
    assert list(run_file.parent.glob("files/media/images/val/predictions_*.png"))
