"""drpo.models"""
