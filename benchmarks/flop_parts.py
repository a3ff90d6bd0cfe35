"""FLOPs of one forward + backward, split by the model's parts (benchmarks/bench_train_step.py --flops)."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_backward_flop_count, sdpa_flop_count

# Two corrections to FlopCounterMode's formulas (torch 2.14): it has none for the CPU kernels of
# scaled_dot_product_attention (the fusion's attention would count 0 on CPU), so these get the
# formulas of the CUDA kernels; and it counts the weight gradient of a grouped convolution as if
# the convolution were dense (x groups: the MViTv2 encoders' depthwise pooling convolutions), so
# each gradient a convolution's backward computes counts what its forward does.
FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *_, out_shape=None, **__: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad_out, q, k, v, *_, out_shape=None, **__: sdpa_backward_flop_count(grad_out, q, k, v),
    torch.ops.aten.convolution_backward:
        lambda grad_out, x, w, _bias, _stride, _padding, _dilation, transposed, _output_padding, _groups, output_mask,
        out_shape=None, **__: sum(output_mask[:2]) * conv_flop_count(x, w, grad_out, transposed),
}


class FlopParts:
    """FLOPs of one forward + backward, split by part, forward and backward separately.

    FlopCounterMode counts every op; its running total is read each time the part changes.
    Forward: module pre/post hooks delimit each part's forward (the innermost part wins).
    Backward: each autograd node is charged to the innermost part whose forward created it
    (by the node's sequence number, which grows with creation order) through a hook that runs
    just before the node. FlopCounterMode's own per-module table is not used: it charges a
    backward op to every module whose backward has started and not ended by its input-gradient
    hook, so a module whose input feeds several others (box_roi_pool on the FPN features)
    is credited with the heads' convolutions.
    """

    def __init__(self, model: torch.nn.Module, parts: dict[str, tuple[str, ...]]):
        self.counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
        self.names = list(parts) + ["other"]
        self.flops = {name: [0, 0] for name in self.names}  # [forward, backward]
        self.stack, self.spans, self.last, self.backward_part = [("other", 0)], [], 0, "other"
        self._probe = torch.zeros(1, requires_grad=True)
        self.handles = []
        for name, paths in parts.items():
            for path in paths:
                module = model.get_submodule(path)
                members = module.values() if isinstance(module, torch.nn.ModuleDict) else (
                    module if isinstance(module, torch.nn.ModuleList) else [module])
                for member in members:
                    self.handles += [member.register_forward_pre_hook(lambda *_, name=name: self._enter(name)),
                                     member.register_forward_hook(lambda *_: self._exit())]

    def _sequence_nr(self) -> int:  # the number the next autograd node will get
        with torch.enable_grad():
            return self._probe.view_as(self._probe).grad_fn._sequence_nr() + 1

    def _charge(self, part: str, phase: int) -> None:
        total = self.counter.get_total_flops()
        self.flops[part][phase] += total - self.last
        self.last = total

    def _enter(self, name: str) -> None:
        self._charge(self.stack[-1][0], 0)
        self.stack.append((name, self._sequence_nr()))

    def _exit(self) -> None:
        name, start = self.stack.pop()
        self._charge(name, 0)
        self.spans.append((start, self._sequence_nr(), name))

    def _part_of(self, node) -> str:
        nr = node._sequence_nr()
        inside = [(end - start, name) for start, end, name in self.spans if start <= nr < end]
        return min(inside)[1] if inside else "other"

    def _before_node(self, part: str) -> None:
        self._charge(self.backward_part, 1)
        self.backward_part = part

    def count(self, forward) -> dict[str, list[int]]:
        """Run `forward` (returns the loss) and its backward; FLOPs per part, [forward, backward]."""
        with self.counter:
            loss = forward()
            self._charge(self.stack[-1][0], 0)
            todo, seen = [loss.grad_fn], set()
            while todo:  # every node of the graph gets a hook that names its part
                node = todo.pop()
                if node is None or node in seen:
                    continue
                seen.add(node)
                node.register_prehook(lambda *_, part=self._part_of(node): self._before_node(part))
                todo += [n for n, _ in node.next_functions]
            loss.backward()
            self._charge(self.backward_part, 1)
        for handle in self.handles:
            handle.remove()
        if sum(sum(v) for v in self.flops.values()) != self.counter.get_total_flops():
            raise AssertionError("FLOPs per part do not add up to FlopCounterMode's total")
        return self.flops
