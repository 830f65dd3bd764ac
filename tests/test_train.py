"""The training driver: adapter snapshots along the run."""

from conftest import tiny_config
from safetensors.torch import load_file

from splitlora.simulation.run import train


def test_save_every_writes_peft_adapters_along_the_run(tmp_path, tiny_gpt2):
    cfg = tiny_config(steps=4, save_every=2)
    train(cfg, tmp_path, progress=False, loaded=tiny_gpt2)
    snap = tmp_path / "adapters" / "step-2"
    assert (snap / "adapter_config.json").is_file()
    assert not (tmp_path / "adapters" / "step-4").exists()  # the last step is DIR/adapter itself
    early, final = load_file(str(snap / "adapter_model.safetensors")), \
        load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert early.keys() == final.keys()
    assert any(not (early[k] == final[k]).all() for k in early)  # two more steps changed it
