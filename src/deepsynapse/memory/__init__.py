"""Episodic memory of past rollouts, per problem, across epochs (white paper 3.9 / 3.17)."""

from deepsynapse.memory.episodic import Attempt, EpisodicMemory

__all__ = ["Attempt", "EpisodicMemory"]
