"""Turning trajectories into updates: reward, advantages, losses, the train step and the trainer loop."""
