"""The world's pretraining script on a few steps: it runs end to end, logs, and a run interrupted in
either stage resumes to exactly the weights of an uninterrupted one (same process, same threads)."""
import json

import pytest
import torch

from minidb import pretrain
from minidb.pipeline import StableDiffusion

TINY = pretrain.PretrainConfig(vae_steps=4, vae_batch=2, pool=8, unet_steps=4, unet_batch=2, warmup=2,
                               checkpoint_every=2, sample_every=1000)


def _weights(path):
    sd = StableDiffusion.from_checkpoint(path)
    return {f"{name}.{k}": v for name, m in sd.models.items() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("stage", ["vae", "unet"])
def test_interrupted_pretraining_resumes_to_the_same_model(tmp_path, monkeypatch, stage):
    whole = _weights(pretrain.pretrain(tmp_path / "whole", TINY))

    log = pretrain.Stage.log

    def crash_after_step_3(self, step, **values):
        log(self, step, **values)
        if self.name == stage and step == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(pretrain.Stage, "log", crash_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        pretrain.pretrain(tmp_path / "cut", TINY)
    monkeypatch.setattr(pretrain.Stage, "log", log)
    resumed = _weights(pretrain.pretrain(tmp_path / "cut", TINY))  # picks up at its step-2 checkpoint

    assert resumed.keys() == whole.keys()
    for k in whole:
        assert torch.equal(resumed[k], whole[k]), k
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["stage"] == stage] == [1, 2, 3, 3, 4]  # step 3 ran again
    assert (tmp_path / "cut" / "loss.png").is_file() and (tmp_path / "cut" / "samples").is_dir()


def test_pretraining_refuses_a_folder_of_other_settings(tmp_path):
    (tmp_path / "pretrain.json").write_text(json.dumps({"seed": 1}))
    with pytest.raises(SystemExit, match="other settings"):
        pretrain.pretrain(tmp_path, TINY)
