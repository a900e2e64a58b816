"""drpo.rewards"""
