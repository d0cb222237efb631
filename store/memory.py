"""Process memory settings the store needs, applied when `store` is first imported, before LanceDB
starts its threads."""

import os

MALLOC_ARENAS = 2
"""glibc malloc arenas this process may use (PERSONA_MALLOC_ARENAS changes it). LanceDB writes from
many threads and glibc gives each its own arena by default (8 per core); their fragments made a
long ingest's resident memory creep up with every transaction (scale benchmark: 887 MiB after
600,000 users in 12 transactions, 548 MiB with 2 arenas, at the same speed)."""


def bound_malloc_arenas() -> None:
    """Cap glibc's arenas; a no-op off glibc. Arenas made before the call stay."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, int(os.environ.get("PERSONA_MALLOC_ARENAS") or MALLOC_ARENAS))  # -8: M_ARENA_MAX
    except (OSError, AttributeError, ValueError):
        pass
