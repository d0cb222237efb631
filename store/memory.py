"""The process memory setting the store needs: a cap on glibc's malloc arenas, set when `store` is
first imported, before LanceDB starts its threads."""

import os

MALLOC_ARENAS = 2
"""glibc malloc arenas this process may use (PERSONA_MALLOC_ARENAS changes it). LanceDB writes from
many threads and glibc gives each its own arena by default (8 per core); their fragments made a
long ingest's resident memory creep up with every transaction (600,000 users in 12 transactions:
887 MiB peak, 546 MiB with 2 arenas; set at the first write instead of at import, 707 MiB: the
arenas made before stay). Searches of a 200,000-user store took the same time either way (p50
5.99 / 5.98 / 6.03 ms capped, 5.91 / 5.92 / 6.04 not, alternating runs)."""


def bound_malloc_arenas() -> None:
    """Cap glibc's arenas from now on (arenas already made stay); a no-op off glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, int(os.environ.get("PERSONA_MALLOC_ARENAS") or MALLOC_ARENAS))  # -8: M_ARENA_MAX
    except (OSError, AttributeError, ValueError):
        pass
