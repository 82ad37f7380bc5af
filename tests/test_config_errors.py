"""Bad input: one line naming the field and the allowed values, exit code 2, nothing written."""
import pytest

from harness.cli import main

from conftest import write_suite

GOOD = {"dataset": '"digits"', "backbones": '["resnet8"]'}


def _suite_text(**fields):
    body = {**GOOD, **fields}
    lines = [f"{k} = {v}" for k, v in body.items() if v is not None and not k.startswith("_")]
    lines.append(fields.get("_tail", '[[methods]]\nname = "dense"'))
    return "\n".join(lines) + "\n"


CASES = [
    # (suite text or None for the good one, extra argv, words the message must contain)
    (_suite_text(dataset='"cifar11"'), [], ["dataset", "cifar11", "allowed", "digits", "cifar10"]),
    (_suite_text(backbones='["resnet57"]'), [], ["backbones", "resnet57", "allowed", "resnet56"]),
    (_suite_text(_tail='[[methods]]\nname = "magic-pruner"'), [], ["method", "magic-pruner", "allowed", "dense"]),
    (_suite_text(_tail='[[methods]]\nname = "dense"\nschedule = "sometimes"'), [],
     ["methods[0].schedule", "sometimes", "allowed", "oneshot"]),
    (_suite_text(_tail='[[methods]]\nname = "lamp"\ntargets = [0.5]\nschedule = "progressive"'), [],
     ["methods[0].schedule", "progressive", "not allowed for lamp", "oneshot, iterative"]),
    (_suite_text(shortcut='"C"'), [], ["shortcut", "'C'", "allowed", "A, B"]),
    (_suite_text(seeds='"zero"'), [], ["seeds", "list of integers"]),
    (_suite_text(_tail='[[methods]]\nname = "dense"\nseeds = [1, 1]'), [], ["methods[0].seeds", "duplicate", "[1, 1]"]),
    (_suite_text(_tail='[[methods]]\nname = "dense"\nseeds = []'), [], ["methods[0].seeds", "list of integers"]),
    (_suite_text(_tail='[[methods]]\nname = "dense"\nseed = 3'), [], ["methods[0].seed", "unknown", "seeds"]),
    (_suite_text(_tail='[train]\nepochs = "ten"\n[[methods]]\nname = "dense"'), [], ["train.epochs", "integer"]),
    (_suite_text(_tail='[train]\nepoch = 3\n[[methods]]\nname = "dense"'), [], ["train.epoch", "unknown", "epochs"]),
    (_suite_text(_tail='[measure]\nmemory_format = "nhwc"\n[[methods]]\nname = "dense"'), [],
     ["measure.memory_format", "nhwc", "channels_last"]),
    (_suite_text(_tail='[train]\nlabel_smoothing = 1.5\n[[methods]]\nname = "dense"'), [],
     ["train.label_smoothing", "[0, 1)"]),
    (_suite_text(colour='"red"'), [], ["colour", "unknown suite field", "allowed"]),
    ("dataset = [unclosed\n", [], ["not valid TOML"]),
    (None, ["train.epochs=-1"], ["train.epochs", ">= 0"]),
    (None, ["train.epochs=0"], ["train.epochs", "allowed", ">= 1"]),
    (None, ["measure.batch_sizes=[4,8]"], ["measure.batch_sizes", "allowed", "[1]"]),
    (None, ["model.width=3"], ["override", "allowed sections", "train, measure"]),
    (None, ["train.lr=fast"], ["train.lr", "number"]),
    (None, ["--device", "tpu"], ["device", "tpu", "allowed"]),
    (None, ["--executor", "slurm"], ["--executor", "slurm", "local, ray"]),
    (None, ["--only", "no-such-key*"], ["--only", "no experiment key matches"]),
    (_suite_text(_tail='[measure]\nrepeats = 1\n[[methods]]\nname = "dense"'), [], ["measure.repeats", ">= 3"]),
    (_suite_text(image_size="2"), [], ["image_size", ">= 4"]),
]


@pytest.mark.parametrize("text,argv,words", CASES, ids=[str(i) for i in range(len(CASES))])
def test_bad_input_is_one_clear_line(tmp_path, capsys, text, argv, words):
    suite = tmp_path / "bad.toml"
    if text is None:
        write_suite(suite)
    else:
        suite.write_text(text)
    results = tmp_path / "results"
    code = main(["run", str(suite), "--results-dir", str(results), "--no-progress", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, (word, err)
    assert not results.exists()  # nothing written


def test_unknown_bundled_suite(tmp_path, capsys):
    assert main(["run", "no-such-suite", "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "quick" in err and "allowed" in err


def test_missing_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.toml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_dry_run_prints_grid(tmp_path, capsys):
    suite = write_suite(tmp_path / "s.toml", seeds=(0, 1, 2))
    assert main(["run", str(suite), "--dry-run", "--results-dir", str(tmp_path / "r")]) == 0
    keys = capsys.readouterr().out.split()
    assert len(keys) == 3 and len(set(keys)) == 3
    assert all(k.startswith("digits/resnet8-B/dense/-/oneshot/s") for k in keys)
    assert not (tmp_path / "r").exists()


def test_a_method_may_run_its_own_seeds(tmp_path, capsys):
    suite = tmp_path / "s.toml"
    suite.write_text(_suite_text(seeds="[0, 1, 2, 3, 4]", _tail='[[methods]]\nname = "dense"\n[[methods]]\n'
                                 'name = "global-magnitude"\ntargets = [0.5, 0.9]\nseeds = [0, 2]'))
    assert main(["run", str(suite), "--dry-run", "--results-dir", str(tmp_path / "r")]) == 0
    keys = capsys.readouterr().out.split()
    assert sorted(k.split("/")[-1][:2] for k in keys if "/dense/" in k) == ["s0", "s1", "s2", "s3", "s4"]
    pruned = [k.split("/")[3] + "/" + k.split("/")[-1][:2] for k in keys if "/global-magnitude/" in k]
    assert sorted(pruned) == ["0.5/s0", "0.5/s2", "0.9/s0", "0.9/s2"]


# One validation path: every field a suite file can get wrong, as an override, is refused with the same line.
PARITY = [
    ("train", "epochs", "0"), ("train", "epochs", "-1"), ("train", "epochs", '"ten"'), ("train", "batch_size", "0"),
    ("train", "lr", "0"), ("train", "lr", "-0.1"), ("train", "momentum", "1.5"), ("train", "weight_decay", "2"),
    ("train", "warmup_epochs", "99"), ("train", "label_smoothing", "1.5"), ("train", "finetune_lr", "0"),
    ("train", "epoch", "3"), ("train", "augment", "3"), ("measure", "repeats", "1"),
    ("measure", "memory_format", '"nhwc"'), ("measure", "batch_sizes", "[4, 8]"),
    ("measure", "batch_sizes", "[1, 8, 64]"), ("measure", "batch_sizes", "[]"), ("measure", "batch_sizes", "[1, 0]"),
    ("measure", "warmup", "-1"), ("measure", "latency", '"yes"'),
]


@pytest.mark.parametrize("section,name,value", PARITY, ids=[f"{s}.{n}={v}" for s, n, v in PARITY])
def test_override_is_refused_exactly_like_the_suite_file(tmp_path, capsys, section, name, value):
    tail = f'[{section}]\n{name} = {value}\n[[methods]]\nname = "dense"'
    in_file = tmp_path / "file.toml"
    in_file.write_text(_suite_text(_tail=tail))
    plain = tmp_path / "plain.toml"
    plain.write_text(_suite_text())
    results = tmp_path / "results"
    assert main(["run", str(in_file), "--results-dir", str(results), "--no-progress"]) == 2
    from_file = capsys.readouterr().err.strip()
    assert main(["run", str(plain), f"{section}.{name}={value}", "--results-dir", str(results), "--no-progress"]) == 2
    from_override = capsys.readouterr().err.strip()
    assert len(from_file.splitlines()) == 1 and from_file == from_override
    assert f"{section}.{name}" in from_file
    assert not results.exists()
