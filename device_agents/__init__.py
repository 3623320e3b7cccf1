"""device_agents: what runs on the robot.

Imports only the standard library, numpy, pyserial, cryptography and a TFLite interpreter
(`tflite_runtime` or `ai_edge_litert`). Never torch, pybullet, gymnasium, `robonas` or `sim`
(except the sim-backed robot twin, which imports `sim` lazily when chosen).
"""

from __future__ import annotations

__version__ = "0.1.0"
