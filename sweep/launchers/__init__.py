"""How a sweep's jobs run: processes (one per GPU), packs in one process, a Ray cluster; and finding a sweep's
folder again to resume it."""
