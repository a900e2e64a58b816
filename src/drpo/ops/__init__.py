"""drpo.ops"""
