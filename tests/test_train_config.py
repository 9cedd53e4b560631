"""train.config and train.dist.identity: what the cluster side and a user at the shell rely on."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from train import config
from train.config import ConfigError, TrainConfig, validate


def run_train(*args):
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)


def test_config_imports_with_the_standard_library_only():
    code = ("import sys, train.config as c; c.validate({'lr': 0.5}); "
            "bad = sorted(m for m in ('torch', 'yaml', 'numpy', 'torchvision') if m in sys.modules); "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_defaults_and_the_keys_the_cluster_uses():
    c = TrainConfig()
    assert (c.model, c.optimizer, c.precision, c.compile, c.channels_last) == ("resnet50", "sgd", "auto", "auto", "auto")
    for key in ["model", "batch_size", "image_size", "num_classes", "steps", "epochs", "data", "lr", "optimizer",
                "momentum", "weight_decay", "warmup_steps", "label_smoothing", "grad_accum", "precision",
                "channels_last", "compile", "workers", "log_every", "ckpt_every", "keep_ckpts", "ckpt_dir",
                "out_dir", "val_every", "seed", "bucket_cap_mb", "init_timeout_s"]:
        assert key in config.FIELDS


def test_command_line_values_are_read_like_yaml_scalars():
    c = config.parse_args(["lr=1e-3", "steps=30", "compile=false", "channels_last=auto", "model=resnet18",
                           "data=/data/imagenet", "resume=no", "weight_decay=0"])
    assert (c.lr, c.steps, c.compile, c.channels_last, c.model, c.resume) == (1e-3, 30, False, "auto", "resnet18", False)
    assert c.data == "/data/imagenet" and c.weight_decay == 0.0 and isinstance(c.weight_decay, float)


def test_typed_mapping_from_a_job_file_validates():
    c = validate({"batch_size": 256, "lr": 1, "compile": True, "model": "vit_b_16"})
    assert c.lr == 1.0 and c.compile is True
    with pytest.raises(ConfigError) as e:
        validate({"batch_size": "many"})
    assert e.value.key == "batch_size"
    with pytest.raises(ConfigError) as e:
        validate({"stepz": 3})
    assert e.value.key == "stepz" and "unknown" in e.value.message
    for bad in [{"batch_size": True}, {"optimizer": "lamb"}, {"label_smoothing": 1.5}, {"batch_size": 0},
                {"compile": "maybe"}, {"lr": -1}]:
        with pytest.raises(ConfigError):
            validate(bad)
    assert validate({"jpeg_decoder": "dali"}).jpeg_decoder == "dali"
    assert validate({"jpeg_decoder": "dali", "input_process": True}).input_process is True
    assert validate({}).input_process == "auto"
    with pytest.raises(ConfigError) as e:
        validate({"input_process": "maybe"})
    assert e.value.key == "input_process" and "true, false or auto" in e.value.message


def test_config_file_then_overrides(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"steps": 7, "lr": 0.3}))
    c = config.parse_args(["--config", str(f), "steps=9"])
    assert (c.steps, c.lr) == (9, 0.3)
    y = tmp_path / "c.yaml"
    y.write_text("steps: 5\nmodel: resnet18\n")
    assert config.parse_args([f"--config={y}"]).model == "resnet18"


@pytest.mark.parametrize("args, key", [(["stepz=3"], "stepz"), (["lr=fast"], "lr"), (["steps"], "steps")])
def test_command_line_mistakes_exit_2_with_one_line_listing_valid_keys(args, key):
    out = run_train(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr  # no traceback
    assert key in lines[0] and "Valid keys:" in lines[0] and "batch_size" in lines[0]
    assert out.stdout == ""


def test_help_lists_every_key_with_its_default():
    out = run_train("--help")
    assert out.returncode == 0
    for key, f in config.FIELDS.items():
        assert f"{key}={f.default}" in out.stdout


def test_unknown_model_name_exits_2_with_one_line(tmp_path):
    out = run_train("model=resnet5O", f"out_dir={tmp_path}/m", f"ckpt_dir={tmp_path}/c")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().startswith("train: model: unknown torchvision classification model 'resnet5O'")
    assert len(out.stderr.strip().splitlines()) == 1


def test_identity_from_torchrun_and_slurm_variables():
    from train.dist import identity

    assert identity({}) == identity({"PATH": "/bin"})
    assert identity({}).world_size == 1 and identity({}).launcher == "none"
    slurm = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_NODEID": "1",
             "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}
    i = identity(slurm)
    assert (i.rank, i.local_rank, i.world_size, i.local_world_size, i.launcher) == (5, 1, 8, 4, "slurm")
    i = identity({**slurm, "SLURM_STEP_TASKS_PER_NODE": "3,2(x2)", "SLURM_NODEID": "2"})
    assert i.local_world_size == 2
    # torchrun inside an sbatch script sees both sets; its own are the true ones
    i = identity({**slurm, "RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"})
    assert (i.rank, i.local_rank, i.world_size, i.local_world_size, i.launcher) == (3, 3, 16, 8, "torchrun")
