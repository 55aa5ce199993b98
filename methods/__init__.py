"""Method adapters (one file per method), their registry, the backbones and the diffusion math."""
