"""drpo.evaluation"""
