"""Training: the loop, checkpoints, and the data of the built-in tasks.

This package uses lorakit's public API like any user would; the library never imports it.
"""
