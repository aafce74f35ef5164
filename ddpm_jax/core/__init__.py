"""The DDPM math as pure functions: arrays in, arrays out.

No config objects, no backend, no I/O: `schedules` (betas and every coefficient derived from
them), `diffusion` (the forward process, prediction targets, the posterior and one reverse
step), `objectives` (the training loss), `likelihood` (the variational bound in bits/dim),
plus the name tables (`registry`) and the error every refusal raises (`errors`).
"""
