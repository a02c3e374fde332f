"""Experiments built on the library: the demo (demo) and the LAMA benchmark (lama/).

May import every other package; nothing imports it but the CLI.
"""
