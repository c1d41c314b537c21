"""GRPO with verifiable rewards on Ray (Anomaly-R1's reinforcement-learning stage).

- ``grpo``: the formulas (group advantages, clipped policy loss and its aggregations, KL
  penalties, the train/inference log-prob mismatch and its truncated importance weights).
- ``rollout``: one vLLM rollout worker (G samples per prompt, versioned weight updates).
- ``pool``: N rollout workers as Ray actors, with replacement of dead ones.

Importing this package imports neither torch, Ray nor vLLM.
"""
