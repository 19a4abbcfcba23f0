"""Models: a model reference → an `nn.Module` built where the meter counts it.

- `load`: `build_model(spec, device)` for every kind of reference: `builtin:`, `preset:`, `hf:` (a config
  only), inline configs, allow-listed `factory:`.
- `reference`: `check_reference(spec)` (the door's check) and what else reads a reference without building
  it (its config fields, its weights' bytes, its LoRA targets); no torch.
- `presets`: the published architecture configs shipped by name (random weights: memory needs none).
- `hub`: `hf:org/name[@revision]` → its config.json only, through huggingface_hub's cache.
- `quantization`: QLoRA's base as users load it (bitsandbytes 4/8-bit), for real and under fake tensors.
- `bounds`: what a reference may build (parameters, layers, widths), checked before anything is built.
- `builtin_gpt`: the plain-torch GPTs that need no transformers; `builtin_config`: their sizes, no torch.

The face imports nothing: `fitprobe --help` and the service's door name these without importing torch.
"""
