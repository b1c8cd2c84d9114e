"""GRPO-style RL in four phases: rollout -> reward -> advantage -> update (one module each)."""
