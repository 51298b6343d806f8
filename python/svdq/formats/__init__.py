"""Other projects' checkpoint layouts, converted exactly (permutations only) to and from svdq's canonical one.

`svdq.formats.nunchaku`: Nunchaku / DeepCompressor SVDQuant INT4 files (docs/formats.md).
"""
