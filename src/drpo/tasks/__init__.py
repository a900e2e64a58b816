"""drpo.tasks"""
