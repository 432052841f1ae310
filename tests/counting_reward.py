"""A tiny CLIP reward that appends a line to a file each time a process loads it, so a test can count
reward-model loads across worker processes."""

import os

from fifa_hf.scoring.rewards import CLIPRewardModel


class CountingCLIPReward(CLIPRewardModel):
    def __init__(self, model_name_or_path, load_log):
        super().__init__(model_name_or_path, device="cpu")
        self.load_log = str(load_log)

    def _load(self):
        with open(self.load_log, "a") as log:
            log.write(f"{os.getpid()}\n")
        return super()._load()
