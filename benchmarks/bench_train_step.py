"""One training step: staged 3-modality cascade (frozen encoders) vs the same end to end vs
torchvision's maskrcnn_resnet50_fpn on RGB, side by side in one run.

    python benchmarks/bench_train_step.py                      # CPU, 256 px, batch 8
    python benchmarks/bench_train_step.py --device cuda --size 512
    python benchmarks/bench_train_step.py --device cuda --size 512 --precision bf16-mixed
    python benchmarks/bench_train_step.py --size 512 --batch 2 --models staged_cascade,end_to_end_cascade \
        --fusion residual_cross_attention,gated_local_attention    # fusions side by side
    python benchmarks/bench_train_step.py --device cuda --size 512 --heads cascade_2fc --flops \
        --models staged_cascade,torchvision_maskrcnn_r50 --peer-settings fp32,bf16 \
        --settings fp32,bf16,bf16+fused,bf16+fused+channels_last,bf16+fused+channels_last+compile

Each model runs in its own fresh process so that its peak memory is its own:
on CUDA `torch.cuda.max_memory_allocated`; on CPU the process's peak resident set
size (ru_maxrss), reported as the growth over the RSS just before the first step
(model and inputs already built), and as the absolute peak.
`--settings` lists the speed settings our models run with, each a row: `fp32` (float32; on
CUDA with TF32 matrix products, as `torch.set_float32_matmul_precision("high")` sets) or `bf16`
(autocast to bfloat16, Lightning's `bf16-mixed`), plus any of `fused` (fused AdamW),
`channels_last` and `compile` (torch.compile of `--compile-parts`), joined by `+`: the switches
of `training.speed` (rts_thaw/models/speed.py). `--peer-settings` does the same for torchvision's
model (no `compile`). `--precision` is the older way to give one precision to every model.
`--flops` also counts, after the timed steps and untimed, the FLOPs of one more training step's
forward and backward (torch.utils.flop_counter.FlopCounterMode: matrix products, convolutions
and attention, 2 FLOPs per multiply-add; no optimiser step), per image, split by part (FlopParts),
and each row's sustained rate, TFLOPS = images/s x FLOPs per image (the arithmetic of a step does
not depend on its speed settings, so each model is counted once, in its first uncompiled row).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from importlib.resources import files

import torch
from omegaconf import OmegaConf

from flop_parts import FlopParts  # benchmarks/flop_parts.py, beside this script

MODELS = ("staged_cascade", "end_to_end_cascade", "torchvision_maskrcnn_r50")
PEER = "torchvision_maskrcnn_r50"
SWITCHES = ("fused", "channels_last", "compile")


def parse_setting(text: str, peer: bool = False) -> dict:
    """`bf16+fused+compile` -> {"precision": "bf16-mixed", "fused": True, ...}; raises on unknown words."""
    words = text.split("+")
    precisions = {"fp32": "32", "32": "32", "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed"}
    if words[0] not in precisions:
        raise ValueError(f"setting {text!r} must start with a precision: {sorted(precisions)}")
    allowed = [w for w in SWITCHES if not (peer and w == "compile")]
    unknown = [w for w in words[1:] if w not in allowed]
    if unknown:
        raise ValueError(f"setting {text!r}: unknown {unknown}; switches are {allowed}")
    return {"precision": precisions[words[0]], **{w: w in words[1:] for w in SWITCHES}}
CHANNELS = {"rgb": 3, "ndvi": 1, "nir": 1}
# the top-level parts of each model whose forward time --breakdown reports
PARTS = {"torchvision_maskrcnn_r50": ("backbone", "rpn", "roi_heads")}
OUR_PARTS = ("encoders", "fusion", "neck", "rpn", "roi_heads")


class PartTimer:
    """Milliseconds per step spent in each part's forward (module hooks), in backward and in
    the optimiser step. On CUDA, events on the stream: a part that keeps the GPU waiting on
    Python is charged for the wait, which is what matters for the step time."""

    def __init__(self, model: torch.nn.Module, parts: tuple[str, ...], cuda: bool):
        self.cuda, self.open, self.spans, self.enabled = cuda, {}, [], False
        for name in parts:
            module = model.get_submodule(name)
            # a ModuleDict (one encoder per modality) is never called itself: time its members
            for member in module.values() if isinstance(module, torch.nn.ModuleDict) else [module]:
                member.register_forward_pre_hook(lambda *_, name=name: self.start(name))
                member.register_forward_hook(lambda *_, name=name: self.stop(name))

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self, name: str) -> None:
        if self.enabled:
            self.open[name] = self._now()

    def stop(self, name: str) -> None:
        if self.enabled:
            self.spans.append((name, self.open.pop(name), self._now()))

    def per_step_ms(self, steps: int) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        totals: dict[str, float] = {}
        for name, begin, end in self.spans:
            ms = begin.elapsed_time(end) if self.cuda else (end - begin) * 1000
            totals[name] = totals.get(name, 0.0) + ms / steps
        return totals


# --flops: the parts a step's FLOPs are split into, as module paths (a ModuleDict or ModuleList
# stands for its members); what no part's forward made (RoIAlign, losses, box coding) is "other".
FLOP_PARTS = {"encoders": ("encoders",), "fusion": ("fusion",), "neck": ("neck",), "rpn": ("rpn",),
              "box heads": ("roi_heads.box_heads", "roi_heads.box_predictors"), "mask head": ("roi_heads.mask_head",)}
TV_FLOP_PARTS = {"encoders": ("backbone.body",), "fusion": (), "neck": ("backbone.fpn",), "rpn": ("rpn",),
                 "box heads": ("roi_heads.box_head", "roi_heads.box_predictor"),
                 "mask head": ("roi_heads.mask_head", "roi_heads.mask_predictor")}
def conf(*parts: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(str(files("rts_thaw.conf").joinpath(*parts))))


def synthetic_batch(batch: int, size: int, device: str, per_image: int = 4):
    """Random images with `per_image` box+mask instances each (the step cost, not accuracy, matters)."""
    g = torch.Generator().manual_seed(0)
    images = {m: torch.randn(batch, c, size, size, generator=g) for m, c in CHANNELS.items()}
    targets = []
    for _ in range(batch):
        xy = torch.randint(0, size - size // 4, (per_image, 2), generator=g).float()
        wh = torch.randint(size // 32 + 4, size // 4, (per_image, 2), generator=g).float()
        boxes = torch.cat([xy, xy + wh], dim=1)
        masks = torch.zeros(per_image, size, size, dtype=torch.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.long().tolist()):
            m[y0:y1, x0:x1] = 1
        targets.append({"boxes": boxes.to(device), "labels": torch.ones(per_image, dtype=torch.int64, device=device),
                        "masks": masks.to(device)})
    return {m: x.to(device) for m, x in images.items()}, targets


def build(name: str, args):
    if name == "torchvision_maskrcnn_r50":
        from torchvision.models.detection import maskrcnn_resnet50_fpn

        # min/max size = the tile size: no hidden resize, same pixels as ours.
        return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2,
                                     min_size=args.size, max_size=args.size)
    from hydra.utils import instantiate

    from rts_thaw.models.detector import build_detector

    encoder = conf("model", "encoder", f"{args.encoder}.yaml")
    encoder["frozen"] = name == "staged_cascade"
    parts = [instantiate(c) for c in (encoder, conf("model", "fusion", f"{args.fusion}.yaml"),
                                      conf("model", "heads", f"{args.heads}.yaml"))]
    return build_detector(CHANNELS, *parts, img_size=args.size)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_one(name: str, args) -> dict:
    from rts_thaw.models.speed import apply_speed

    torch.manual_seed(0)
    device = args.device
    setting = parse_setting(args.setting, peer=name == PEER)
    model = build(name, args).to(device).train()
    if name == PEER:
        if setting["channels_last"]:
            model.to(memory_format=torch.channels_last)
    else:  # the training runs' own switches
        options = {"mode": args.compile_mode} if args.compile_mode else {}
        apply_speed(model, setting["channels_last"], args.compile_parts.split(",") if setting["compile"] else (),
                    options)
    images, targets = synthetic_batch(args.batch, args.size, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True if setting["fused"] else None)
    sizes = [(args.size, args.size)] * args.batch

    timer = PartTimer(model, PARTS.get(name, OUR_PARTS), device.startswith("cuda")) if args.breakdown else None
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                              enabled=setting["precision"] == "bf16-mixed")

    def step():
        with autocast:
            if name == "torchvision_maskrcnn_r50":
                losses = model(list(images["rgb"]), targets)
            else:
                losses = model(images, sizes, targets)
        optimizer.zero_grad(set_to_none=True)
        if timer:
            timer.start("backward")
        sum(losses.values()).backward()
        if timer:
            timer.stop("backward")
            timer.start("optimizer")
        optimizer.step()
        if timer:
            timer.stop("optimizer")

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    rss_before = rss_mb()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    warmup_start = time.perf_counter()  # includes compiling, for a compiled row
    for _ in range(args.warmup):
        step()
    sync()
    warmup_seconds = time.perf_counter() - warmup_start
    if timer:
        timer.enabled = True
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    parts = timer.per_step_ms(args.steps) if timer else {}
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
        peak_abs = peak
    else:
        peak_abs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        peak = peak_abs - rss_before
    flops = {}
    if args.flops and not args.skip_flops and not setting["compile"]:  # one more step, untimed and after the memory readout: forward + backward only
        counter = FlopParts(model, TV_FLOP_PARTS if name == "torchvision_maskrcnn_r50" else FLOP_PARTS)
        if timer:
            timer.enabled = False

        def forward():
            with autocast:
                if name == "torchvision_maskrcnn_r50":
                    return sum(model(list(images["rgb"]), targets).values())
                return sum(model(images, sizes, targets).values())

        optimizer.zero_grad(set_to_none=True)
        try:  # a failed count does not cost the timing
            flops = {part: [f / args.batch / 1e9 for f in fb] for part, fb in counter.count(forward).items()}
        except Exception as err:  # noqa: BLE001
            print(f"{name}: FLOP count failed: {err!r}", file=sys.stderr)
    return {"model": name, "images_per_s": args.batch / seconds, "s_per_step": seconds, "peak_mb": peak,
            "peak_abs_mb": peak_abs, "trainable_M": sum(p.numel() for p in params) / 1e6,
            "total_M": sum(p.numel() for p in model.parameters()) / 1e6, "parts_ms": parts,
            "gflop_per_image": sum(sum(fb) for fb in flops.values()) if flops else float("nan"),
            "parts_gflop": flops, "warmup_s": warmup_seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 2 on CPU, 10 on CUDA)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--encoder", default="mvitv2_tiny", help="conf/model/encoder option (paper: mvitv2_tiny)")
    p.add_argument("--heads", default="cascade", help="conf/model/heads option (paper: cascade)")
    p.add_argument("--fusion", default="residual_cross_attention",
                   help="conf/model/fusion option, or several separated by commas: our models run once per fusion")
    p.add_argument("--models", default=",".join(MODELS), help=f"which of {', '.join(MODELS)} (comma-separated)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--precision", choices=("32", "bf16-mixed"), default="32",
                   help="one precision for every model (when --settings / --peer-settings are not given)")
    p.add_argument("--settings", help="our models' rows, comma-separated, e.g. fp32,bf16+fused+compile (see above)")
    p.add_argument("--peer-settings", help="torchvision's rows, e.g. fp32,bf16 (default: the first of --settings)")
    p.add_argument("--compile-parts", default="encoders,fusion,neck,rpn_head,box_heads,mask_head",
                   help="what `compile` compiles (rts_thaw.models.speed.COMPILABLE_PARTS)")
    p.add_argument("--compile-mode", help="torch.compile's mode (default: its own)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time each part's forward, the backward and the optimiser step (ms per step)")
    p.add_argument("--flops", action="store_true",
                   help="also count one step's forward+backward FLOPs per image (untimed), in total and by part")
    p.add_argument("--only", choices=MODELS, help=argparse.SUPPRESS)  # child-process mode
    p.add_argument("--setting", help=argparse.SUPPRESS)  # child-process mode
    p.add_argument("--skip-flops", action="store_true", help=argparse.SUPPRESS)  # child: another row counts
    args = p.parse_args()
    if args.steps is None:
        args.steps = 10 if args.device.startswith("cuda") else 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("high")  # TF32 on CUDA, as a GPU user would train; no effect on CPU
    if args.only:
        print(json.dumps(run_one(args.only, args)))
        return

    fusions = args.fusion.split(",")
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        p.error(f"unknown --models {unknown}; choose from {list(MODELS)}")
    settings = (args.settings or {"32": "fp32", "bf16-mixed": "bf16"}[args.precision]).split(",")
    peer_settings = (args.peer_settings or settings[0]).split(",")
    try:
        for text in settings:
            parse_setting(text)
        for text in peer_settings:
            parse_setting(text, peer=True)
    except ValueError as err:
        p.error(str(err))
    jobs = []  # (model, fusion, setting, row name)
    for name in models:
        for fusion in fusions if name != PEER else fusions[:1]:
            for setting in settings if name != PEER else peer_settings:
                label = name + (f" [{fusion}]" if name != PEER and len(fusions) > 1 else "")
                label += f" {setting}" if len(settings) > 1 or len(peer_settings) > 1 else ""
                jobs.append((name, fusion, setting, label))
    rows, counted = [], set()
    for name, fusion, setting, label in jobs:
        # the child's --only, --fusion and --setting come last, so they win over the parent's
        cmd = [sys.executable, __file__, *sys.argv[1:], "--only", name, "--fusion", fusion, "--setting", setting]
        if (name, fusion) in counted:  # one FLOP count per model (see above)
            cmd.append("--skip-flops")
        elif args.flops and "compile" not in setting.split("+"):
            counted.add((name, fusion))
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:  # say why, and go on with the other rows
            print(f"{label} failed:\n{out.stderr[-3000:]}", file=sys.stderr, flush=True)
            failed = float("nan")
            rows.append({"model": label + " (FAILED)", "name": name, "images_per_s": failed, "s_per_step": failed,
                         "peak_mb": failed, "peak_abs_mb": failed, "trainable_M": failed, "total_M": failed,
                         "gflop_per_image": failed, "warmup_s": failed, "setting": setting, "fusion": fusion})
            continue
        rows.append({**json.loads(out.stdout.strip().splitlines()[-1]), "model": label, "name": name,
                     "setting": setting, "fusion": fusion})
        r = rows[-1]  # the whole row at once, so that a run stopped before the table still says it
        print(f"  done {label}: {r['images_per_s']:.2f} img/s, {r['s_per_step']:.3f} s/step, {r['peak_mb']:.0f} MB, "
              f"{r['gflop_per_image']:.1f} GFLOP/img, warm-up {r['warmup_s']:.0f} s", file=sys.stderr, flush=True)
    if args.flops:  # a model's arithmetic is its first counted row's, whatever the setting
        for r in rows:
            counted = [c for c in rows if (c["name"], c["fusion"]) == (r["name"], r["fusion"])
                       and c["gflop_per_image"] == c["gflop_per_image"]]  # not NaN
            r["gflop_per_image"] = counted[0]["gflop_per_image"] if counted else float("nan")
            r["tflops"] = r["images_per_s"] * r["gflop_per_image"] / 1000

    mem = "peak CUDA memory allocated" if args.device.startswith("cuda") else "peak RSS growth during the steps"
    print(f"device={args.device} size={args.size} batch={args.batch} steps={args.steps} warmup={args.warmup} "
          f"encoder={args.encoder} heads={args.heads} fusion={args.fusion} settings={','.join(settings)} "
          f"peer settings={','.join(peer_settings)} compile parts={args.compile_parts} "
          f"threads={torch.get_num_threads()}")
    if args.device.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    extra = f" {'GFLOP/img':>10} {'TFLOPS':>7}" if args.flops else ""
    width = max(26, *(len(r["model"]) for r in rows))
    print(f"{'model':<{width}} {'img/s':>8} {'s/step':>8} {'mem MB':>9} {'abs MB':>8} {'train M':>8} {'total M':>8} "
          f"{'warm-up s':>9}{extra}")
    for r in rows:
        extra = f" {r['gflop_per_image']:>10.1f} {r['tflops']:>7.2f}" if args.flops else ""
        print(f"{r['model']:<{width}} {r['images_per_s']:>8.2f} {r['s_per_step']:>8.2f} {r['peak_mb']:>9.0f} "
              f"{r['peak_abs_mb']:>8.0f} {r['trainable_M']:>8.1f} {r['total_M']:>8.1f} {r['warmup_s']:>9.1f}{extra}")
    for r in rows:
        if r.get("parts_ms"):
            print(f"  {r['model']} ms/step: " + ", ".join(f"{k} {v:.1f}" for k, v in r["parts_ms"].items()))
    if args.flops:
        names = next((list(r["parts_gflop"]) for r in rows if r.get("parts_gflop")), [])
        print("GFLOP per image by part, forward / backward (torchvision: encoders = ResNet-50, neck = its FPN):")
        print(f"{'model':<{width}}" + "".join(f" {n:>13}" for n in names))
        for r in rows:
            if r.get("parts_gflop"):
                print(f"{r['model']:<{width}}" + "".join(f" {f'{f:.1f}/{b:.1f}':>13}" for f, b in r["parts_gflop"].values()))
    ours = [r for r in rows if r["name"] != PEER]
    peers = [r for r in rows if r["name"] == PEER]
    if len(fusions) > 1:  # each fusion against the first, model by model and setting by setting
        for r in ours:
            base = next(b for b in ours if (b["name"], b["setting"], b["fusion"]) == (r["name"], r["setting"], fusions[0]))
            if r is not base:
                print(f"{r['model']} / {base['model']}: time per step {r['s_per_step'] / base['s_per_step']:.2f}, "
                      f"memory ({mem}) {r['peak_mb'] / base['peak_mb']:.2f}")
    if len(settings) > 1:  # each setting against the first, model by model
        for r in ours:
            base = next(b for b in ours if (b["name"], b["fusion"], b["setting"]) == (r["name"], r["fusion"], settings[0]))
            if r is not base:
                print(f"{r['model']} / {settings[0]}: speed {r['images_per_s'] / base['images_per_s']:.2f}x, "
                      f"memory {r['peak_mb'] / base['peak_mb']:.2f}x")
    for r in ours:  # against the peer, each of its rows (the target: >= 1 against its float32)
        if peers:
            print(f"speed: {r['model']} / torchvision = "
                  + "; ".join(f"{r['images_per_s'] / t['images_per_s']:.2f} ({t['setting']})" for t in peers))
    staged = [r for r in ours if r["name"] == "staged_cascade"]
    e2e = [r for r in ours if r["name"] == "end_to_end_cascade"]
    if staged and e2e:  # the first setting of each, as before settings existed
        print(f"memory ({mem}): staged / end-to-end = {staged[0]['peak_mb'] / e2e[0]['peak_mb']:.2f} "
              f"(target <= 0.40 on GPU; paper 0.52); "
              f"speed: staged / end-to-end = {staged[0]['images_per_s'] / e2e[0]['images_per_s']:.2f}")
    if args.flops and peers:
        for r in ours:
            if r["setting"] == settings[0]:
                print(f"arithmetic (GFLOP per image, forward + backward): {r['model']} / torchvision = "
                      f"{r['gflop_per_image'] / peers[0]['gflop_per_image']:.2f}")


if __name__ == "__main__":
    main()
