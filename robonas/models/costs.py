"""Cost figures of one network layer: parameters, multiply-accumulates and memory traffic.

`PolicyArch` (robonas/space.py) reports a list of these for its actor, layer by layer; the
latency models (robonas/models/latency_model.py) turn them into milliseconds for a device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class LayerCost:
    """Exact counts for one layer of a batch-1 forward pass.

    name:    stable label, e.g. "fc0", "ln0", "act0", "skip0", "head"
    kind:    "linear" | "layernorm" | "activation" | "add"
    params:  trainable parameters (weights + biases + norm affine)
    macs:    multiply-accumulates (a Linear(i, o) has i*o)
    act_in:  input activation elements read
    act_out: output activation elements written
    """

    name: str
    kind: str
    params: int
    macs: int
    act_in: int
    act_out: int

    def bytes_moved(self, elem_bytes: int = 4) -> int:
        """Bytes read and written: parameters plus input and output activations."""
        return elem_bytes * (self.params + self.act_in + self.act_out)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def totals(costs: list[LayerCost], elem_bytes: int = 4) -> dict[str, int]:
    """Sum of params, MACs and bytes moved over layers."""
    return {
        "params": sum(c.params for c in costs),
        "macs": sum(c.macs for c in costs),
        "bytes": sum(c.bytes_moved(elem_bytes) for c in costs),
        "layers": len(costs),
    }
