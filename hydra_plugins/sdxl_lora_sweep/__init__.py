"""Hydra plugins of sdxl-lora-sweep. Hydra 1.3 loads sweeper and launcher classes only from the `hydra_plugins`
namespace package, so these thin classes live here and delegate to `sweep` (imported only when used)."""
