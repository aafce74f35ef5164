"""The runtime: what makes the pure step and sampler run on a backend and a mesh.

`sharding` (the (data, fsdp) mesh and where each array lives), `network` (the registered net
bound to this backend's layer implementations, as pure functions over parameters),
`compiled_step` (the train step compiled with the backend policy: micro-batches, compiler
options, steps per call, the memory check), `compiled_sampler` (a sampler plan compiled for
the mesh) and `memory` (what a compiled program and the process need). The backend policy
itself is `ddpm_jax.ops`.
"""
