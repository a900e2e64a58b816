"""drpo.training"""
