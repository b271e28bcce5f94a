import glob
import os

import pytest

from cimfast.config.cli import parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "ds_*.json"))
                                         if "tokenizer" not in p and "finetune" not in p))
def test_shipped_configs_parse(path):
    cfg, run, ds, _ = parse(["--ds_config", path])
    assert "cimfast" not in ds  # cimfast's section never reaches DeepSpeed
    assert "gradient_clipping" in ds
    opt = ds["optimizer"]["params"]
    assert opt["betas"] == [0.9, 0.98] and opt["weight_decay"] == 0.05
    assert ds["scheduler"]["type"] == "WarmupCosineLR"
    if "demo" not in path:
        assert ds["bf16"]["enabled"] is True


def test_command_line_overrides_json_section():
    cfg, run, _, _ = parse(["--ds_config", os.path.join(ROOT, "configs", "ds_demo.json"),
                            "--max_steps", "7", "--objective", "respix", "--no-progress"])
    assert run.max_steps == 7 and cfg.objective == "respix" and run.progress is False
    assert cfg.preset == "tiny" and cfg.img_size == 112  # the preset fills the rest


def test_tokenizer_config_parses():
    from cimfast.tokenizer_train import GROUPS

    tcfg, run, ds, _ = parse(["--ds_config", os.path.join(ROOT, "configs", "ds_tokenizer_demo.json")], GROUPS)
    assert "cimfast" not in ds and tcfg.spec().vocab_size == 512 and run.max_steps > 0


@pytest.mark.parametrize("name", ["vit_base", "vit_large", "resnet50"])
def test_finetune_configs_parse_and_name_their_recipe(name):
    from cimfast.finetune import GROUPS, UNUSED

    fcfg, run, ds, _ = parse(["--ds_config", os.path.join(ROOT, "configs", f"ds_finetune_{name}.json")], GROUPS, unused=UNUSED)
    assert "cimfast" not in ds and fcfg.recipe and fcfg.epochs in (50, 100, 300)
    lr = ds["optimizer"]["params"]["lr"]
    if name.startswith("vit"):  # MAE: lr = base lr x batch / 256
        assert lr == {"vit_base": 5e-4, "vit_large": 1e-3}[name] * ds["train_batch_size"] / 256
        assert fcfg.layer_decay == {"vit_base": 0.65, "vit_large": 0.75}[name] and fcfg.mixup == 0.8
    else:  # ResNet strikes back A2
        assert ds["optimizer"]["type"] == "timm.Lamb" and lr == 5e-3 and fcfg.bce_loss


def test_a_shortened_flag_is_an_error_not_another_setting(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--max_step", "3"])  # argparse's default would take it for --max_steps
    assert e.value.code == 2
    assert "unrecognized arguments: --max_step 3 (did you mean --max_steps?)" in capsys.readouterr().err


def test_finetune_refuses_pretraining_settings_it_would_ignore(tmp_path, capsys):
    """--data_path given to fine-tuning was checked, then ignored: it fine-tuned on the demo digits."""
    import json

    from cimfast.config.settings import ConfigError
    from cimfast.finetune import GROUPS, UNUSED

    ft = os.path.join(ROOT, "configs", "ds_finetune_vit_base.json")
    for argv in (["--data_path", "/x"], ["--data_path=/x"], ["--no-validate_data"], ["--image_interval", "5"],
                 ["--peak_tflops", "989"]):
        with pytest.raises(ConfigError, match=f"--{argv[0][2:].split('=')[0].removeprefix('no-')}: not a setting"):
            parse(["--ds_config", ft, *argv], GROUPS, unused=UNUSED)
    with pytest.raises(ConfigError, match="--train_path and --val_path"):
        parse(["--ds_config", ft, "--data_path", "/x"], GROUPS, unused=UNUSED)
    with open(ft) as f:
        cfg = json.load(f)
    cfg["cimfast"]["pipeline"] = "dali-gpu"
    path = tmp_path / "ft.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="cimfast.pipeline: not a setting"):
        parse(["--ds_config", str(path)], GROUPS, unused=UNUSED)
    del cfg["cimfast"]["pipeline"]
    cfg["cimfast"]["data_pth"] = "/x"  # a typo is not pointed at a refused setting
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unknown key") as e:
        parse(["--ds_config", str(path)], GROUPS, unused=UNUSED)
    assert "data_path" not in str(e.value)
    fcfg, run, _, _ = parse(["--ds_config", ft, "--max_steps", "4"], GROUPS, unused=UNUSED)  # the rest parses
    assert run.max_steps == 4
    from cimfast.config.cli import build_parser

    text = build_parser(GROUPS, "cimfast.finetune", "", unused=UNUSED).format_help()
    assert "--train_path" in text and "--max_steps" in text
    assert not any(f"--{k} " in text or f"--{k}\n" in text for k in UNUSED)


def test_tokenizer_speed_switches_refuse_what_they_cannot_modify():
    """A switch whose host setting is off is an error naming both, not a switch quietly doing nothing."""
    from cimfast.config.settings import ConfigError
    from cimfast.finetune import GROUPS, UNUSED
    import dataclasses

    import torch

    from cimfast.engine.distributed import resolve_cuda_defaults
    from cimfast.train import check_tokenizer_switches as check

    def check_tokenizer_switches(run, cuda):  # as the run resolves its defaults on that device
        check(resolve_cuda_defaults(dataclasses.replace(run), torch.device("cuda" if cuda else "cpu")))
        torch.backends.cudnn.benchmark = False

    _, run, _, _ = parse(["--tokenizer_io_bf16", "--no-tokenizer_bf16"])
    with pytest.raises(ConfigError, match="tokenizer_io_bf16: needs --tokenizer_bf16"):
        check_tokenizer_switches(run, cuda=True)
    _, run, _, _ = parse(["--tokenizer_fuse"])  # compile and the fast path default off on a CPU
    with pytest.raises(ConfigError, match="tokenizer_fuse: needs --compile"):
        check_tokenizer_switches(run, cuda=False)
    check_tokenizer_switches(run, cuda=True)  # on a GPU both default on
    _, run, _, _ = parse(["--tokenizer_fp8_logits", "--cudnn_benchmark"])
    check_tokenizer_switches(run, cuda=False)
    assert run.tokenizer_fp8_logits and run.cudnn_benchmark and not run.tokenizer_io_bf16
    ft = os.path.join(ROOT, "configs", "ds_finetune_vit_base.json")
    with pytest.raises(ConfigError, match="--tokenizer_fp8_logits: not a setting"):
        parse(["--ds_config", ft, "--tokenizer_fp8_logits"], GROUPS, unused=UNUSED)
