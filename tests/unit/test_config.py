import re

import pytest

from medsapiens import config as configlib
from medsapiens.pretrain.config import PretrainConfig as Experiment


def test_yaml_plus_dotted_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  micro_batch: 4\n  augment:\n    rotation_deg: 30\noptim:\n  lr: 1.0e-3\n")
    cfg = configlib.load(Experiment, path, ["optim.betas=[0.8, 0.9]", "train.max_steps=7", "data.datasets=[head, hand]",
                                            "optim.eps=1e-6"])
    assert cfg.optim.eps == 1e-6  # a float without a dot, as YAML 1.2 reads it (1.1: a string)
    assert cfg.data.micro_batch == 4 and cfg.data.augment.rotation_deg == 30.0
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.train.max_steps == 7 and cfg.data.datasets == ["head", "hand"]
    assert isinstance(cfg.data.augment.rotation_deg, float)


def test_an_override_naming_one_schedule_length_replaces_the_files_other(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  epochs: 210\n  log_every: 5\n")
    train = configlib.load(Experiment, path, ["train.max_steps=2000"]).train
    assert (train.epochs, train.max_steps, train.log_every) == (0, 2000, 5)
    train = configlib.load(Experiment, path, ["train.log_every=3"]).train  # another key leaves the file's choice
    assert (train.epochs, train.max_steps) == (210, 0)
    path.write_text("train:\n  max_steps: 2000\n")
    train = configlib.load(Experiment, path, ["train.epochs=20", "train.max_steps=1000"]).train  # both: as given
    assert (train.epochs, train.max_steps) == (20, 1000)


def test_an_override_giving_a_section_sets_only_its_keys(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("optim:\n  lr: 1.0e-3\n  weight_decay: 0.05\n  schedule: cosine\n"
                    "data:\n  augment:\n    scale_range: [0.75, 1.25]\n")
    cfg = configlib.load(Experiment, path, ["optim={lr: 2.0e-3}", "data.augment={rotation_deg: 10}"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.schedule) == (2e-3, 0.05, "cosine")
    assert (cfg.data.augment.rotation_deg, cfg.data.augment.scale_range) == (10, (0.75, 1.25))
    assert cfg == configlib.load(Experiment, path, ["optim.lr=2.0e-3", "data.augment.rotation_deg=10"])
    path.write_text("data:\n  weights: {head: 2, hand: 1}\n")  # a mapping setting, not a section: replaced
    assert configlib.load(Experiment, path, ["data.weights={leg: 3}"]).data.weights == {"leg": 3}
    assert configlib.load(Experiment, path, ["data={weights: {}}"]).data.weights == {}


def test_of_a_key_given_twice_by_the_overrides_the_last_wins():
    """As a script adding its own overrides after its defaults expects (a file's key given twice is refused)."""
    assert configlib.load(Experiment, None, ["optim.lr=1e-3", "train.max_steps=5", "optim.lr=2e-3"]).optim.lr == 2e-3
    assert configlib.load(Experiment, None, ["optim={lr: 1.0e-3, eps: 1.0e-6}", "optim.lr=2e-3"]).optim.eps == 1e-6


@pytest.mark.parametrize(("override", "refusal"), [
    ("optim.lr=.inf", "optim.lr: expected a finite number, got inf"),
    ("train.epochs=1e400", "train.epochs: expected a finite number, got inf"),
    ("data.augment.shift=nan", "data.augment.shift: expected a finite number, got nan"),
    ("data.augment.scale_range=[0.5, .inf]", r"data.augment.scale_range[1]: expected a finite number, got inf"),
    ("train.compile=yes", "train.compile: expected true or false, got 'yes'"),  # YAML 1.1: true
    ("train.compile=off", "train.compile: expected true or false, got 'off'"),  # YAML 1.1: false
    ("train.max_steps=10:00", "train.max_steps: expected a number, got '10:00'"),  # YAML 1.1: 600
])
def test_a_number_no_setting_means_and_yaml_1_1s_spellings_are_refused(override, refusal):
    with pytest.raises(configlib.ConfigError, match=re.escape(refusal)):
        configlib.load(Experiment, None, [override])


def test_a_value_yaml_would_cut_at_a_comment_is_refused():
    """` #` starts a YAML comment: `run_dir=/runs/exp #2` would silently be another run's /runs/exp."""
    for override in ("run_dir=/runs/exp #2", "data.datasets=[head, hand] # not leg", "data.shards=#1"):
        with pytest.raises(configlib.ConfigError, match=re.escape(f"override {override!r}: YAML reads '#")):
            configlib.load(Experiment, None, [override])
    cfg = configlib.load(Experiment, None, ["run_dir='/runs/exp #2'", "data.shards=/data/set#1",
                                            'data.datasets=[head, "hand #2"]'])
    assert (cfg.run_dir, cfg.data.shards, cfg.data.datasets) == ("/runs/exp #2", "/data/set#1", ["head", "hand #2"])


def test_numbers_read_as_written():
    cfg = configlib.load(Experiment, None, ["train.max_steps=010", "optim.eps=1e-6", "train.seed=1_000"])
    assert (cfg.train.max_steps, cfg.optim.eps, cfg.train.seed) == (10, 1e-6, 1000)  # YAML 1.1: octal 8


def test_unknown_keys_are_named(tmp_path):
    with pytest.raises(configlib.ConfigError, match=r"data\.augment\.rotaton_deg"):
        configlib.load(Experiment, None, ["data.augment.rotaton_deg=3"])
    path = tmp_path / "exp.yaml"
    path.write_text("optimm:\n  lr: 1\n")
    with pytest.raises(configlib.ConfigError, match=r"exp\.yaml.*optimm.*valid keys"):
        configlib.load(Experiment, path)


def test_an_error_names_the_override_it_comes_from_not_the_file(tmp_path):
    from medsapiens.launch.launcher import check_config

    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  max_steps: 4\n")
    with pytest.raises(configlib.ConfigError, match=r"^override train\.max_step: unknown config key\(s\) train\.max_step;"):
        configlib.load(Experiment, path, ["optim.lr=0.1", "train.max_step=4"])
    with pytest.raises(configlib.ConfigError, match=r"^override trainmax_steps: unknown config key\(s\) trainmax_steps;"):
        configlib.load(Experiment, path, ["run_dir=x", "trainmax_steps=3"])  # run_dir is among the valid keys listed
    with pytest.raises(configlib.ConfigError, match=r"^override model\.arch: model: unknown arch 'sapiens_tinyy'"):
        check_config("pretrain", str(path), ["model.arch=sapiens_tinyy"])  # the launcher's checks, before any rank
    path.write_text("train:\n  max_stepz: 4\n")
    with pytest.raises(configlib.ConfigError, match=rf"^{re.escape(str(path))}: unknown config key\(s\) train\.max_stepz"):
        configlib.load(Experiment, path, ["optim.lr=0.1"])


def test_an_override_the_run_would_not_read_is_refused_by_name(tmp_path):
    """An override must change the run: one of a key the chosen options ignore would change nothing, in silence."""
    from medsapiens.finetune.config import FinetuneConfig

    path = tmp_path / "exp.yaml"
    path.write_text("optim:\n  schedule: cosine\n  milestones: [0.5, 0.9]\n")  # a file's unread keys stay allowed
    with pytest.raises(configlib.ConfigError, match=r"^override optim\.milestones: optim\.milestones is read only with "
                       r"optim\.schedule=step, and this run has optim\.schedule=cosine: leave it out, or set "
                       r"optim\.schedule=step$"):
        configlib.load(Experiment, path, ["optim.lr=1e-3", "optim.milestones=[0.7, 0.9]"])
    with pytest.raises(configlib.ConfigError, match=r"optim\.gamma is read only with optim\.schedule=step"):
        configlib.load(Experiment, None, ["optim={schedule: constant, gamma: 0.5}"])  # a section's keys, one by one
    with pytest.raises(configlib.ConfigError, match=r"optim\.min_lr_factor is read only with optim\.schedule=cosine"):
        configlib.load(Experiment, None, ["optim.min_lr_factor=0.1"])
    with pytest.raises(configlib.ConfigError, match=r"data\.temperature is read only with data\.mixing=temperature"):
        configlib.load(Experiment, None, ["data.temperature=4"])
    with pytest.raises(configlib.ConfigError, match=r"^override lora\.qkv_rank, lora\.dropout: lora\.qkv_rank, lora\.dropout "
                       r"are read only with lora\.enabled=true, and this run has lora\.enabled=false: leave them out"):
        configlib.load(FinetuneConfig, None, ["lora.qkv_rank=8", "train.seed=2", "lora.dropout=0.2"])  # all at once
    with pytest.raises(configlib.ConfigError, match=r"reinit_head is read only with init=bundle, and this run has init=scratch"):
        configlib.load(FinetuneConfig, None, ["init=scratch", "reinit_head=true"])
    for stage in (Experiment, FinetuneConfig):  # LoRA's adapters and the decoder train at the base lr: no layer scales
        with pytest.raises(configlib.ConfigError, match=r"^override lora\.enabled, optim\.layer_decay: optim\.layer_decay is read only with "
                           r"lora\.enabled=false, and this run has lora\.enabled=true: leave it out, or set lora\.enabled=false$"):
            configlib.load(stage, None, ["lora.enabled=true", "optim.layer_decay=0.9"])
        assert configlib.load(stage, None, ["optim.layer_decay=0.9"]).optim.layer_decay == 0.9
    path.write_text("data:\n  augment:\n    dropout_prob: 0.0\n")  # as the demo's config: no dropout hole
    with pytest.raises(configlib.ConfigError, match=r"^override data\.augment\.dropout_size: data\.augment\.dropout_size is "
                       r"read only with data\.augment\.dropout_prob above 0, and this run has data\.augment\.dropout_prob=0\.0: "
                       r"leave it out, or set data\.augment\.dropout_prob above 0$"):
        configlib.load(Experiment, path, ["data.augment.dropout_size=[0.1, 0.2]"])
    taken = configlib.load(Experiment, path, ["data.augment.dropout_prob=0.5", "data.augment.dropout_size=[0.1, 0.2]"])
    assert taken.data.augment.dropout_size == (0.1, 0.2)
    with pytest.raises(configlib.ConfigError, match=r"optim\.warmup_factor is read only with optim\.warmup_steps above 0, "
                       r"and this run has optim\.warmup_steps=0"):
        configlib.load(Experiment, None, ["optim.warmup_steps=0", "optim.warmup_factor=0.1"])
    assert configlib.load(Experiment, None, ["optim.warmup_factor=0.1"]).optim.warmup_steps is None  # chosen at run time
    assert configlib.load(Experiment, path, ["optim.schedule=step", "optim.milestones=[0.7, 0.9]"]).optim.milestones == (0.7, 0.9)
    assert configlib.load(FinetuneConfig, None, ["lora.enabled=true", "lora.qkv_rank=8"]).lora.qkv_rank == 8


def test_types_are_checked():
    with pytest.raises(configlib.ConfigError, match="train.max_steps: expected an integer"):
        configlib.load(Experiment, None, ["train.max_steps=1.5"])
    with pytest.raises(configlib.ConfigError, match="optim.betas: expected 2 values"):
        configlib.load(Experiment, None, ["optim.betas=[0.9]"])
    with pytest.raises(configlib.ConfigError, match="not of the form"):
        configlib.load(Experiment, None, ["train.max_steps"])



@pytest.mark.parametrize("value", [".inf", ".nan", "1e400", "1" + "0" * 400])
def test_an_integer_past_a_floats_range_is_refused_by_name(value):
    with pytest.raises(configlib.ConfigError, match=r"^override train.max_steps: train.max_steps: expected a finite integer"):
        configlib.load(Experiment, None, [f"train.max_steps={value}"])


def test_a_config_file_that_is_no_yaml_text_is_one_line(tmp_path):
    cases = {"latin1.yaml": b"run_dir: caf\xe9\n", "keys.yaml": b"run_dir: x\n1: 2\n",
             "nested.yaml": b"train:\n  null: 3\n", "tab.yaml": b"run_dir: x\n\tbad: 1\n",
             "twice.yaml": b"optim:\n  lr: -5\n  weight_decay: 0.1\n  lr: 1.0e-3\n",  # YAML keeps the last lr
             "merge.yaml": b"optim:\n  lr: 1.0e-3\n  <<: {lr: 5.0, weight_decay: 0.3}\n",  # lr twice again
             "digits.yaml": b"train:\n  max_steps: " + b"9" * 5000 + b"\n",
             "date.yaml": b"run_dir: 2026-13-01\n", "empty.yaml": b"", "comments.yaml": b"# lr: 1.0e-3\n\n"}
    messages = {"latin1.yaml": "not UTF-8 text (byte 12)", "keys.yaml": "key 1 is not a name",
                "nested.yaml": "key None under train is not a name",
                "tab.yaml": "not valid YAML: found character '\\t' that cannot start any token at line 2, column 1",
                "twice.yaml": "key 'lr' given twice in one section (line 4)",
                "merge.yaml": "YAML merge keys (<<) are not accepted in configs (line 3)",
                "digits.yaml": "a value YAML cannot read: Exceeds the limit (4300 digits)",
                "date.yaml": "a value YAML cannot read: month must be in 1..12",
                "empty.yaml": "no settings in it (empty, or comments only); a config is a YAML mapping of settings ({} "
                              "for every default)", "comments.yaml": "no settings in it (empty, or comments only)"}
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(configlib.ConfigError, match=re.escape(messages[name])) as refused:
            configlib.load(Experiment, tmp_path / name)
        assert "\n" not in str(refused.value) and str(refused.value).count(name) == 1  # said once, not re-wrapped
    (tmp_path / "fine.yaml").write_text("data:\n  weights: {head: 2, hand: 1}\n  datasets: [head, hand]\n"
                                        "  augment: {scale_range: [0.8, 1.2], rotation_deg: 10}\n")  # a key per map
    assert configlib.load(Experiment, tmp_path / "fine.yaml").data.weights == {"head": 2, "hand": 1}
    (tmp_path / "defaults.yaml").write_text("{}\n")  # every default, on purpose
    assert configlib.load(Experiment, tmp_path / "defaults.yaml") == configlib.load(Experiment, None)
    with pytest.raises(configlib.ConfigError, match=rf"config file {tmp_path}: cannot be read"):
        configlib.load(Experiment, tmp_path)
    (tmp_path / "large.yaml").write_text("run_dir: " + "\u00e9" * 600_000 + "\n")  # 1.2 MB in 600 000 characters
    with pytest.raises(configlib.ConfigError, match=r"large.yaml: more than a config's 1048576 bytes"):
        configlib.load(Experiment, tmp_path / "large.yaml")


def test_resolved_config_round_trips(tmp_path):
    import yaml

    cfg = configlib.load(Experiment, None, ["optim.lr=0.002", "data.weights={head: 2.0}", "run_dir='2e-3'",
                                            "data.datasets=['1e3', 'yes', '010']"])  # strings that look like others
    configlib.save(cfg, tmp_path / "resolved.yaml")
    again = configlib.load(Experiment, tmp_path / "resolved.yaml")
    assert again == cfg and configlib.digest(again) == configlib.digest(cfg)
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text()) == configlib.to_dict(cfg)  # read by YAML 1.1 too
    assert configlib.digest(configlib.load(Experiment, None, ["optim.lr=0.003"])) != configlib.digest(cfg)


def test_a_yaml_bomb_and_deep_nesting_are_refused_in_one_line_without_building_them(tmp_path):
    import time
    import tracemalloc

    from medsapiens.config import ConfigError, load
    from medsapiens.pretrain.config import PretrainConfig

    bomb = tmp_path / "bomb.yaml"
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi", strict=True)]
    bomb.write_text("\n".join(lines + ["run_dir: *i"]) + "\n")  # 9^9 strings once expanded, from 600 bytes
    deep = tmp_path / "deep.yaml"
    deep.write_text("model: " + "[" * 200_000 + "]" * 200_000 + "\n")
    for path, message in ((bomb, "YAML anchors and aliases (&, *) are not accepted"),
                          (deep, "nested more than 32 levels deep")):
        tracemalloc.start()
        start = time.perf_counter()
        with pytest.raises(ConfigError, match=re.escape(message)) as refused:
            load(PretrainConfig, path)
        seconds, (_, peak) = time.perf_counter() - start, tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert seconds < 5 and peak < 64 * 2**20 and len(str(refused.value)) < 300
    with pytest.raises(ConfigError, match=re.escape("override run_dir: YAML anchors")):
        load(PretrainConfig, None, ["run_dir=&x [1]"])


def test_a_long_wrong_value_is_cut_in_the_error_line():
    from medsapiens.config import ConfigError, load
    from medsapiens.pretrain.config import PretrainConfig

    with pytest.raises(ConfigError, match=r"expected a string, got \[0, 0, .*\.\.\. \(") as refused:
        load(PretrainConfig, None, [f"run_dir=[{', '.join(['0'] * 1_000)}]"])
    assert len(str(refused.value)) < 400


def test_every_setting_of_both_stages_is_in_the_recipes_table():
    """docs/recipes.md's "Every setting" names each key a config takes; a key added to a dataclass
    without a line there fails here."""
    from pathlib import Path

    from medsapiens.finetune.config import FinetuneConfig

    text = (Path(__file__).resolve().parents[2] / "docs" / "recipes.md").read_text()
    table = text.split("## Every setting", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([a-z_.]+)`", table))
    keys = {key for cls in (Experiment, FinetuneConfig) for key in configlib.flatten(configlib.to_dict(cls()))}
    assert sorted(keys - named) == []
