"""The agent SDK: declare an agent's skills and handlers; the SDK serves it."""

from agents.sdk.agent import Agent, AgentServices, SkillSpec, skill
from agents.sdk.brain import Brain, ChatModelBrain, load_brain

__all__ = ["Agent", "AgentServices", "Brain", "ChatModelBrain", "SkillSpec", "load_brain", "skill"]
