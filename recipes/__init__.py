"""The library layer: every method and building block, usable from Python without the CLI.

Nothing here prints or imports typer; long work reports through a `Progress` callback.
"""

from store import StoreError as PersonaError

__all__ = ["PersonaError"]
