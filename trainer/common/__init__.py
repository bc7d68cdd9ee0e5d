"""The bottom layer: user errors, log keys, atomic files. Imports nothing of trainer."""
