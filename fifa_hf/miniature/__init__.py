"""FiFA's claim in miniature: Diffusion-DPO on FiFA subsets of the synthetic world, judged by its truth."""
