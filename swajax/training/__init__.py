"""Training: the run's settings (`config`), its data (`data`), the optimizer
(`optimizer`), the model and train state it starts from (`state`), the jitted
steps (`step`), the run folder and its guards (`run_folder`), checkpoints
(`checkpoint`), metrics (`metrics`) and the loop (`loop`: `train`).

Imports `models`, `pallas_kernels`, the base modules of `swajax`, `io` and
`infer`; never `cli`."""
