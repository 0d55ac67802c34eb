"""``python -m protocol``: regenerate the op tables of protocol/README.md from protocol/schemas.py."""

import os

from .schemas import update_readme

readme = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
print(f"{readme}: {'updated' if update_readme(readme) else 'already current'}")
