"""The search half of the loop: the ask/train/score/tell loop, trial executors, the trial worker,
PPO/SAC training of one candidate and its learning-curve figures.

Import the modules themselves (`robonas.search.loop`, `robonas.search.training`, ...): this
package re-exports nothing, so a trial's worker process imports only what it runs.
"""
