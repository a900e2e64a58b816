"""Definitions shared across layers."""

MU_TAIL = 0.01  # the long tail: sampled tokens with probability below this (the DRPO paper reports their share)
