"""The estimate: THE training step under fake tensors, counting bytes and allocating nothing.

- `fake`: `EstimateMeter`, the CPU meter's count on fake tensors (rounded as the CUDA allocator rounds).
- `cache_key`: fake mode's dispatch cache keyed without a dataclass per tensor: the same key, a trial 5-16 % sooner.
- `fast_outputs`: the cache's hits answered without fake tensors' general constructor: the same tensors, a few % more.
- `cuda_attention`: attention as a named card's CUDA kernels run it, on any host.
- `recompute`: gradient checkpointing's recomputation under the modes its forward ran under.
- `extrapolate`: a deep decoder from two shallow cuts of its repeating layers, to the byte.
- `replay`: trials replayed from the size laws of a few traced ones (the what-if table's speed).
- `estimator`: the estimate asked beside a real probe (the first micro-batch to try) and when nothing fits.
- `generate_reads`: the values `model.generate` reads, answered for fitprobe's own prompts (generation estimated).
- `fallback`: `Fallback`, the one exception by which a shortcut (`extrapolate`, `replay`) says why it does
  not apply; the caller that chose the shortcut catches it and runs the plain path.
The face imports nothing, so importing one part costs only that part. For people: docs/estimate-internals.md.
"""
