"""One torch thread for these tiny models: on a shared 2-core machine more threads only oversubscribe."""

from tessera_testing import one_torch_thread  # noqa: F401  (an autouse fixture)
