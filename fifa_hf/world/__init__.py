"""The synthetic world: a Pick-a-Pic whose truth is known, and everything that measures FiFA against it.

``synthetic`` makes the data (prompts, rendered images, labels), ``true_reward`` reads what an image
shows back from its pixels, ``world_model`` is a tiny text-to-image model of the world, ``demo`` compares
selection methods against the truth, ``miniature`` trains on their subsets and ``gradient_noise``
measures how much of a training step on them is signal. The library's lower
layers never import this package; the true reward reaches ``load_reward_model("synthetic")`` through
the ``fifa_hf.rewards`` entry point.
"""
