"""drpo.integrations"""
