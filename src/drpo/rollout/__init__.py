"""drpo.rollout"""
