"""finetune's typed flags reach the config with their type, not re-read as YAML."""
from __future__ import annotations

import re
from dataclasses import replace

import pytest

from medsapiens import config as configlib
from medsapiens.errors import InputError
from medsapiens.finetune.cli import finetune_overrides
from medsapiens.finetune.config import FinetuneConfig
from medsapiens.launch.cli import build_parser
from medsapiens.training.run import scheduled


def config_of(*argv: str) -> FinetuneConfig:
    args = build_parser().parse_args(["finetune", *argv])
    return configlib.load(FinetuneConfig, None, finetune_overrides(args))


def test_string_flags_stay_strings_and_numbers_numbers():
    cfg = config_of("--dataset", "no", "--shards", "s3://bucket/a: b", "--bundle", "1e3", "--steps", "7",
                    "--shots", "5", "--batch-size", "3")
    assert cfg.dataset == "no" and cfg.data.shards == "s3://bucket/a: b" and cfg.bundle == "1e3"
    assert cfg.train.max_steps == 7 and cfg.train.epochs == 0 and cfg.shots == 5 and cfg.data.micro_batch == 3
    assert config_of("--epochs", "2.5").train.epochs == 2.5


def test_an_override_changes_its_own_key_and_keeps_the_published_schedule():
    published = config_of().train
    assert (published.epochs, published.max_steps, published.keep_last) == (210.0, 0, 1)
    for argv in (["train.precision=fp32"], ["train.log_every=5"], ["--epochs", "20"]):
        train = config_of(*argv).train
        assert (train.max_steps, train.keep_last, train.val_every) == (0, 1, published.val_every), argv
    assert config_of("--steps", "30").train.keep_last == 1


@pytest.mark.parametrize(("argv", "refusal"), [
    (["--lora", "lora.enabled=false"], "--lora sets lora.enabled, and so does the override lora.enabled=..."),
    (["--resume", "none", "resume=auto"], "--resume sets resume, and so does the override resume=..."),
    (["--steps", "50", "train.max_steps=70"], "--steps sets train.max_steps"),
    (["--steps", "50", "train={epochs: 3}"], "--steps sets train.epochs, and so does the override train=..."),
    (["--no-flip-test", "flip_test=true"], "--no-flip-test sets flip_test"),
    (["--seed", "3", "train.seed=4"], "--seed sets train.seed"),
])
def test_an_override_of_a_key_a_flag_sets_is_refused(argv, refusal):
    """The override used to win silently: `--lora lora.enabled=false` trained every weight."""
    with pytest.raises(InputError, match=rf"^{re.escape(refusal)}"):
        config_of(*argv)
    assert config_of("--steps", "50", "train={seed: 3}").train.seed == 3  # a key of that section no flag sets


def test_a_lora_setting_without_lora_is_refused_and_taken_with_it():
    """Without --lora the adapters' settings change nothing: the run would train every weight, in silence."""
    with pytest.raises(configlib.ConfigError, match=r"lora\.proj_rank is read only with lora\.enabled=true"):
        config_of("lora.proj_rank=16")
    assert config_of("--lora", "lora.proj_rank=16").lora.proj_rank == 16


def test_steps_and_epochs_are_one_or_the_other():
    with pytest.raises(InputError, match="give --steps or --epochs, not both"):
        config_of("--steps", "5", "--epochs", "2")
    with pytest.raises(InputError, match=r"^--steps must be above 0, got 0$"):  # not train.max_steps, set by no one
        config_of("--steps", "0")
    for shots in ("0", "-3"):  # the key's 0 means every image; a flag asking for none is a mistake
        with pytest.raises(InputError, match=rf"^--shots must be above 0, got {shots}: leave it out to train on every"):
            config_of("--shots", shots)
    assert config_of("--shots", "3").shots == 3
    both = configlib.load(FinetuneConfig, None, ["train.epochs=2", "train.max_steps=800"]).train
    with pytest.raises(InputError, match=r"train.epochs \(2\) gives 26 steps here \(100 training images / global "
                                         r"batch 8\), train.max_steps says 800: give one and set the other to 0"):
        scheduled(both, 100, 8)
    assert scheduled(replace(both, max_steps=26), 100, 8)[0].max_steps == 26  # a run's own config.yaml, reloaded


@pytest.mark.parametrize("argv, unread", [
    (["--init", "scratch", "--bundle", "B"], "--init scratch does not read --bundle"),
    (["--init", "scratch", "--checkpoint", "c.pth", "--bundle", "B"], "does not read --bundle or --checkpoint"),
    (["--init", "sapiens", "--bundle", "B", "--checkpoint", "c.pth"], "--init sapiens does not read --bundle"),
    (["--init", "bundle", "--bundle", "B", "--checkpoint", "c.pth"], "--init bundle does not read --checkpoint"),
])
def test_a_start_flag_the_chosen_init_does_not_read_is_refused(argv, unread):
    with pytest.raises(InputError, match=unread):
        config_of(*argv)
    assert config_of("--init", "sapiens", "--checkpoint", "c.pth").model.checkpoint == "c.pth"
    assert config_of("--bundle", "B").bundle == "B"  # --init from the config (bundle by default)


def test_one_seed_is_the_run_one_of_several_seeds_would_be():
    cfg = config_of("--seed", "3")
    assert (cfg.shot_seed, cfg.train.seed) == (3, 3)


def test_a_negative_shot_seed_a_coverage_past_1_and_a_test_split_to_train_on_are_refused_by_name():
    from medsapiens.finetune.train import check_config

    with pytest.raises(InputError, match=r"shots, shot_seed and seeds \(--shots, --seed, --seeds\) must not be negative \(got shots 3, shot_seed -1"):
        check_config(configlib.load(FinetuneConfig, None, ["dataset=leg", "bundle=b", "shots=3", "shot_seed=-1"]))
    with pytest.raises(InputError, match=r"^calibration_coverage must lie strictly between 0 and 1, got 1.5$"):
        check_config(configlib.load(FinetuneConfig, None, ["dataset=leg", "bundle=b", "calibration_coverage=1.5"]))
    with pytest.raises(InputError, match=r"data.train_split='test1' is a test split"):
        check_config(configlib.load(FinetuneConfig, None, ["dataset=leg", "bundle=b", "data.train_split=test1"]))


def test_pretrainings_dataset_mixture_given_to_fine_tuning_is_refused():
    """Fine-tuning trains --dataset: a pretraining config's datasets or mixing would be saved and ignored."""
    from medsapiens.finetune.train import check_config

    base = ["dataset=leg", "bundle=b"]
    for given, named in ((["data.datasets=[head]"], "data.datasets"),
                         (["data.mixing=temperature", "data.weights={leg: 2}"], "data.mixing, data.weights")):
        with pytest.raises(InputError, match=rf"^{re.escape(named)}: pretraining's mixture of datasets, which "
                                             r"fine-tuning does not read: it trains the one dataset given \(--dataset"):
            check_config(configlib.load(FinetuneConfig, None, [*base, *given]))


def test_seeds_are_whole_numbers_between_commas(capsys):
    assert config_of("--seeds", "2, 0,1").seeds == [2, 0, 1]
    for bad in ("0,,1", "0,1]", "-1", "", "1.5"):
        with pytest.raises(SystemExit):
            config_of("--seeds", bad)
        assert f"argument --seeds: expected whole numbers of at least 0 between commas, e.g. 0,1,2, got {bad!r}" in \
            capsys.readouterr().err


def test_a_shot_seed_given_as_flag_or_as_key_is_the_same_run_and_one_that_would_be_ignored_is_refused():
    from medsapiens.finetune.train import check_config, with_shot_seed

    base = ["dataset=leg", "bundle=b", "shots=3"]
    as_flag = config_of("--dataset", "leg", "--bundle", "b", "--shots", "3", "--seed", "1")
    as_key = configlib.load(FinetuneConfig, None, [*base, "shot_seed=1"])  # all `launch finetune` takes
    assert with_shot_seed(as_key, as_key.shot_seed) == with_shot_seed(as_flag, as_flag.shot_seed)
    assert with_shot_seed(as_key, 1).train.seed == 1  # the draw and the training both follow the seed
    with pytest.raises(InputError, match="give --seed or --seeds, not both"):
        config_of("--seed", "7", "--seeds", "0,1")
    with pytest.raises(InputError, match=r"^shot_seed \(--seed\) 7 with seeds \(--seeds\): each seed of the list is both"):
        check_config(configlib.load(FinetuneConfig, None, [*base, "shot_seed=7", "seeds=[0, 1]"]))
    with pytest.raises(InputError, match=r"^train.seed 5 in a few-shot run: it trains with its shot seed"):
        check_config(configlib.load(FinetuneConfig, None, [*base, "shot_seed=1", "train.seed=5"]))
    whole_split = ["dataset=leg", "bundle=b"]
    with pytest.raises(InputError, match=r"^shot_seed 3 without shots: it draws a few-shot run's images \(--shots K\), "
                       r"and this run trains on the whole split with train.seed 0; give train.seed=3 as well to "
                       r"train with it \(`medsapiens finetune --seed 3` sets both\)"):
        check_config(configlib.load(FinetuneConfig, None, [*whole_split, "shot_seed=3"]))  # it would train with 0
    check_config(config_of("--dataset", "leg", "--bundle", "b", "--seed", "3"))  # both seeds: as asked
    check_config(configlib.load(FinetuneConfig, None, [*whole_split, "shot_seed=3", "train.seed=3"]))
    check_config(configlib.load(FinetuneConfig, None, [*whole_split, "train.seed=5"]))


def test_a_run_directory_holding_the_bundle_it_starts_from_is_refused(tmp_path):
    from medsapiens.finetune.train import check_bundle_outside

    bundle = tmp_path / "runs" / "medsapiens" / "bundle"
    for run_dir in (bundle.parent, bundle.parent.parent, bundle):
        with pytest.raises(InputError, match="lies in --run-dir .*, where the run writes its own bundle"):
            check_bundle_outside(str(bundle), str(run_dir))
    check_bundle_outside(str(bundle), str(tmp_path / "runs" / "other"))
    check_bundle_outside(str(bundle), "")  # a fresh directory, chosen at start


def test_a_few_shot_run_started_with_training_seed_zero_resumes_with_it(tmp_path):
    """Runs started from the key shot_seed before a few-shot run trained with its shot seed hold train.seed 0:
    they resume as they were, where the rule would make every rerun another run, refused."""
    from medsapiens.finetune.train import trained_with_seed_zero
    from medsapiens.training.trainer import RESOLVED_CONFIG

    cfg = configlib.load(FinetuneConfig, None, ["dataset=leg", "bundle=b", "shots=3", "shot_seed=2",
                                                f"run_dir={tmp_path}"])
    configlib.save(cfg, tmp_path / RESOLVED_CONFIG)
    assert not trained_with_seed_zero(cfg)  # no checkpoint yet: a fresh start takes the rule
    (tmp_path / "checkpoints" / "step_00000002").mkdir(parents=True)
    assert trained_with_seed_zero(cfg)
    assert not trained_with_seed_zero(replace(cfg, resume="none"))
    configlib.save(replace(cfg, train=replace(cfg.train, seed=2)), tmp_path / RESOLVED_CONFIG)
    assert not trained_with_seed_zero(cfg)  # started under the rule


@pytest.mark.parametrize("argv", [["finetune", "--foo"], ["launch", "pretrain", "--config", "x.yaml", "--foo"]])
def test_an_unknown_flag_shows_the_commands_own_usage(capsys, argv):
    """The top-level usage (`medsapiens [-h] COMMAND ...`) says nothing of the flags the command takes."""
    from medsapiens.launch.cli import main

    with pytest.raises(SystemExit) as ended:
        main(argv)
    command = " ".join(a for a in argv if not a.startswith("-") and "." not in a)
    err = capsys.readouterr().err
    assert ended.value.code == 2 and err.startswith(f"usage: medsapiens {command} [-h]")
    assert err.endswith(f"medsapiens {command}: error: unrecognized arguments: --foo\n")
