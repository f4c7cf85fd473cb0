"""Checkpoint formats: Hugging Face safetensors folders (`hf`: `load_hf`,
`save_hf`; the tensor table in `hf_tensors`, the folder files in `hf_folder`),
PEFT adapter folders (`peft`) and gpt-oss's MXFP4 experts (`mxfp4`).

Imports `models`, `pallas_kernels` and the base modules of `swajax` (`dtypes`,
`sharding`, `text`); never `infer`, `training` or `cli`."""
