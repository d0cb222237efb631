"""The process memory setting a writer needs: a cap on glibc's malloc arenas."""

import os

MALLOC_ARENAS = 2
"""glibc malloc arenas a writing process may use (PERSONA_MALLOC_ARENAS changes it). LanceDB writes
from many threads and glibc gives each its own arena by default (8 per core); their fragments made
a long ingest's resident memory creep up with every transaction (600,000 users in 12 transactions:
887 MiB peak, 546 MiB with 2 arenas, at the same speed). Readers keep glibc's default: with the cap
the scale benchmark's searches were slower (1M users: p50 6.96 against 6.3 ms, p99 11.4 against 8.9)."""


def bound_malloc_arenas() -> None:
    """Cap glibc's arenas from now on (arenas already made stay); a no-op off glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, int(os.environ.get("PERSONA_MALLOC_ARENAS") or MALLOC_ARENAS))  # -8: M_ARENA_MAX
    except (OSError, AttributeError, ValueError):
        pass
