"""ReconLoop wire protocol: message schemas, validation, codec, limits, versions.

Pure Python + numpy + msgpack, so it runs inside Blender (Python 3.11 and 3.13) without torch.
"""
