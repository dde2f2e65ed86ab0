"""How settings are wired, in-process (no subprocess, no training): one seed for every random
stream, and which checkpoints a model accepts (structure, the older hyperparameter layout)."""

from __future__ import annotations

import pytest
import torch

from iddpm_lightning.cli import IDDPMCLI
from iddpm_lightning.compat import check_compatible, upgrade_hparams
from iddpm_lightning.errors import ConfigError
from iddpm_lightning.module import IDDPM

from .conftest import TINY, TINY_UNET

OLD_HPARAMS = {"image_size": 8, "in_channels": 1, "block_out_channels": [32], "layers_per_block": 1,
               "attention_resolutions": [], "attention_head_dim": 8, "dropout": 0.1, "timesteps": 100,
               "loss_type": "vlb", "bpd_batch_size": 64, "compile": False}


def test_one_seed_keys_the_model_and_the_data(tmp_path, digits_config, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = IDDPMCLI(args=["--config", digits_config, "--seed_everything=5", *TINY], run=False)
    assert cli.model.hparams.seed == 5 and cli.datamodule.seed == 5
    cli = IDDPMCLI(args=["--config", digits_config, "--seed_everything=true", *TINY], run=False)
    seed = cli.config.seed_everything  # drawn once and written back: the saved config reproduces the run
    assert type(seed) is int and cli.model.hparams.seed == seed == cli.datamodule.seed


# What srun sets in each of its tasks (it sets no LOCAL_RANK), and what torchrun sets.
SRUN = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1",
        "SLURM_NODEID": "0", "SLURM_JOB_ID": "77"}
TORCHRUN = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
MPI = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2"}


@pytest.mark.parametrize("env, named", [(SRUN, "srun (SLURM_NTASKS=2)"), (TORCHRUN, "torchrun (WORLD_SIZE=2)"),
                                        (MPI, "mpirun (Open MPI)")])
def test_a_random_seed_is_refused_in_every_process_of_an_external_multi_process_launch(
        tmp_path, digits_config, run_main, monkeypatch, env, named):
    """Each task would draw its own seed: the ranks' data orders would stop partitioning the epoch."""
    for key in ("LOCAL_RANK", "WORLD_SIZE", "PL_GLOBAL_SEED", *SRUN, *MPI):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code, err = run_main(["fit", "--config", digits_config, "--seed_everything=true", *TINY,
                          "--trainer.max_steps=1", f"--run_dir={tmp_path / 'run'}"], cwd=tmp_path)
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and named in line and "set seed_everything to an integer" in line, err[-2000:]
    assert not (tmp_path / "run").exists()


def test_a_random_seed_is_rank_zeros_under_lightnings_launcher_and_drawn_for_one_slurm_task(
        tmp_path, digits_config, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key in ("LOCAL_RANK", "WORLD_SIZE", "PL_GLOBAL_SEED", *SRUN, *MPI):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "1")  # sbatch with one task: one process, one seed
    seeds = {IDDPMCLI(args=["--config", digits_config, "--seed_everything=true", *TINY], run=False).model.hparams.seed
             for _ in range(2)}
    assert len(seeds) == 2  # drawn at random each time
    for key, value in {**SRUN, "PL_GLOBAL_SEED": "17"}.items():  # a rank given rank 0's seed
        monkeypatch.setenv(key, value)
    cli = IDDPMCLI(args=["--config", digits_config, "--seed_everything=true", *TINY], run=False)
    assert cli.model.hparams.seed == 17 == cli.datamodule.seed == cli.config.seed_everything


def test_a_checkpoint_of_the_flat_layout_is_refused_with_the_way_out(tmp_path, digits_config, run_main):
    old = tmp_path / "old.ckpt"
    torch.save({"hyper_parameters": OLD_HPARAMS, "state_dict": {}, "seed": 3}, old)
    code, err = run_main(["test", "--config", digits_config, f"--run_dir={tmp_path / 'run'}", f"--ckpt_path={old}"],
                         cwd=tmp_path)
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "written by iddpm_lightning 0.1" in line and "upgrade_checkpoint" in line, err[-2000:]
    assert not (tmp_path / "run").exists()


def test_upgrade_nests_the_unet_drops_the_runtime_keys_and_keeps_the_seed():
    new = upgrade_hparams(OLD_HPARAMS, seed=3)
    assert new["unet"] == {"block_out_channels": [32], "layers_per_block": 1, "attention_resolutions": [],
                           "attention_head_dim": 8, "dropout": 0.1}
    assert new["seed"] == 3 and not {"bpd_batch_size", "compile", "block_out_channels"} & set(new)
    assert {k: v for k, v in new.items() if k not in ("unet", "seed")} == \
        {k: OLD_HPARAMS[k] for k in ("image_size", "in_channels", "timesteps", "loss_type")}
    assert upgrade_hparams(new) == new  # today's layout is left as it is


def test_a_checkpoint_of_another_structure_is_refused_and_dropout_may_change():
    model = IDDPM(unet=TINY_UNET, image_size=8, in_channels=1, timesteps=20)
    saved = dict(model.hparams)
    check_compatible({**saved, "unet": {**saved["unet"], "dropout": 0.3}, "lr": 1.0}, model.hparams)  # fine-tuning
    wider = {**saved, "unet": {**saved["unet"], "block_out_channels": [64]}, "image_size": 16}
    with pytest.raises(ConfigError, match=r"image_size=16 \(here 8\), unet.block_out_channels=\[64\] \(here \[32\]\)"):
        check_compatible(wider, model.hparams)


def test_help_shows_the_type_of_every_model_data_and_sampling_setting(digits_config, capsys, monkeypatch, tmp_path):
    from iddpm_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", "--config", digits_config, "--help"])
    entries, current = {}, None
    for line in capsys.readouterr().out.splitlines():  # an entry: "  --key ARG" and its indented help lines
        if line.startswith("  --"):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif current is not None and line.startswith("      "):
            entries[current] += " " + line.strip()
        else:
            current = None
    settings = {k: v for k, v in entries.items() if k.startswith(("--model.", "--sampling.", "--data.init_args."))
                and not k.endswith(".help") and not v.split()[1:2] == ["CONFIG"]}
    assert len(settings) > 25
    for key, entry in settings.items():
        assert "(type: " in entry and "type: Any" not in entry, entry
    assert "{cosine,linear}" in settings["--model.noise_schedule"]
    assert "type: UnitIntervalOpenRight" in settings["--model.unet.dropout"]


def test_a_checkpoint_written_before_rescale_timesteps_is_rebuilt_as_it_was_trained(tiny_run, tmp_path, digits_config,
                                                                                    run_main):
    """Its UNet saw t unscaled: a config that says rescale_timesteps: true (as the paper configs do) does
    not change that, through the CLI nor load_from_checkpoint."""
    import yaml

    checkpoint = torch.load(tiny_run / "checkpoints" / "last.ckpt", weights_only=True)
    del checkpoint["hyper_parameters"]["rescale_timesteps"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    run_main(["test", "--config", digits_config, *TINY, "--model.rescale_timesteps=true", "--data.batch_size=2",
              "--trainer.limit_test_batches=1", f"--ckpt_path={tmp_path / 'old.ckpt'}", f"--run_dir={tmp_path / 'run'}"],
             cwd=tmp_path, ok=True)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["rescale_timesteps"] is False
    assert IDDPM.load_from_checkpoint(tmp_path / "old.ckpt").hparams.rescale_timesteps is False
