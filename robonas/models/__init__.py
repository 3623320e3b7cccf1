"""What robonas learns from robots: device profiles and layer costs, the latency model and its
calibration on BENCH timings (with the probes that measure them), the sim-to-real gap model and
its calibration on real returns, and `recalibrate`, which turns stored reports into new model
versions and re-ranks a study with them.

No module here imports torch at import time.
"""
