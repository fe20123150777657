"""GRPO reward functions: the interface and combination (base), verifiers, format checks, safety rewards,
judge-graded rubric rewards, and a registry that builds them from config."""

from angelmed.rewards.base import RewardFn, WeightedReward, acombine, combine, reward_stats
from angelmed.rewards.registry import REWARDS, build_reward, build_rewards, register

__all__ = ["RewardFn", "WeightedReward", "acombine", "combine", "reward_stats", "REWARDS", "build_reward",
           "build_rewards", "register"]
