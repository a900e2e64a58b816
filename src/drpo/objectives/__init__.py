"""drpo.objectives"""
