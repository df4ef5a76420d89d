"""An exponential moving average (EMA) of a network's weights, updated after every optimizer step.

The average covers the parameters and the batch-norm running statistics (as timm's ModelEmaV2), so
the averaged network is used as it is, with no extra pass to re-estimate its statistics. The decay
is warmed up as in TensorFlow's ExponentialMovingAverage, min(decay, (1 + t) / (10 + t)), so the
first steps' random weights fade out quickly. One fused `_foreach_lerp_` per step: on CUDA a few
kernels, nothing waiting for the GPU.
"""

import copy

import torch


class WeightEMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._bind(model)

    def _bind(self, model: torch.nn.Module) -> None:
        """Pair each float tensor of the average with the live network's (same objects every step)."""
        ours, theirs = self.module.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
        floats = [k for k in ours if ours[k].is_floating_point()]
        self._averages, self._live = [ours[k].data for k in floats], [theirs[k].data for k in floats]
        self._others = [(ours[k].data, theirs[k].data) for k in ours if not ours[k].is_floating_point()]

    def decay_at(self, updates: int) -> float:
        return min(self.decay, (1 + updates) / (10 + updates))

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        weight = 1.0 - self.decay_at(self.updates)
        torch._foreach_lerp_(self._averages, self._live, weight)  # average += (live - average) * weight
        for average, value in self._others:  # batch-norm step counters
            average.copy_(value)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])  # copies in place: the pairs stay bound
        self.updates = state["updates"]
