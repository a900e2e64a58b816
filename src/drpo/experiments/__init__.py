"""drpo.experiments"""
