"""Inference: the jitted prefill and decode steps over rolling KV caches
(`generation`) and next-token sampling (`sampling`).

Imports `models`, `pallas_kernels`, the base modules of `swajax` and `io`;
never `training` or `cli`."""
